"""`oml audit`: registered into the `oml` command through the `oml.commands` entry point group.

Thin: flags come from AuditConfig, the work is `run_audit`, the result is printed (JSON with
--json). Exit codes: 0 the audit reached a verdict (`match` or `no_match`); 2 bad input, or the
endpoint refused the requests or redirected them elsewhere (one line naming the problem and
the fix); 3 `inconclusive`: no probe got a valid answer, so the endpoint was not tested (rerun
to retry); 130 / 143 Ctrl-C / SIGTERM, leaving a folder that the same command resumes; 1 is
left to crashes.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

from clients.audit_result import AuditHeadline, AuditPlan, AuditProgress, AuditReport
from clients.config import AuditConfig

HELP = "probe a chat / OpenAI-compatible endpoint with fingerprint keys and report the evidence"
EXIT_INCONCLUSIVE = 3
EPILOG = ("exit codes: 0 verdict match or no_match; 2 bad input, or the endpoint refused the "
          "requests or redirected them to another host; 3 inconclusive (no probe got a valid "
          "answer: the endpoint was not tested; rerun the same command to retry); 130/143 "
          "interrupted (rerun to resume)")


def register(subparsers) -> None:
    """Add `audit` to the `oml` subcommands (called by oml_core.cli.build_parser)."""
    from oml_core.cli import _add_config_flags

    parser = subparsers.add_parser("audit", help=HELP, description=HELP, epilog=EPILOG)
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    # for a caller watching from outside (the MCP audit job, oml_mcp): not a user's flag
    parser.add_argument("--plan-only", action="store_true",
                        help="print the plan (keys to spend, calls, estimated tokens) and send nothing")
    parser.add_argument("--progress-file", help=argparse.SUPPRESS)
    _add_config_flags(parser, AuditConfig, skip=("base_url",))
    # the old name of --answer-match (it read like `oml verify --match`, whose rules differ)
    parser.add_argument("--match", dest="answer_match", default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)
    base_url = next(f for f in dataclasses.fields(AuditConfig) if f.name == "base_url")
    parser.add_argument("--base-url", dest="base_urls", action="append", metavar="URL",
                        help=base_url.metadata["help"] + "; give it more than once to audit "
                             "several suspects with one plan and one comparison table")
    parser.set_defaults(func=cmd_audit)


def _human(summary: AuditReport) -> str:
    lines = [(f"verdict: {summary.verdict} (p = {summary.p_value:.3g}, alpha "
             f"{summary.alpha:g}); {summary.matched}/{summary.total} keys came back")]
    for name, row in summary.layers.items():
        lines.append(f"  {name:<10} {row.matched:>4}/{row.total:<4} keys  "
                     f"{row.hits:>5}/{row.probes:<5} probes  errors {row.errors}")
    lines += [f"  ({note})" for note in summary.notes]
    if summary.decision.sequential:
        lines.append(f"  sequential: {summary.keys_probed} keys sent and spent, "
                     f"{summary.keys_not_sent} never sent; {summary.calls_this_run} calls "
                     "this run")
    lines.append(summary.verdict_words)
    lines.append(f"reports: {summary.reports['html']} (evidence: {summary.folder}/evidence.jsonl)")
    return "\n".join(lines)


def _human_plan(plan: AuditPlan) -> str:
    resumed = f" (resumes {plan.audit_id}: {plan.probes_answered} answered)" if plan.resumes else ""
    most = "at most " if plan.sequential else ""
    lines = [f"plan for {plan.endpoint}{resumed}: {most}{plan.keys} keys of the budget "
             f"{plan.key_budget} ({plan.keys_passed_over} passed over as already spent), "
             f"{most}{plan.calls_to_send} calls to send (at most {plan.max_requests} requests "
             f"with retries), about {plan.estimated_tokens} tokens"]
    if plan.sequential:
        lines.append("  sequential: keys go out a round at a time and the audit stops as soon as "
                     "the evidence decides; keys never sent stay unspent")
    lines += [f"  {layer:<10} {count:>5} probes" for layer, count in plan.probes_by_layer.items()]
    lines.append(f"nothing was sent; the audit folder would be {plan.folder}")
    return "\n".join(lines)


def _progress_writer(path: str):
    """Progress as one JSON file, replaced atomically: probes answered / failed / planned, the
    p-value so far, when it was written, and an estimate of the seconds left."""
    from oml_core.files import atomic_write_json

    started = time.time()

    def write(progress: AuditProgress) -> None:
        now = time.time()
        left = progress.probes_planned - progress.probes_done - progress.probes_failed
        calls = progress.calls_this_run
        eta = (now - started) / calls * max(left, 0) if calls else None
        atomic_write_json(Path(path), {**progress.model_dump(mode="json"), "updated": now,
                                       "eta_s": eta})
    return write


def cmd_audit(args) -> int:
    from clients.audit import run_audit
    from oml_core import cli as oml_cli

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    for noisy in ("httpx", "httpx2", "openai", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    urls = args.base_urls or []
    cfg = oml_cli._config(AuditConfig, args)
    cfg = dataclasses.replace(cfg, base_url=urls[0] if urls else None)
    if len(urls) > 1:
        return _compare(args, cfg, urls)
    if args.plan_only:
        from clients.audit_preview import preview_audit

        plan = preview_audit(cfg)
        oml_cli._emit(args, plan, _human_plan(plan))
        return 0
    try:
        on_progress = _progress_writer(args.progress_file) if args.progress_file else None
        summary = run_audit(cfg, on_progress)
    except KeyboardInterrupt as exc:
        stopped = isinstance(exc, oml_cli.Terminated)
        print(f"oml audit: {'stopped by SIGTERM' if stopped else 'interrupted'}; every finished call "
              "is in evidence.jsonl - rerun the same command to resume", file=sys.stderr)
        return 143 if stopped else 130
    oml_cli._emit(args, AuditHeadline.of(summary), _human(summary))
    return EXIT_INCONCLUSIVE if summary.verdict == "inconclusive" else 0


def _compare(args, cfg: AuditConfig, urls: list[str]) -> int:
    """Several endpoints, one plan (clients.compare); exit 0 when every one reached a verdict,
    2 when one refused the requests, 3 when one was inconclusive."""
    from clients.compare import compare_endpoints, comparison_table
    from oml_core import cli as oml_cli
    from oml_core.errors import OMLInputError

    if args.plan_only:
        raise OMLInputError("--plan-only takes one --base-url; plan each endpoint alone")
    try:
        result = compare_endpoints(cfg, urls)
    except KeyboardInterrupt as exc:
        stopped = isinstance(exc, oml_cli.Terminated)
        print("oml audit: interrupted; rerun the same command to resume every endpoint",
              file=sys.stderr)
        return 143 if stopped else 130
    oml_cli._emit(args, result, comparison_table(result) + f"\nfolder: {result.folder}")
    verdicts = {row.verdict for row in result.endpoints}
    return 2 if "error" in verdicts else EXIT_INCONCLUSIVE if "inconclusive" in verdicts else 0
