"""`oml eval --run DIR`: run the asked-for parts (each cached by content), then write the report.

Parts: utility (and specificity), persistence, false_positives, robustness, capacity (see their modules
and docs/evaluation.md). A part whose inputs and settings have not changed since its last run
is read from the cache instead of being recomputed; the report then shows every part that has
a result for this model and fingerprint set, whichever invocation computed it.
"""

from __future__ import annotations

import logging
import time

from oml_core.config import EVAL_PARTS, EvalConfig
from oml_core.errors import Cancelled
from oml_core.evaluate import (
    capacity,
    false_positives,
    persistence,
    robustness,
    utility,
)
from oml_core.evaluate.context import open_run, settings_of
from oml_core.evaluate.eval_result import EvalParts, EvalResult
from oml_core.evaluate.report import write_report
from oml_core.runs import RunFolder
from oml_core.settings import validate

log = logging.getLogger(__name__)

PARTS = {"utility": utility, "persistence": persistence, "false_positives": false_positives,
         "robustness": robustness, "capacity": capacity}
assert set(PARTS) == set(EVAL_PARTS)


def evaluate(cfg: EvalConfig) -> EvalResult:
    """Run the parts named in `cfg.parts` on `cfg.run`; every part's result (no secrets)."""
    validate(cfg)
    wanted = cfg.parts
    if "robustness" in wanted:
        robustness.check_settings(cfg)
    ctx = open_run(cfg)
    started = time.time()
    results, computed, reused = {}, [], []
    status = RunFolder(ctx.out_dir)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        for index, part in enumerate(wanted):
            # another process (the MCP job status) polls this: which part, how many done
            status.write_status(state=f"running {part}", step=index, total_steps=len(wanted))
            module = PARTS[part]
            settings = settings_of(cfg, module.SETTINGS)
            key = ctx.cache_key(part, settings)
            cached = None if cfg.force else ctx.cached(part, key)
            if cached is not None:
                results[part] = cached
                reused.append(part)
                continue
            log.info("eval: %s", part)
            part_started = time.time()
            result = module.run_part(ctx)
            result.seconds = round(time.time() - part_started, 1)
            result.settings = settings
            ctx.store(part, key, settings, result)
            results[part] = result
            computed.append(part)
    except BaseException as exc:  # finished parts stay cached; a rerun resumes after them
        stopped = isinstance(exc, (Cancelled, KeyboardInterrupt))  # a signal, not a fault
        status.write_status(state="cancelled" if stopped else "failed",
                            step=len(results), total_steps=len(wanted))
        raise
    for part in EVAL_PARTS:  # earlier results on these same inputs join the report
        if part not in results:
            earlier = ctx.cached(part)
            if earlier is not None:
                results[part] = earlier
    parts = EvalParts(**{p: results[p] for p in EVAL_PARTS if p in results})
    report = write_report(ctx, parts)
    status.write_status(state="completed", step=len(wanted), total_steps=len(wanted))
    return EvalResult(run=str(ctx.run_dir), out=str(ctx.out_dir), computed=computed, cached=reused,
                      parts=parts, report=report, seconds=round(time.time() - started, 1))
