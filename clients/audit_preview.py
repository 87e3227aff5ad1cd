"""`preview_audit(cfg)`: what an audit would send and spend, before it sends anything.

Every probe shows its key to the suspect, and the key ledger then counts that key as spent on
the endpoint, so a caller that starts audits for someone else (the MCP `start_audit` tool)
shows this first: the folder and whether it resumes an audit there, the keys it will spend
(fresh ones from the ledger unless reuse_keys), the calls by layer, and a rough token count.

Nothing is sent, reserved or written: the keys are chosen as `run_audit` will choose them
(the ledger's `select`, or the fingerprint ids of the folder's plan.json when it resumes) but
only `run_audit` reserves them. The folder's evidence.jsonl is read without the evidence
log's repair of a torn last line, since an audit may be appending to it right now.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from pathlib import Path

from clients.adapters import make_adapter
from clients.audit import set_digest, settings_id
from clients.audit_plan_file import StoredAuditPlan
from clients.audit_result import AuditPlan
from clients.config import AuditConfig, validate_audit
from clients.ledger import KeyLedger, endpoint_identity
from clients.probes import Probe, plan_probes, within_call_budget
from oml_core.errors import OMLInputError
from oml_core.files import oml_home
from oml_core.fingerprints import FingerprintSet, load_fingerprints

CHARS_PER_TOKEN = 4          # the usual rough figure for English text under BPE tokenizers
TOKENS_PER_MESSAGE = 4       # role and separators a chat template adds around each message
MAX_PLAN_BYTES = 16 << 20    # a plan.json (fingerprint ids of up to 100,000 keys) is far smaller


def audit_folder(cfg: AuditConfig, audits_root: Path | None = None,
                 fset: FingerprintSet | None = None) -> Path:
    """Where the audit lives: cfg.out, else `<audits_root>/<settings id>` (default root:
    $OML_HOME/audits, as run_audit has it), so the same settings find the same folder."""
    if cfg.out:
        return Path(cfg.out).expanduser()
    fset = fset or load_fingerprints(cfg.fingerprints)
    return (audits_root or oml_home() / "audits") / settings_id(cfg, set_digest(fset))


def _read_plan(folder: Path, sid: str) -> StoredAuditPlan | None:
    path = folder / "plan.json"
    if not path.exists():
        return None
    try:
        if path.stat().st_size > MAX_PLAN_BYTES:
            raise ValueError
        plan = StoredAuditPlan.from_json(path.read_bytes())
    except (OSError, ValueError):  # pydantic's ValidationError is a ValueError
        raise OMLInputError(f"{folder} has a plan.json that is not an audit plan; pass another "
                            "out folder") from None
    if plan.settings_id != sid:
        raise OMLInputError(f"{folder} holds an audit with other settings (endpoint, model, set or "
                            "probe/decision settings differ); rerun it with its own settings or "
                            "pass another out folder")
    return plan


def _answered(folder: Path) -> set[str]:
    """Probe ids whose latest complete line in evidence.jsonl is an answer (read-only)."""
    path = folder / "evidence.jsonl"
    latest: dict[str, str] = {}
    try:
        data = path.read_bytes()
    except OSError:
        return set()
    for line in data.split(b"\n")[:-1]:  # the part after the last newline may be half-written
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("probe"), str):
            latest[record["probe"]] = record.get("status")
    return {probe for probe, status in latest.items() if status == "ok"}


def _prompt_tokens(probe: Probe, key: str) -> int:
    prompt = probe.prompt(key)
    if prompt.kind == "completion":
        return len(prompt.text) // CHARS_PER_TOKEN + 1
    chars = sum(len(m["content"]) for m in prompt.messages)
    chars += len(json.dumps(prompt.tools)) if prompt.tools else 0
    return chars // CHARS_PER_TOKEN + TOKENS_PER_MESSAGE * len(prompt.messages)


def _close(adapter) -> None:
    """Release the adapter's HTTP client (it never connected; inside a running event loop,
    where asyncio.run cannot be called, it is left to the garbage collector)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(adapter.aclose())


def preview_audit(cfg: AuditConfig, ledgers: Path | None = None) -> AuditPlan:
    """The plan of the audit `cfg` describes (see the module docstring); raises OMLInputError
    where run_audit would refuse (bad settings, every key already spent, another audit in
    the folder). `ledgers`: the ledger folder (default $OML_HOME/ledgers, as run_audit's)."""
    validate_audit(cfg)
    fset = load_fingerprints(cfg.fingerprints)
    sid = settings_id(cfg, set_digest(fset))
    folder = audit_folder(cfg, fset=fset)
    if folder.exists() and not folder.is_dir():
        raise OMLInputError(f"out {folder} is a file; pass a folder")
    plan = _read_plan(folder, sid)
    ledger = KeyLedger(cfg.base_url, ledgers)
    by_id = {fp.id: fp for fp in fset.fingerprints}
    if plan is not None:
        ids = plan.fingerprint_ids
        if any(i not in by_id for i in ids):
            raise OMLInputError(f"{folder}: the plan names fingerprints not in this set; pass the "
                                "set the audit started with")
        passed_over = plan.keys_passed_over
    else:
        chosen, passed_over = ledger.select(fset.fingerprints, cfg.max_keys, cfg.reuse_keys)
        ids = [fp.id for fp in chosen]
    adapter = make_adapter(cfg)
    try:
        planned = plan_probes(cfg, ids)
        probes = [p for p in planned if not adapter.unsupported(p.prompt("?"), p.sampling)]
    finally:
        _close(adapter)
    probes = within_call_budget(cfg, probes)
    if plan is None:  # keys the budget leaves out are neither sent nor reserved
        kept = {p.fingerprint_id for p in probes}
        ids = [i for i in ids if i in kept]
    answered = _answered(folder) & {p.id for p in probes}
    to_send = [p for p in probes if p.id not in answered]
    prompt_tokens = sum(_prompt_tokens(p, by_id[p.fingerprint_id].key) for p in to_send)
    by_layer = Counter(p.layer for p in probes)
    return AuditPlan(
        endpoint=endpoint_identity(cfg.base_url), model=cfg.model,
        fingerprints=str(cfg.fingerprints), folder=str(folder), audit_id=plan.audit_id if plan else None,
        resumes=plan is not None, sequential=not cfg.exhaustive,
        keys=len(ids), key_budget=cfg.max_keys, call_budget=cfg.max_calls,
        keys_passed_over=passed_over,
        reuse_keys=cfg.reuse_keys, layers=list(by_layer), probes_by_layer=dict(by_layer),
        probes_planned=len(probes), probes_not_sendable=len(planned) - len(probes),
        probes_answered=len(answered), calls_to_send=len(to_send),
        max_requests=len(to_send) * (1 + cfg.max_retries),
        estimated_prompt_tokens=prompt_tokens,
        max_completion_tokens=len(to_send) * cfg.max_tokens,
        estimated_tokens=prompt_tokens + len(to_send) * cfg.max_tokens,
        api_key_env=cfg.api_key_env, api_key_set=bool(os.environ.get(cfg.api_key_env)),
        ledger=str(ledger.path))
