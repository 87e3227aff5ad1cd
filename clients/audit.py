"""`run_audit(cfg)`: probe an endpoint with fingerprint keys and turn the answers into a verdict.

Flow: load the set -> fix the plan and the decision rule (plan.json, before any request) ->
reserve the keys in the endpoint's ledger -> send every probe not yet answered (bounded
concurrency, retries; each finished call appended to evidence.jsonl) -> apply the rule to the
latest record of every probe -> report.json / report.md / report.html.

The audit folder is the unit of resumption: rerunning the same command (or `run_audit` with the
same config) continues it, sending only the probes that have no answer yet.

The endpoint is treated as hostile: what it sends is size-capped and type-checked in the
adapters, every field of it that reaches a file goes through the redactor, credentials in
--base-url or --header never reach a file, and an audit in which no probe got a valid answer
is `inconclusive` (never `no_match`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import secrets
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from pydantic import ValidationError

from clients import decision
from clients.adapters import FatalEndpointError, RunDeadline, UnsafeRedirect, make_adapter
from clients.adapters.base import CANCEL_GRACE_S
from clients.answers import Redactor, kind_of, match
from clients.audit_plan_file import AuditPlanHead, SequentialOrder, StoredAuditPlan
from clients.audit_result import (
    AuditDecision,
    AuditProgress,
    AuditReport,
    HitCount,
    LayerTally,
    RevealedKey,
)
from clients.config import AuditConfig, validate_audit
from clients.evidence_log import EvidenceLog
from clients.ledger import KeyLedger, endpoint_identity
from clients.probes import Probe, plan_probes, within_call_budget
from clients.report import verdict_words, write_reports
from clients.sequential import ALTERNATIVE_HIT_RATE, SequentialTest
from oml_core import progress
from oml_core.errors import OMLInputError
from oml_core.files import atomic_write_json, oml_home
from oml_core.fingerprints import Fingerprint, FingerprintSet, load_fingerprints
from oml_core.null_rates import NullRates, load_null_rates
from oml_core.runs import provenance
from oml_core.train.benign import benign_prompts
from oml_core.verify.matching import OPEN, start_state

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 1.0  # how often on_progress is told, at most (and at start and end)
# Settings that change what is sent or how it is judged; the rest (concurrency, timeouts,
# retries, where the folder is) may differ between a run and its resume.
_IDENTITY_FIELDS = ("adapter", "request_template", "answer_path", "max_keys", "reuse_keys", "layers",
                    "num_system_prompts", "sampled_layers", "temperatures", "samples", "seed",
                    "send_seed", "max_tokens", "answer_match", "json_fields", "alpha", "null_rate",
                    "null_file", "dialect", "agent_native_tools", "exhaustive", "probes_per_key",
                    "max_calls")
# Statuses that mean "this route does not exist here" for the raw (completions) layer: the
# layer is dropped for the rest of the run instead of stopping the audit.
_ROUTE_MISSING = (400, 404, 405, 501)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def set_digest(fset: FingerprintSet) -> str:
    """Content hash of the pairs (not the file), so a re-saved set keeps its identity."""
    pairs = [[fp.id, fp.key, fp.response] for fp in fset.fingerprints]
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode("utf-8")).hexdigest()


def measured_null_rates(path: str | None, fset: FingerprintSet, rule: str) -> NullRates | None:
    """The measured null-rate file (--null-file), read and checked as `oml verify` does.

    One reader (oml_core.null_rates.load_null_rates) and the same checks: the file must have
    been measured with the engine rule that counts what the audit's `rule` counts (`start` ->
    start, `anywhere` -> normalized) and on this set's pairs; anything else is one line (exit 2).
    """
    if not path:
        return None
    table = load_null_rates(path)
    table.check_applies(decision.ENGINE_RULE[rule], fset)
    return table


def settings_id(cfg: AuditConfig, set_sha: str) -> str:
    identity = {"endpoint": endpoint_identity(cfg.base_url), "model": cfg.model, "set": set_sha}
    for name in _IDENTITY_FIELDS:
        # list settings as comma strings and answer_match as `match`: the forms and names they
        # had when earlier audit folders were named, so that those folders still resume
        value = getattr(cfg, name)
        identity["match" if name == "answer_match" else name] = (
            ",".join(map(str, value)) if isinstance(value, list) else value)
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


AUDIT_PACKAGES = ("openai", "httpx", "tenacity")  # what sends and retries the probes


NOT_RECORDED = "⟦not recorded⟧"
# header values that are never credentials (anything else given with --header may be one)
_PLAIN_HEADERS = ("content-type", "accept", "user-agent")
_MIN_CREDENTIAL_CHARS = 8  # shorter literals would redact ordinary words in answers


def public_url(url: str | None) -> str | None:
    """The URL as files may show it: user, password and query values masked like header values
    (`https://user:pw@host/v1?key=K` -> `https://⟦not recorded⟧@host/v1?key=⟦not recorded⟧`)."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        netloc = f"{NOT_RECORDED}@{host}" if "@" in parts.netloc else host
        query = "&".join(f"{name}={NOT_RECORDED}"
                         for name, _ in parse_qsl(parts.query, keep_blank_values=True))
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    except ValueError:
        return NOT_RECORDED


