"""The run's model card: what was done and the public commitment, never the pairs."""

from __future__ import annotations

import json
from pathlib import Path

from oml_core.files import atomic_write_json, atomic_write_text


def write_model_card(run_dir: Path, fset, metrics: dict) -> None:
    manifest = fset.manifest()
    atomic_write_json(run_dir / "commitment.json", manifest.model_dump(mode="json"))
    verification = metrics.get("verification", {})
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
    if verification:
        lines += ["## Verification after training", "",
                  f"- matched {verification['matched']}/{verification['total']} "
                  f"(p = {verification['p_value']:.3g}, verdict `{verification['verdict']}`)",
                  "- per wrapper: " + json.dumps({k: v["matched"] for k, v in
                                                 verification["wrappers"].items()}), ""]
    atomic_write_text(run_dir / "README.md", "\n".join(lines))
