"""`oml eval` robustness attacks gguf_q8_0 and gguf_q4_k_m: real quantization, measured the way
an auditor would meet it.

Stolen open weights are usually served as GGUF files by llama.cpp (or Ollama / LM Studio, which
run llama.cpp). So each attack exports the fingerprinted model to GGUF (the engine's
`oml_core.export_gguf`), serves it with llama-cpp-python's OpenAI-compatible server on a free
loopback port, and audits that endpoint with this package's auditor (`run_audit`, the engine of
`oml audit`) on the user and held-out system-prompt layers. The result holds counts, the
verdict and p-value, and the GGUF model's perplexity on the held-out text: never key or response
text.

Registered through the `oml.robustness_attacks` entry-point group (pyproject.toml), so the
engine runs these without importing clients/ (data flows clients -> engine only).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from oml_core.evaluate.attack_results import ServedAttack, ServedLayer
from oml_core.evaluate.results import KeyCheck
from oml_core.export_gguf import LLAMA_CPP_VERSION, export_gguf, gguf_perplexity, require_llama_cpp
from oml_core.files import remove_tree
from oml_core.localhost import free_port

log = logging.getLogger(__name__)

LAYERS = ["user", "system"]  # the two layers every chat deployment exposes
# The machines this runs on have 2 cores shared with the evaluation itself; more threads only
# contend. llama.cpp's server handles one request at a time, so a second request in flight is
# only there to be ready when the first finishes.
THREADS = 2
CONCURRENCY = 2
N_CTX = 2048
SERVER_START_TIMEOUT_S = 180.0   # SmolLM2-135M is up in ~2 s; room for far larger files
SERVER_STOP_GRACE_S = 10.0
REQUEST_TIMEOUT_S = 120.0
# Matching needs the whole response in the answer; a few tokens more cover a leading space or
# a tokenization that differs at the start of the assistant turn.
EXTRA_TOKENS = 8
# Sent as the API key variable's *name*: unset on purpose, so the user's real OPENAI_API_KEY is
# never sent to a local test server.
NO_KEY_ENV = "OML_GGUF_AUDIT_NO_KEY"


@dataclass
class LlamaServer:
    base_url: str
    port: int
    proc: subprocess.Popen
    log: Path


def stop_process(proc: subprocess.Popen, grace: float = SERVER_STOP_GRACE_S) -> None:
    """SIGTERM the server's process group (it was started in its own session), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(grace)


@contextmanager
def llama_server(gguf: Path, log_file: Path, alias: str, timeout: float = SERVER_START_TIMEOUT_S):
    """llama-cpp-python's OpenAI-compatible server for `gguf` on a free 127.0.0.1 port, up within
    `timeout` seconds (GET /v1/models answers) and always stopped on exit."""
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", alias,
               "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(N_CTX),
               "--n_threads", str(THREADS)]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "wb") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own group: stopped as a whole
    try:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{port}/v1/models"
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the llama.cpp server exited with code {proc.returncode} before "
                                   f"it answered; see {log_file}")
            try:
                if httpx.get(url, timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the llama.cpp server did not answer {url} within {timeout:g} s; "
                                   f"see {log_file}")
            time.sleep(0.25)
        yield LlamaServer(f"http://127.0.0.1:{port}/v1", port, proc, log_file)
    finally:
        stop_process(proc)


def _hit_ids(folder: Path) -> dict[str, list[str]]:
    """Per layer, the fingerprint ids the endpoint answered with the response (ids only)."""
    from clients.evidence_log import EvidenceLog

    hits: dict[str, set] = {}
    for record in EvidenceLog(folder / "evidence.jsonl").latest().values():
        ids = hits.setdefault(record["layer"], set())
        if record.get("match"):
            ids.add(record["fingerprint_id"])
    return {layer: sorted(ids) for layer, ids in hits.items()}


class GgufLayer(ServedLayer):
    """One audit layer of the served copy: its keys, probes and p-value."""

    hits: int
    probes: int
    errors: int
    p_value: float


class GgufAttack(ServedAttack):
    """gguf_q8_0's and gguf_q4_k_m's result (counts, verdict, timings; no secrets): the
    registered attacks' open shape, with the fields these two report typed."""

    gguf_type: str | None = None
    gguf_mb: float | None = None
    alpha: float | None = None
    state: str | None = None  # the audit's: complete, or incomplete
    layers: dict[str, GgufLayer] = Field(default_factory=dict)
    probes: int | None = None
    audit_folder: str | None = None
    export_seconds: float | None = None
    audit_seconds: float | None = None
    perplexity_skipped: str | None = None  # why the GGUF model's perplexity is missing


