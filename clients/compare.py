"""Several suspects, one plan: `oml audit --base-url A --base-url B ...`.

Each endpoint is audited in turn with the same settings into its own folder under the
comparison's (`<out>/<n>-<host>`), and the verdicts go into one table (`comparison.json`,
`comparison.md`: endpoint × layer × verdict). Keys: a key shown to one suspect could be passed
on to the others (or be recognised by a shared gateway), so by default each endpoint gets keys
that none of the others has seen, as their key ledgers record it (keys spent by earlier audits
of those endpoints included); `--share-keys` lifts that. An endpoint that refuses the requests
gets its error in the table and the others are still audited. Rerunning the same command
resumes each endpoint's audit from its folder.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from pathlib import Path

from clients.audit import run_audit
from clients.audit_result import AuditComparison, ComparedEndpoint, LayerKeys
from clients.config import AuditConfig, validate_audit
from clients.ledger import KeyLedger, endpoint_identity
from oml_core.errors import OMLInputError
from oml_core.files import atomic_write_json, atomic_write_text, oml_home
from oml_core.fingerprints import load_fingerprints


def shown_elsewhere(cfg: AuditConfig, endpoints: list[str]) -> frozenset[str]:
    """Ids of the set's keys that the ledgers of `endpoints` record as spent there."""
    fingerprints = load_fingerprints(cfg.fingerprints).fingerprints
    spent: set[str] = set()
    for url in endpoints:
        fresh, _ = KeyLedger(url).select(fingerprints, len(fingerprints), reuse=False)
        spent |= {fp.id for fp in fingerprints} - {fp.id for fp in fresh}
    return frozenset(spent)


def _folder_name(index: int, url: str) -> str:
    host = re.sub(r"[^A-Za-z0-9]+", "-", endpoint_identity(url).split("://", 1)[-1]).strip("-")
    return f"{index}-{host[:40]}"


def compare_endpoints(cfg: AuditConfig, base_urls: list[str]) -> AuditComparison:
    """Audit every endpoint of `base_urls` with `cfg`'s plan; the comparison (also written to
    comparison.json and comparison.md in the comparison's folder)."""
    identities = [endpoint_identity(url) for url in base_urls]
    if len(set(identities)) < len(identities):
        raise OMLInputError("--base-url names the same endpoint twice; give each suspect once")
    for url in base_urls:
        validate_audit(replace(cfg, base_url=url))
    digest = hashlib.sha256("\n".join(identities).encode()).hexdigest()[:12]
    folder = Path(cfg.out).expanduser() if cfg.out else oml_home() / "audits" / f"compare-{digest}"
    rows = []
    for index, url in enumerate(base_urls, 1):
        others = [u for u in base_urls if u != url]
        excluded = frozenset() if cfg.share_keys else shown_elsewhere(cfg, others)
        one = replace(cfg, base_url=url, out=str(folder / _folder_name(index, url)))
        try:
            summary = run_audit(one, exclude_keys=excluded)
        except OMLInputError as exc:  # this endpoint refused or redirected: the others go on
            rows.append(ComparedEndpoint(endpoint=identities[index - 1], verdict="error",
                                         error=str(exc), folder=one.out))
            continue
        rows.append(ComparedEndpoint(
            endpoint=summary.endpoint, verdict=summary.verdict, p_value=summary.p_value,
            keys=summary.keys_probed, calls=summary.calls_this_run, state=summary.state,
            layers={name: LayerKeys(matched=row.matched, total=row.total)
                    for name, row in summary.layers.items()},
            keys_passed_over=summary.keys_passed_over, folder=summary.folder))
    result = AuditComparison(alpha=cfg.alpha, model=cfg.model, share_keys=cfg.share_keys,
                             endpoints=rows, folder=str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "comparison.json", result.model_dump(mode="json"))
    atomic_write_text(folder / "comparison.md", comparison_table(result))
    return result


def comparison_table(result: AuditComparison) -> str:
    """Markdown: one row per endpoint, a column per layer (keys matched / sent)."""
    layers = sorted({name for row in result.endpoints for name in row.layers or {}})
    head = ["endpoint", "verdict", "p", "keys", "calls", *layers]
    lines = [f"# Audit comparison (alpha {result.alpha:g}, model {result.model})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result.endpoints:
        if row.verdict == "error":
            cells = [row.endpoint, "error", "", "", "", *[""] * len(layers)]
        else:
            cells = [row.endpoint, row.verdict, f"{row.p_value:.3g}", str(row.keys),
                     str(row.calls),
                     *[(f"{row.layers[n].matched}/{row.layers[n].total}"
                        if n in row.layers else "") for n in layers]]
        lines.append("| " + " | ".join(cells) + " |")
    errors = [row for row in result.endpoints if row.verdict == "error"]
    lines += ["", *[f"- {row.endpoint}: {row.error}" for row in errors]]
    return "\n".join(lines) + "\n"
