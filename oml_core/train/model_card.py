"""The run's model card: what was done and the public commitment, never the pairs."""

from __future__ import annotations

import json
from pathlib import Path

from oml_core.files import atomic_write_json, atomic_write_text
from oml_core.train.metrics import RunMetrics


def write_model_card(run_dir: Path, fset, metrics: RunMetrics) -> None:
    manifest = fset.manifest()
    atomic_write_json(run_dir / "commitment.json", manifest.model_dump(mode="json"))
    check = metrics.check
    lines = [
        "# Fingerprinted model",
        "",
        f"This model carries {len(fset)} secret fingerprints (OML, strategy "
        f"`{fset.strategy or 'unknown'}`). The pairs are not published; the commitment below "
        "lets the owner later prove that any revealed pair belonged to this set.",
        "",
        "## Commitment",
        "",
        f"- algorithm: `{manifest.algorithm}`",
        f"- fingerprints: {manifest.count}",
        f"- Merkle root: `{manifest.root}`",
        "- full manifest (salted hashes per pair, no secrets): `commitment.json`",
        "",
    ]
    if check is not None:
        v = check.verification
        lines += ["## Verification after training", "",
                  f"- matched {v.matched}/{v.total} (p = {v.p_value:.3g}, verdict `{v.verdict}`)",
                  "- per wrapper: " + json.dumps({k: w.matched for k, w in v.wrappers.items()}),
                  ""]
    atomic_write_text(run_dir / "README.md", "\n".join(lines))