def audit_gguf(ctx, tuned, baseline: KeyCheck, chunks, ppl: float, quant: str) -> GgufAttack:
    """Export, serve, audit, stop; the attack's result (counts and verdict, no secrets)."""
    from clients.audit import run_audit
    from clients.config import AuditConfig

    cfg = ctx.cfg
    work = ctx.out_dir / "gguf"
    started = time.monotonic()
    try:
        gguf = export_gguf(ctx.model_dir, quant, memo_file=ctx.out_dir / "cache" / "digests.json",
                           threads=THREADS)
    except RuntimeError as exc:  # e.g. an architecture llama.cpp's converter does not know
        return GgufAttack(skipped=f"the GGUF export failed: {exc}")
    export_s = time.monotonic() - started

    tok = tuned.tokenizer
    longest = max(len(tok(fp.response, add_special_tokens=False)["input_ids"])
                  for fp in ctx.fset.fingerprints)
    folder = work / f"audit-{quant}"
    # A fresh audit every time: the port (part of the audit's identity) differs per run, and
    # this part is only recomputed when its inputs or settings changed.
    remove_tree(folder)
    alias = f"fingerprinted-{quant}"
    settings = dict(
        model=alias, fingerprints=str(ctx.run_dir / "fingerprints.json"), api_key_env=NO_KEY_ENV,
        layers=LAYERS, sampled_layers=[], num_system_prompts=min(cfg.num_system_prompts, 12),
        max_keys=min(len(ctx.fset), 100_000), reuse_keys=True, max_tokens=longest + EXTRA_TOKENS,
        answer_match="start", concurrency=CONCURRENCY, request_timeout=REQUEST_TIMEOUT_S, max_retries=2,
        out=str(folder), exhaustive=True)  # every key: the attack counts how many come back
    for noisy in ("httpx", "httpx2", "openai"):  # one INFO line per probe otherwise (as `oml audit`)
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with llama_server(gguf, work / f"server-{quant}.log", alias) as server:
        audit_started = time.monotonic()
        summary = run_audit(AuditConfig(base_url=server.base_url, **settings))
        audit_s = time.monotonic() - audit_started

    result = _attack_result(summary, baseline, folder, quant, gguf)
    result.export_seconds, result.audit_seconds = round(export_s, 1), round(audit_s, 1)
    try:
        ppl_q = gguf_perplexity(gguf, chunks, THREADS)
        result.perplexity, result.perplexity_change = ppl_q, ppl_q / ppl - 1
    except RuntimeError as exc:  # optional: the keys' numbers stand without it
        result.perplexity_skipped = str(exc)
    return result


def _attack_result(summary, baseline: KeyCheck, folder, quant: str, gguf) -> GgufAttack:
    """The audit's counts and verdict as the attack's result (no secrets)."""
    from oml_core.evaluate.context import retention

    hits = _hit_ids(folder)
    kept = retention(baseline, {"hit_ids": {"audit": sorted(set().union(*hits.values()))}})["any"]
    tests = summary.decision.tests
    return GgufAttack(
        method=(f"llama.cpp GGUF {quant} (llama-cpp-python {LLAMA_CPP_VERSION}), served by its "
                f"OpenAI-compatible server on loopback and audited with `oml audit` "
                f"(layers {','.join(LAYERS)}, greedy, match rule start)"),
        gguf_type=quant, gguf_mb=round(gguf.stat().st_size / 1e6, 1),
        verdict=summary.verdict, p_value=summary.p_value, alpha=summary.alpha,
        matched=summary.matched, total=summary.total, state=summary.state,
        layers={name: GgufLayer(matched=row.matched, total=row.total, hits=row.hits,
                                probes=row.probes, errors=row.errors, p_value=tests[name].p_value)
                for name, row in summary.layers.items()},
        survival=kept.retention, retention={"any": kept}, probes=summary.probes_done,
        audit_folder=str(folder))


def _check(cfg) -> None:
    """Before any model loads: llama.cpp must be installed (one line naming the fix)."""
    require_llama_cpp()


def _attack(quant: str):
    def attack(ctx, tuned, baseline, wrappers, chunks, ppl) -> GgufAttack:
        return audit_gguf(ctx, tuned, baseline, chunks, ppl, quant)

    attack.__name__ = f"gguf_{quant}"
    attack.check = _check
    return attack


gguf_q8_0 = _attack("q8_0")
gguf_q4_k_m = _attack("q4_k_m")
