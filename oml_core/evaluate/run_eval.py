"""`oml eval --run DIR`: run the asked-for parts (each cached by content), then write the report.

Parts: utility (and specificity), persistence, false_positives, robustness, capacity (see their modules
and docs/evaluation.md). A part whose inputs and settings have not changed since its last run
is read from the cache instead of being recomputed; the report then shows every part that has
a result for this model and fingerprint set, whichever invocation computed it.
"""

from __future__ import annotations

import logging
import time

from oml_core.config import EVAL_PARTS, EvalConfig, parse_list, validate
from oml_core.errors import Cancelled
from oml_core.evaluate import (
    capacity,
    false_positives,
    persistence,
    robustness,
    utility,
)
from oml_core.evaluate.context import open_run, settings_of
from oml_core.evaluate.report import write_report
from oml_core.runs import RunFolder

log = logging.getLogger(__name__)

PARTS = {"utility": utility, "persistence": persistence, "false_positives": false_positives,
         "robustness": robustness, "capacity": capacity}
assert set(PARTS) == set(EVAL_PARTS)


def evaluate(cfg: EvalConfig) -> dict:
    """Run the parts named in `cfg.parts` on `cfg.run`; returns a summary (no secrets)."""
    validate(cfg)
    wanted = parse_list(cfg.parts, "--parts", EVAL_PARTS)
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
            result["seconds"] = round(time.time() - part_started, 1)
            result["settings"] = settings
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
    report = write_report(ctx, {p: results[p] for p in EVAL_PARTS if p in results})
    status.write_status(state="completed", step=len(wanted), total_steps=len(wanted))
    return {"run": str(ctx.run_dir), "out": str(ctx.out_dir), "computed": computed, "cached": reused,
            "parts": results, "report": report, "seconds": round(time.time() - started, 1)}


def headlines(parts: dict) -> dict:
    """The few numbers per part a person reads first (the full results are in eval.json)."""
    out: dict = {}
    u = parts.get("utility")
    if u:
        b, acc = u["behaviour"], u["accuracy"]
        out["utility"] = {
            "perplexity_base": b["perplexity_base"], "perplexity_tuned": b["perplexity_tuned"],
            "perplexity_change": b["perplexity_change"], "first_token_agreement": b["first_token_agreement"],
            "answers_starting_with_a_fingerprint_response": b["answers_starting_with_a_fingerprint_response"],
            "matched": acc["fingerprinted"]["matched"], "base_matched": acc["base"]["matched"],
            "total": acc["fingerprinted"]["total"]}
    p = parts.get("persistence")
    if p:
        out["persistence"] = {"steps": p["steps"], **{
            f"{name}_retention": m["retention"]["any"]["retention"] for name, m in p["methods"].items()}}
    f = parts.get("false_positives")
    if f:
        out["false_positives"] = {
            "models": {m["model"]: {"matched": m["matched"], "total": m["total"], "verdict": m["verdict"]}
                       for m in f["models"]},
            "skipped": f.get("skipped_models", []), "null_rate": f.get("null_rate"),
            "null_file": f.get("null_file")}
    r = parts.get("robustness")
    if r:
        a, row = r["attacks"], {}
        if "system_prompts" in a and "mean_accuracy" in a["system_prompts"]:
            row["system_prompts_mean_accuracy"] = a["system_prompts"]["mean_accuracy"]
        for temp, s in a.get("sampling", {}).get("temperatures", {}).items():
            row[f"sampling_T{temp}_sample_hit_rate"] = s["sample_hit_rate_any_wrapper"]
        for name in ("int8", "merge", "merge_slerp", "merge_ties", "merge_dare", "suppression"):
            if name in a and "survival" in a[name]:  # merge: results cached before merge_linear
                row[f"{name}_survival"] = a[name]["survival"]
        for weight, s in a.get("merge_linear", {}).get("base_weights", {}).items():
            if "survival" in s:
                row[f"merge_linear_w{weight}_survival"] = s["survival"]
        for name, s in a.items():  # attacks that audit a served copy (e.g. gguf_q8_0)
            if isinstance(s, dict) and "verdict" in s:
                row[f"{name}_matched"] = s["matched"] / s["total"] if s["total"] else None
                row[f"{name}_verdict"] = s["verdict"]
                row[f"{name}_survival"] = s.get("survival")
        if "suppression" in a and "utility_cost" in a["suppression"]:
            row["suppression_answers_unchanged"] = a["suppression"]["utility_cost"]["answers_unchanged"]
        out["robustness"] = row
    c = parts.get("capacity")
    if c:
        out["capacity"] = [{"n": p["n"], "regularizer": p["regularizer"], "accuracy": p["accuracy"],
                            "perplexity_change": p["perplexity_change"]} for p in c["points"]]
    return out