def credentials_of(cfg: AuditConfig) -> tuple[str, ...]:
    """Secrets besides the API key that an endpoint could echo: the --base-url password and
    query values, and literal --header values."""
    found = []
    try:
        parts = urlsplit(cfg.base_url or "")
        found += [parts.password or "", *(value for _, value in parse_qsl(parts.query))]
    except ValueError:
        pass
    for line in cfg.header:
        name, _, value = line.partition(":")
        if name.strip().lower() not in _PLAIN_HEADERS:
            for part in value.split("$API_KEY"):
                found += [part.strip(), *part.split()[-1:]]  # `Bearer T` may come back as `T`
    return tuple(c for c in found if len(c) >= _MIN_CREDENTIAL_CHARS)


def _public_config(cfg: AuditConfig) -> dict:
    data = asdict(cfg)
    data["header"] = [h.split(":", 1)[0].strip() + f": {NOT_RECORDED}" for h in cfg.header]
    data["base_url"] = public_url(cfg.base_url)
    return data


class _Audit:
    """One audit's state while it runs (kept out of run_audit for readability)."""

    def __init__(self, cfg: AuditConfig,
                 on_progress: Callable[[AuditProgress], None] | None = None,
                 exclude_keys: frozenset[str] = frozenset()):
        self.exclude_keys = exclude_keys  # ids of keys shown to other endpoints (clients.compare)
        validate_audit(cfg)
        self.cfg = cfg
        self.started = time.monotonic()
        self.fset = load_fingerprints(cfg.fingerprints)
        self.set_sha = set_digest(self.fset)
        self.measured = measured_null_rates(cfg.null_file, self.fset, cfg.answer_match)
        self.layers = list(cfg.layers)
        self.settings_id = settings_id(cfg, self.set_sha)
        self.folder = Path(cfg.out).expanduser() if cfg.out else oml_home() / "audits" / self.settings_id
        if self.folder.exists() and not self.folder.is_dir():
            raise OMLInputError(f"--out {self.folder} is a file; pass a folder")
        self.ledger = KeyLedger(cfg.base_url)
        self.notes: list[str] = []
        self.disabled: dict[str, str] = {}
        self.calls = 0
        self.requests = 0
        self.tokens_used = 0           # reported by the endpoint, whole audit (resumes included)
        self.decoys_sent = 0
        self.token_budget_hit = False
        self.on_progress = on_progress  # optional: the MCP audit job shows how far it is
        self._outcomes: dict[str, dict] = {}
        self.keys_sent: list[str] | None = None  # sequential: the keys sent so far
        # the sequential audit's running e-value (None: the exhaustive plan)
        self.sequential = None if cfg.exhaustive else SequentialTest(cfg.alpha)
        self._progress_at = 0.0

    # --- plan -----------------------------------------------------------------------------
    def plan(self) -> None:
        """Fix the keys, probes and decision rule before the first request (or reload them)."""
        path = self.folder / "plan.json"
        by_id = {fp.id: fp for fp in self.fset.fingerprints}
        stored = self._stored_plan(path, by_id) if path.exists() else None
        plan = stored or self._new_plan()
        self.plan_data: AuditPlanHead = plan
        self.chosen: list[Fingerprint] = [by_id[i] for i in plan.fingerprint_ids]
        if not self.resumed and not self.cfg.exhaustive:
            self.chosen = self.sending_order(self.chosen)
        self.adapter = make_adapter(self.cfg)
        self._sendable_probes()
        self._null_rates(stored)
        if stored is None:
            self.plan_data = self._write_plan(path, plan)
        else:
            self.rule = stored.rule or self.rule
        if self.cfg.exhaustive:  # a sequential audit spends its keys a round at a time
            self.ledger.reserve(self.chosen, plan.audit_id)
        secrets_map = {fp.id: (fp.key, fp.response) for fp in self.chosen}
        self.redactor = Redactor(secrets_map, os.environ.get(self.cfg.api_key_env),
                                 self.cfg.reveal_keys, credentials_of(self.cfg))
        self.adapter.redact = self.redactor.text  # endpoint text quoted in error messages
        self.by_id = {fp.id: fp for fp in self.chosen}

    def _stored_plan(self, path: Path, by_id: dict) -> StoredAuditPlan:
        """A resumed audit's plan.json, refused when it is another audit's or no plan."""
        try:
            plan = StoredAuditPlan.from_json(path.read_bytes())
        except (OSError, ValidationError) as exc:
            # the fields at fault, never the validation text (it may quote the file)
            where = (", ".join(sorted({str(e["loc"][0]) for e in exc.errors() if e["loc"]}))
                     if isinstance(exc, ValidationError) else "")
            raise OMLInputError(
                f"{path} is not a readable audit plan{f' ({where})' if where else ''}; restore "
                "the plan this audit wrote, or pass another --out to start a new audit "
                "(its keys stay spent)") from None
        if plan.settings_id != self.settings_id:
            raise OMLInputError(
                f"{self.folder} holds an audit with other settings (endpoint, model, set or "
                "probe/decision settings differ); rerun it with its own settings or pass "
                "another --out")
        missing = [i for i in plan.fingerprint_ids if i not in by_id]
        if missing:
            raise OMLInputError(f"{self.folder}: the plan names fingerprints not in this set; "
                                "pass the set the audit started with")
        self.resumed = True
        return plan

    def _new_plan(self) -> AuditPlanHead:
        """A new audit's keys (the ledger's unspent ones first) and public settings."""
        allowed = [fp for fp in self.fset.fingerprints if fp.id not in self.exclude_keys]
        chosen, passed_over = self.ledger.select(allowed, self.cfg.max_keys, self.cfg.reuse_keys)
        if len(allowed) < len(self.fset.fingerprints):
            self.notes.append(f"{len(self.fset.fingerprints) - len(allowed)} key(s) already "
                              "shown to the other endpoints of this comparison were passed over")
            passed_over += len(self.fset.fingerprints) - len(allowed)
        self.resumed = False
        return AuditPlanHead(
            created=_now(), settings_id=self.settings_id,
            audit_id=f"{self.settings_id}-{secrets.token_hex(4)}",
            endpoint=endpoint_identity(self.cfg.base_url), model=self.cfg.model,
            set_sha256=self.set_sha, fingerprint_ids=[fp.id for fp in chosen],
            keys_passed_over=passed_over, config=_public_config(self.cfg))

    def _sendable_probes(self) -> None:
        """The planned probes this adapter can send (the others noted), within --max-calls for
        an exhaustive audit; the layers left to test."""
        self.probes: list[Probe] = []
        skipped: Counter = Counter()
        for probe in plan_probes(self.cfg, [fp.id for fp in self.chosen]):
            reason = self.adapter.unsupported(probe.prompt("?"), probe.sampling)
            if reason:
                skipped[(probe.layer, probe.temperature > 0, reason)] += 1
            else:
                self.probes.append(probe)
        for (layer, sampled, reason), count in sorted(skipped.items()):
            self.notes.append(f"{layer} layer{' (sampled)' if sampled else ''}: {count} probe(s) not "
                              f"sent: {reason}")
        if self.cfg.exhaustive:  # (a sequential audit keeps to the budget as it goes)
            budgeted = within_call_budget(self.cfg, self.probes)
            if len(budgeted) < len(self.probes):
                self.notes.append(f"{len(self.probes) - len(budgeted)} probe(s) beyond --max-calls "
                                  f"{self.cfg.max_calls} not planned")
                self.probes = budgeted
                kept = {p.fingerprint_id for p in budgeted}  # keys left out are not spent
                self.chosen = [fp for fp in self.chosen if fp.id in kept]
        self.skipped = sum(skipped.values())
        self.tested_layers = [layer for layer in self.layers
                              if any(p.layer == layer for p in self.probes)]
        if not self.tested_layers:
            raise OMLInputError("no probe layer can be sent with this adapter and template; "
                                "choose other --layers")

    def _null_rates(self, stored: StoredAuditPlan | None) -> None:
        """Every probe's null rate and the decision rule; a resumed audit keeps its plan's
        (a plan of an earlier version has none: they are computed as for a new one)."""
        rates, _ = decision.base_rates([fp.response_prob for fp in self.chosen])
        self.key_rates = {fp.id: rate for fp, rate in zip(self.chosen, rates)}  # uncalibrated bound
        self.measured_rates = (None if self.measured is None else
                               {fp.id: self.measured.probe_rate(fp.id) for fp in self.chosen})
        self.probe_rates, self.null_source, rate_notes = decision.probe_rates(
            self.cfg, self.probes, {fp.id: fp for fp in self.chosen}, self.measured_rates)
        if stored is not None and stored.probe_null_rates:
            fixed = stored.probe_null_rates
            self.probe_rates = {pid: fixed.get(pid, rate) for pid, rate in self.probe_rates.items()}
            self.null_source = stored.null_rate_source or self.null_source
        else:
            self.notes += rate_notes
        self._probe_rate_sums: dict[str, float] = defaultdict(float)
        for probe in self.probes:
            self._probe_rate_sums[probe.fingerprint_id] += self.probe_rates[probe.id]
        self.rule = decision.rule_text(self.cfg, self.tested_layers, self.null_source)

    def _write_plan(self, path: Path, head: AuditPlanHead) -> StoredAuditPlan:
        """plan.json with the keys in sending order and the rule, before any key leaves."""
        sequential = None
        if not self.cfg.exhaustive:
            sequential = SequentialOrder(
                alternative_hit_rate=ALTERNATIVE_HIT_RATE,
                order="as listed: keys by ascending null rate of the probe every key gets (the "
                      "user turn); the other layers rotate over keys in this order")
            self.rule += (f" Sequential: keys in the listed order; each finished key multiplies "
                          f"an e-value by p1/q on a hit and (1-p1)/(1-q) on a miss (p1 = "
                          f"{ALTERNATIVE_HIT_RATE:g}, q its probes' summed null rate); match as "
                          f"soon as it reaches 1/alpha, stop when it no longer can.")
        plan = StoredAuditPlan(
            **{**head.model_dump(), "fingerprint_ids": [fp.id for fp in self.chosen]},
            sequential=sequential, tests=decision.family_of(self.tested_layers), rule=self.rule,
            alpha=self.cfg.alpha, probes_planned=len(self.probes),
            probes_not_sendable=self.skipped, null_rate_source=self.null_source,
            probe_null_rates=self.probe_rates)
        atomic_write_json(path, plan.model_dump(mode="json"))
        return plan

    def sending_order(self, chosen: list[Fingerprint]) -> list[Fingerprint]:
        """A sequential audit's keys, most telling first: by the null rate of the probe every
        key gets (the first slot of each key's plan, the user turn). Ordering by a key's whole
        plan would send last every key whose rotating probe is a layer with a high rate (the
        agent layer: the answer and its JSON fields), so those layers would never be tried;
        the plan's rotation follows this order instead."""
        first = replace(self.cfg, probes_per_key=1)
        heads = plan_probes(first, [fp.id for fp in chosen])
        panel = (None if self.measured is None else
                 {fp.id: self.measured.probe_rate(fp.id) for fp in chosen})
        rates, _, _ = decision.probe_rates(first, heads, {fp.id: fp for fp in chosen}, panel)
        head_rate = {probe.fingerprint_id: rates[probe.id] for probe in heads}
        return sorted(chosen, key=lambda fp: head_rate[fp.id])

    def key_rate(self, fp: Fingerprint) -> float:
        """A key's null rate: the summed rates of its planned probes (a union bound)."""
        return min(1.0, self._probe_rate_sums[fp.id])

    # --- probing --------------------------------------------------------------------------
    def disable_raw(self, status: int) -> None:
        """The endpoint has no completions route: send no more raw probes (they are counted
        as not sendable, not as pending)."""
        if "raw" not in self.disabled:
            self.disabled["raw"] = f"HTTP {status} on the completions route"
            self.notes.append(f"raw layer: stopped after HTTP {status} from the completions "
                              "endpoint (the endpoint has none)")

    def pending(self, latest: dict[str, dict]) -> list[Probe]:
        """Probes without an answer yet; a recorded missing completions route disables raw."""
        for rec in latest.values():
            error = rec.get("error") or {}
            if (rec.get("layer") == "raw" and error.get("kind") == "fatal"
                    and error.get("status") in _ROUTE_MISSING):
                self.disable_raw(error["status"])
        return [p for p in self.probes if latest.get(p.id, {}).get("status") != "ok"
                and p.layer not in self.disabled]

    def _status(self, state: str, **extra) -> None:
        atomic_write_json(self.folder / "status.json",
                          {"state": state, "updated": _now(), "audit_id": self.plan_data.audit_id,
                           **extra})

    def over_token_budget(self) -> bool:
        """Whether --max-tokens-total is spent (noted once in the report when it is)."""
        budget = self.cfg.max_tokens_total
        if budget is None or self.tokens_used < budget:
            return False
        if not self.token_budget_hit:
            self.token_budget_hit = True
            self.notes.append(f"stopped at the token budget (--max-tokens-total {budget}: "
                              f"{self.tokens_used} reported); probes not sent stay pending for "
                              "a rerun with a larger one")
        return True

    def _request(self, probe: Probe | Decoy):
        if probe.layer in self.disabled or self.over_token_budget():
            return None
        if isinstance(probe, Decoy):
            return self.adapter.build_request(probe.template.prompt(probe.text),
                                              probe.template.sampling)
        fp = self.by_id[probe.fingerprint_id]
        request = self.adapter.build_request(probe.prompt(fp.key), probe.sampling)
        if request.stream and self.cfg.answer_match == "start" and probe.layer != "agent":
            # the answer's opening decides the `start` rule: once it has, the rest of the
            # stream is not read (the agent layer also looks at JSON fields further on)
            request.stop_when = lambda text: start_state(text, fp.response) != OPEN
        return request

    def _record(self, probe: Probe, result) -> dict:
        fp = self.by_id[probe.fingerprint_id]
        shown_key = fp.key if self.cfg.reveal_keys else f"⟦key {fp.id}⟧"
        described = self.adapter.build_request(probe.prompt(shown_key), probe.sampling)
        record = {"probe": probe.id, "fingerprint_id": fp.id, "layer": probe.layer,
                  "variant": probe.variant, "temperature": probe.temperature,
                  "sample": probe.sample, "seed": probe.seed, "route": described.route,
                  "request": self.redactor.value(described.body),
                  "status": "ok" if result.ok else "error",
                  "latency_s": round(result.latency_s, 4), "attempts": result.attempts,
                  "retries": max(0, result.attempts - 1), "retry_reasons": result.retry_reasons,
                  "finished": _now()}
        if result.ok:
            answer = result.answer
            fields = self.cfg.json_fields if probe.layer == "agent" else 0
            found = match(answer, fp.response, self.cfg.answer_match, fields)
            record.update(
                answer=self.redactor.text(answer.text), answer_kind=kind_of(answer),
                tool_calls=self.redactor.value(answer.tool_calls),
                finish_reason=self.redactor.text(answer.finish_reason),
                refusal=self.redactor.text(answer.refusal), usage=self.redactor.value(answer.usage),
                reply=self.redactor.value(answer.meta), reasoning=answer.reasoning,
                stream=answer.stream,  # the auditor's own numbers: nothing to redact
                match=found["hit"],
                match_detail=found,
                answer_sha256=hashlib.sha256(answer.text.encode("utf-8")).hexdigest())
        else:
            error = dict(result.error)
            error["message"] = self.redactor.text(error.get("message") or "")
            record.update(error=error, match=None)
        return record

    async def probe_sequentially(self) -> str:
        """Keys in plan order, one round at a time (as many keys as --concurrency keeps busy, and
        no more than a run of hits would need to decide);
        after each round its keys enter the e-value in order (clients/sequential.py), and the
        audit stops once the e-value has reached 1/alpha or can no longer reach it within the
        keys and calls left, or after a round in which no key got a valid answer (an endpoint
        that fails every request would otherwise be shown every key for nothing). A rerun
        replays the answered keys from the evidence and goes on where this one stopped."""
        by_key: dict[str, list[Probe]] = defaultdict(list)
        for probe in self.probes:
            by_key[probe.fingerprint_id].append(probe)
        order = [fp for fp in self.chosen if by_key[fp.id]]
        round_keys = max(1, self.cfg.concurrency // max(len(v) for v in by_key.values()))
        self.keys_sent = []
        state, done, calls = "complete", 0, 0
        try:
            while done < len(order) and not self.sequential.crossed:
                if self.over_token_budget():
                    break
                left = self.affordable(order[done:], by_key, calls)
                # no more keys than a run of hits would need to decide
                needed = self.sequential.keys_needed([self.key_rate(fp) for fp in left])
                if needed is None and left:  # (after a round, the futility rule stops first)
                    self.notes.append("nothing sent: even if every key within the budget came "
                                      "back, the evidence could not reach alpha; raise --max-keys "
                                      "or --max-calls")
                    break
                batch = left[:min(round_keys, needed or 1)]
                if not batch:
                    self.notes.append(f"stopped at the call budget (--max-calls "
                                      f"{self.cfg.max_calls}); {len(order) - done} key(s) not sent")
                    break
                state, outcomes = await self._send_round(batch, by_key)
                calls += sum(len(by_key[fp.id]) for fp in batch)
                if state != "complete":
                    break  # the run timeout: the next run resumes from here
                for fp, (hit, rate) in zip(batch, outcomes):
                    self.sequential.add(fp.id, hit, rate, calls=len(by_key[fp.id]))
                done += len(batch)
                if all(hit is None for hit, _ in outcomes):
                    self.notes.append(f"stopped after a round in which no key got a valid answer; "
                                      f"{len(order) - done} key(s) not sent (fix the endpoint "
                                      "settings and rerun to go on)")
                    break
                left = self.affordable(order[done:], by_key, calls)
                if not self.sequential.reachable([self.key_rate(fp) for fp in left]):
                    if len(left) < len(order) - done:
                        self.notes.append(f"stopped: the calls left of the call budget (--max-calls "
                                          f"{self.cfg.max_calls}) could no longer reach alpha; "
                                          f"{len(order) - done} key(s) not sent")
                    break
        finally:
            await self.close_adapter()
        return state

    async def _send_round(self, batch: list[Fingerprint], by_key: dict[str, list[Probe]]):
        """Send the round's keys' probes not answered yet (a rerun replays the others from the
        evidence); returns the run's state and each key's (hit or None, summed null rate)."""
        latest = EvidenceLog(self.folder / "evidence.jsonl").latest()
        ids = {fp.id for fp in batch}
        pending = [p for p in self.pending(latest) if p.fingerprint_id in ids]
        state = "complete"
        if pending:
            self.ledger.reserve(batch, self.plan_data.audit_id)
            state = await self.probe_all(pending, close=False)
            latest = EvidenceLog(self.folder / "evidence.jsonl").latest()
        self.keys_sent += [fp.id for fp in batch]
        return state, [self.key_outcome(by_key[fp.id], latest) for fp in batch]

    def affordable(self, keys: list[Fingerprint], by_key: dict[str, list[Probe]],
                   calls: int) -> list[Fingerprint]:
        """The leading keys whose probes still fit the --max-calls budget after `calls`."""
        if self.cfg.max_calls is None:
            return keys
        fitting, budget = [], self.cfg.max_calls - calls
        for fp in keys:
            budget -= len(by_key[fp.id])
            if budget < 0:
                break
            fitting.append(fp)
        return fitting

    def key_outcome(self, probes: list[Probe], latest: dict[str, dict]) -> tuple[bool | None, float]:
        """(did any answered probe of the key match, or None when none was answered; the summed
        null rate of the answered probes)."""
        answered = [p for p in probes if latest.get(p.id, {}).get("status") == "ok"]
        if not answered:
            return None, 0.0
        hit = any(bool(latest[p.id].get("match")) for p in answered)
        return hit, min(1.0, sum(self.probe_rates[p.id] for p in answered))

    async def close_adapter(self) -> None:
        try:  # bounded for the same reason as the workers' cancellation
            await asyncio.wait_for(self.adapter.aclose(), CANCEL_GRACE_S)
        except TimeoutError:
            log.warning("the HTTP client did not close within %g s; leaving it", CANCEL_GRACE_S)

    def with_decoys(self, pending: list[Probe]) -> list:
        """`pending` with --decoys decoy prompts per key mixed in at random: each an ordinary
        held-out question sent through one of these probes' own layers and variants, so a decoy
        looks like a probe in every way but the key."""
        if not self.cfg.decoys or not pending:
            return list(pending)
        rng = secrets.SystemRandom()  # unpredictable to the endpoint, unlike a seeded order
        questions = benign_prompts("heldout")
        keys = {p.fingerprint_id for p in pending}
        decoys = [Decoy(f"decoy:{secrets.token_hex(6)}", rng.choice(pending), rng.choice(questions))
                  for _ in range(self.cfg.decoys * len(keys))]
        jobs = [*pending, *decoys]
        rng.shuffle(jobs)
        return jobs

    def _decoy_record(self, decoy: Decoy, result) -> dict:
        """A decoy's evidence line: that it was sent and what it cost; its answer is no evidence
        and is not kept."""
        record = {"probe": decoy.id, "layer": "decoy", "decoy": True,
                  "variant": decoy.template.variant, "status": "ok" if result.ok else "error",
                  "latency_s": round(result.latency_s, 4), "attempts": result.attempts,
                  "finished": _now(), "match": None}
        if result.ok:
            record["usage"] = self.redactor.value(result.answer.usage)
        return record

    async def probe_all(self, pending: list[Probe], close: bool = True) -> str:
        cfg = self.cfg
        deadline = None if cfg.run_timeout is None else self.started + cfg.run_timeout
        state = "complete"
        jobs = self.with_decoys(pending)
        with EvidenceLog(self.folder / "evidence.jsonl") as evidence, \
                progress.bar("audit probes", len(pending)) as advance:
            def on_result(probe: Probe, request, result) -> None:
                if request is None:
                    return
                if isinstance(probe, Decoy):
                    record = self._decoy_record(probe, result)
                    evidence.append(record)
                    self.tokens_used += reported_tokens(record)
                    self.decoys_sent += 1
                    return
                record = self._record(probe, result)
                evidence.append(record)
                self.tokens_used += reported_tokens(record)
                self.calls += 1
                self.requests += result.attempts
                advance(1)
                self.report_progress([record])

            def tolerate(probe: Probe, exc: FatalEndpointError) -> bool:
                if probe.layer == "raw" and exc.status in _ROUTE_MISSING:
                    if "raw" not in self.disabled:
                        self.disabled["raw"] = f"HTTP {exc.status} on the completions route"
                        self.notes.append(f"raw layer: stopped after HTTP {exc.status} from the "
                                          "completions endpoint (the endpoint has none)")
                    return True
                return False

            try:
                await self.adapter.run_all(jobs, self._request, on_result, deadline=deadline,
                                           tolerate=tolerate)
            except RunDeadline:
                state = "incomplete"
                self.notes.append(f"stopped at the run timeout ({cfg.run_timeout:g} s); rerun to "
                                  "finish the remaining probes")
            finally:
                if close:
                    await self.close_adapter()
        return state

    # --- progress ------------------------------------------------------------------------
    def report_progress(self, records, final: bool = False) -> None:
        """Tell `on_progress` how far the audit is: probes answered and failed of those planned,
        keys matched so far and the p-value of the answers so far (the plan's rule applied to
        them; only the final one is the verdict's). At most once a second, and when `final`."""
        if self.on_progress is None:
            return
        for rec in records:
            if rec.get("probe") and rec.get("status") in ("ok", "error"):
                self._outcomes[rec["probe"]] = {
                    "fingerprint_id": rec.get("fingerprint_id"), "layer": rec.get("layer"),
                    "temperature": rec.get("temperature") or 0.0, "status": rec["status"],
                    "hit": bool(rec.get("match")), "rate": self.probe_rates.get(rec["probe"])}
        now = time.monotonic()
        if not final and now - self._progress_at < PROGRESS_EVERY_S:
            return
        self._progress_at = now
        planned = {p.id for p in self.probes}
        outcomes = [o for pid, o in self._outcomes.items() if pid in planned]
        done = sum(o["status"] == "ok" for o in outcomes)
        try:  # a courtesy to the caller: it must never stop the audit
            test = self.sequential
            if test is not None:  # its own (anytime-valid) evidence, updated a round at a time
                p_value = test.p_value if test.keys_tested else None
                matched, total = test.hits, test.keys_tested
            else:
                verdict = decision.evaluate(self.cfg, self.tested_layers, outcomes, self.key_rates,
                                            self.measured_rates, self.null_source)
                top = verdict.tests[verdict.deciding_test]
                p_value = verdict.p_value if done else None
                matched, total = top.matched, top.total
            self.on_progress(AuditProgress(
                probes_done=done, probes_failed=len(outcomes) - done, probes_planned=len(planned),
                calls_this_run=self.calls, p_value=p_value, matched=matched, total=total))
        except Exception as exc:  # noqa: BLE001
            log.warning("progress report failed (%s)", type(exc).__name__)

    # --- verdict ----------------------------------------------------------------------------
    def summarize(self, state: str) -> AuditReport:
        sent = set(self.keys_sent if self.keys_sent is not None else (fp.id for fp in self.chosen))
        layers, outcomes, unsent, refused, error_kinds = self._tally(sent)
        verdict = decision.evaluate(self.cfg, self.tested_layers, outcomes, self.key_rates,
                                    self.measured_rates, self.null_source)
        return self._finish_summary(state, sent, layers, verdict, unsent, refused, error_kinds)

    def _tally(self, sent: set):
        """Per layer: keys and probes that hit, errors, pending probes; every answered or failed
        probe's outcome for the decision."""
        latest = EvidenceLog(self.folder / "evidence.jsonl").latest()
        planned = {p.id: p for p in self.probes}
        outcomes = []
        layers = {layer: LayerTally() for layer in self.tested_layers}
        answer_kinds: dict[str, Counter] = defaultdict(Counter)
        key_hits: dict[str, dict[str, bool]] = defaultdict(dict)
        unsent = refused = 0  # probes of a layer the endpoint turned out not to have
        error_kinds: Counter = Counter()
        for pid, probe in planned.items():
            row = layers[probe.layer]
            rec = latest.get(pid)
            if probe.fingerprint_id not in sent:
                continue  # a sequential audit stopped before this key: never sent, not spent
            if rec is None:
                if probe.layer in self.disabled:
                    unsent += 1
                else:
                    row.pending += 1
                continue
            if rec["status"] != "ok":
                row.errors += 1
                error_kinds[str((rec.get("error") or {}).get("kind"))] += 1
                if probe.layer in self.disabled:
                    refused += 1
                outcomes.append({"fingerprint_id": probe.fingerprint_id, "layer": probe.layer,
                                 "temperature": probe.temperature, "status": "error", "hit": False,
                                 "rate": self.probe_rates[pid]})
                continue
            hit = bool(rec["match"])
            outcomes.append({"fingerprint_id": probe.fingerprint_id, "layer": probe.layer,
                             "temperature": probe.temperature, "status": "ok", "hit": hit,
                             "rate": self.probe_rates[pid]})
            row.probes += 1
            row.hits += hit
            row.tokens += reported_tokens(rec)
            answer_kinds[probe.layer][rec.get("answer_kind", "text")] += 1
            for cells, name in ((row.by_temperature, f"{probe.temperature:g}"),
                                (row.variants, probe.variant)):
                cell = cells.setdefault(name, HitCount())
                cell.hits += hit
                cell.probes += 1
            key_hits[probe.layer][probe.fingerprint_id] = (
                key_hits[probe.layer].get(probe.fingerprint_id, False) or hit)
        for layer, row in layers.items():
            row.matched = sum(key_hits[layer].values())
            row.total = len(key_hits[layer])
            row.answer_kinds = dict(answer_kinds[layer])
        return layers, outcomes, unsent, refused, error_kinds

    def _finish_summary(self, state: str, sent: set, layers: dict[str, LayerTally],
                        verdict: AuditDecision, unsent: int, refused: int,
                        error_kinds: Counter) -> AuditReport:
        """The verdict (a sequential audit's is its e-value's), notes, and the summary every
        report is written from."""
        if not self.cfg.exhaustive:
            # the verdict is the e-value's: the per-layer p-values above were computed on a
            # sample whose size the evidence chose, so they describe, they do not decide
            sequential = self.sequential.summary()
            verdict.verdict, verdict.p_value = sequential.verdict, sequential.p_value
            verdict.sequential = sequential
            verdict.log10_p_value = math.log10(sequential.p_value)
        for layer in verdict.untested:
            if layer in layers and (layers[layer].errors or layers[layer].pending):
                self.notes.append(f"{layer} layer: no key got a valid answer, so it tested nothing")
        pending = sum(r.pending + r.errors for r in layers.values()) - refused
        if pending and state == "complete":
            state = "incomplete"
        top = verdict.tests[decision.ANY if decision.ANY in verdict.tests else self.tested_layers[0]]
        try:
            root = self.fset.manifest().root
        except OMLInputError:
            root = None  # an OML 1.0 set without salts has no commitment
        report = AuditReport(
            verdict=verdict.verdict, p_value=verdict.p_value, matched=top.matched,
            total=top.total, layers=layers, decision=verdict, rule=self.rule,
            alpha=self.cfg.alpha, state=state, incomplete=state != "complete", pending=pending,
            audit_id=self.plan_data.audit_id, folder=str(self.folder),
            endpoint=endpoint_identity(self.cfg.base_url), model=self.cfg.model,
            adapter=self.cfg.adapter, set_sha256=self.set_sha, commitment_root=root,
            keys_probed=len(sent), key_budget=self.cfg.max_keys,
            keys_not_sent=len(self.chosen) - len(sent),
            keys_passed_over=self.plan_data.keys_passed_over,
            fingerprint_ids=[fp.id for fp in self.chosen], ledger=str(self.ledger.path),
            probes_planned=len(self.probes), probes_done=sum(r.probes for r in layers.values()),
            probes_failed=sum(r.errors for r in layers.values()),
            errors_by_kind=dict(error_kinds.most_common()),
            probes_skipped=self.skipped + unsent + refused, calls_this_run=self.calls,
            requests_this_run=self.requests, resumed=self.resumed, notes=self.notes,
            decoys_sent=self.decoys_sent, tokens_reported=self.tokens_used, finished=_now(),
            seconds_this_run=round(time.monotonic() - self.started, 3),
            config=_public_config(self.cfg), provenance=provenance(AUDIT_PACKAGES),
            revealed=[RevealedKey(id=fp.id, key=fp.key, response=fp.response)
                      for fp in self.chosen] if self.cfg.reveal_keys else None)
        report.verdict_words = verdict_words(report)
        report.reports = write_reports(self.folder, report)
        return report


@dataclass(frozen=True)
class Decoy:
    """A prompt with no key, sent like `template` (its layer, variant and sampling)."""

    id: str
    template: Probe
    text: str

    @property
    def layer(self) -> str:
        return self.template.layer


def reported_tokens(record: dict) -> int:
    """Tokens one call's reply reported (total, else prompt + completion; 0 when none)."""
    usage = record.get("usage") or {}
    total = usage.get("total_tokens")
    if not isinstance(total, int):
        total = sum(v for v in (usage.get("prompt_tokens"), usage.get("completion_tokens"))
                    if isinstance(v, int))
    return total


def tokens_reported(path: Path) -> int:
    """Tokens reported over every call in an evidence log (each call counts, retries of a
    probe in later runs too: each was billed)."""
    if not path.exists():
        return 0
    total = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            total += reported_tokens(json.loads(line))
        except (ValueError, AttributeError):
            continue  # a torn last line of an interrupted run
    return total


async def run_audit_async(cfg: AuditConfig,
                          on_progress: Callable[[AuditProgress], None] | None = None,
                          exclude_keys: frozenset[str] = frozenset()) -> AuditReport:
    """The audit as a coroutine (for callers that already run an event loop); keys whose ids
    are in `exclude_keys` are not chosen (clients.compare: shown to another endpoint)."""
    audit = _Audit(cfg, on_progress, exclude_keys)
    audit.plan()
    audit.tokens_used = tokens_reported(audit.folder / "evidence.jsonl")
    latest = EvidenceLog(audit.folder / "evidence.jsonl").latest()
    pending = audit.pending(latest)
    reused = sum(1 for p in audit.probes if latest.get(p.id, {}).get("status") == "ok")
    log.info("audit %s: %d probes on %d keys (%d answered earlier, %d to send); folder %s",
             audit.plan_data.audit_id, len(audit.probes), len(audit.chosen), reused,
             len(pending), audit.folder)
    audit._status("running", probes=len(audit.probes), pending=len(pending))
    audit.report_progress(latest.values(), final=True)
    try:
        if not cfg.exhaustive:
            state = await audit.probe_sequentially()
        else:
            state = await audit.probe_all(pending) if pending else "complete"
    except FatalEndpointError as exc:
        reason = audit.redactor.text(str(exc))
        audit._status("aborted", reason=reason)
        if isinstance(exc, UnsafeRedirect):
            raise OMLInputError(f"{reason}; stopped early, the evidence so far is in "
                                f"{audit.folder}") from None
        raise OMLInputError(f"the endpoint refused a request ({reason}); "
                            f"stopped early, the evidence so far is in {audit.folder}") from None
    except BaseException:
        audit._status("interrupted", calls_this_run=audit.calls)
        raise
    audit.report_progress((), final=True)
    summary = audit.summarize(state)
    audit._status(summary.state, verdict=summary.verdict, calls_this_run=audit.calls)
    return summary


def run_audit(cfg: AuditConfig, on_progress: Callable[[AuditProgress], None] | None = None,
              exclude_keys: frozenset[str] = frozenset()) -> AuditReport:
    """Run (or resume) an audit and return its report (also written to report.json);
    `on_progress(dict)`, if given, is told how far it is (_Audit.report_progress)."""
    return asyncio.run(run_audit_async(cfg, on_progress, exclude_keys))
