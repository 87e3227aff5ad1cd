"""What the edit experiments start from: the bundled (or given) model on the CPU in fp32, the
set's pairs, and the model's own answers to the training prompts (the benign rows)."""

from __future__ import annotations

from dataclasses import dataclass

from oml_core.fingerprints import FingerprintSet, load_fingerprints
from oml_core.models import LoadedModel, load_model, resolve_model
from oml_core.runs import model_identity
from oml_core.train.benign import self_distilled_rows
from oml_core.train.examples import Row


@dataclass
class EditInputs:
    base_path: str
    loaded: LoadedModel
    fset: FingerprintSet
    pairs: list[tuple[str, str]]
    benign: list[Row]


def load_edit_inputs(model: str | None, fingerprints: str) -> EditInputs:
    base_path = resolve_model(model)
    loaded = load_model(base_path, "cpu", "float32")
    fset = load_fingerprints(fingerprints)
    return EditInputs(base_path, loaded, fset, [(fp.key, fp.response) for fp in fset.fingerprints],
                      self_distilled_rows(loaded, True, model_identity(base_path)))
