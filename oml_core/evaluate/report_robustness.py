"""The robustness section of the evaluation report: one row per attack (per merged model),
what survives it and what it costs."""

from __future__ import annotations

from oml_core.config import ROBUSTNESS_ATTACKS
from oml_core.evaluate.attack_results import (
    Attack,
    MergedModel,
    RobustnessResult,
    ServedAttack,
)
from oml_core.evaluate.report import Doc, pct

Row = tuple[list, tuple[str, float] | None]  # a table row, and its bar in the survival plot


def robustness_section(doc: Doc, r: RobustnessResult) -> list[tuple[str, float]]:
    doc.h("Robustness (deployment changes and attacks)")
    base = r.baseline
    doc.p(f"Baseline: {base.matched}/{base.total} keys fire under the configured wrappers; "
          f"held-out perplexity {r.perplexity:.4g}. Survival = share of those keys that still fire.")
    a = r.attacks
    rows: list[Row] = (_prompt_rows(a) + _int8_rows(a) + _merge_rows(a) + _suppression_rows(a)
                       + _served_rows(a))
    doc.table(["attack", "keys firing", "survival", "utility cost"], [row for row, _ in rows])
    _merge_notes(doc, a)
    if "int8" in a:
        doc.p("int8 is a stress test: torch's dynamic int8 quantizes every Linear layer with one "
              "scale per weight tensor and per activation, which no serving stack does. How quantized models are "
              "really deployed is measured by the gguf_* attacks (`--attacks gguf_q8_0,gguf_q4_k_m`: "
              "llama.cpp's q8_0 / q4_K_M served by its OpenAI-compatible server and audited "
              "with `oml audit`).")
    return [bar for _, bar in rows if bar is not None]


def _prompt_rows(a: dict[str, Attack]) -> list[Row]:
    out: list[Row] = []
    if (s := a.get("system_prompts")) is not None:
        if s.skipped:
            out.append((["held-out system prompts", "–", "–", s.skipped], None))
        else:
            out.append(([f"{s.prompts} held-out system prompts", f"{s.matched}/{s.total}",
                         f"mean {pct(s.mean_accuracy)}, min {pct(s.min_accuracy)}", "–"],
                        ("system prompts (mean)", s.mean_accuracy)))
    if (sampling := a.get("sampling")) is not None:
        for temp, s in sampling.temperatures.items():
            out.append(([f"sampling T={temp} ({sampling.samples} samples)",
                         f"{s.keys_hit_in_any_sample}/{s.total} in any sample",
                         (f"{pct(s.sample_hit_rate_any_wrapper)} of samples; "
                          f"{s.keys_hit_in_most_samples} keys in most"), "–"],
                        (f"T={temp} per sample", s.sample_hit_rate_any_wrapper)))
    return out


def _int8_rows(a: dict[str, Attack]) -> list[Row]:
    # torch's dynamic int8 (one scale per tensor, every Linear) is how no one serves a model; it
    # stays as a stress test, and the GGUF rows are the deployment measurement
    out: list[Row] = []
    for name, label in (("int8", "int8 dynamic quantization (torch; stress test, not a deployment)"),
                        ("merge", "merge with base")):  # merge: results cached before merge_linear
        if (s := a.get(name)) is None:
            continue
        if s.skipped:
            out.append(([label, "–", "–", s.skipped], None))
            continue
        out.append(([label, f"{s.matched}/{s.total}", pct(s.survival),
                     f"perplexity {s.perplexity_change:+.1%}"], (name, s.survival or 0.0)))
    return out


def _suppression_rows(a: dict[str, Attack]) -> list[Row]:
    if (s := a.get("suppression")) is None:
        return []
    if s.skipped or s.utility_cost is None:
        return [([f"suppression (block top-{s.top_k})", "–", "–", s.skipped or "–"], None)]
    u = s.utility_cost
    return [([f"suppression (block top-{s.top_k} when p > {s.threshold:g})",
              f"{s.matched}/{s.total}", pct(s.survival),
              (f"answers unchanged {pct(u.answers_unchanged)}, first token unchanged "
               f"{pct(u.first_answer_token_unchanged)}; next-token accuracy "
               f"{pct(u.next_token_accuracy)} → {pct(u.next_token_accuracy_attacked)}")],
             ("suppression", s.survival or 0.0))]


def _served_rows(a: dict[str, Attack]) -> list[Row]:
    """Registered attacks (robustness.PLUGIN_GROUP), e.g. gguf_*: a model served and audited
    over HTTP."""
    out: list[Row] = []
    for name, s in a.items():
        if name in (*ROBUSTNESS_ATTACKS, "merge") or not isinstance(s, ServedAttack):
            continue
        if s.skipped or s.verdict is None:
            out.append(([name, "–", pct(s.survival), s.skipped or "–"], None))
            continue
        layers = ", ".join(f"{layer} {row.matched}/{row.total}" for layer, row in s.layers.items())
        cost = (f"perplexity {s.perplexity_change:+.1%}" if s.perplexity_change is not None
                else "perplexity not measured")
        out.append(([f"{name} (served, audited over HTTP)",
                     f"{s.matched}/{s.total} ({layers}); verdict {s.verdict}, "
                     f"p = {s.p_value:.3g}", pct(s.survival), cost],
                    (name, s.survival or 0.0)))
    return out


MERGE_LABELS = {"merge_slerp": "slerp with the base", "merge_ties": "TIES with a benign derivative",
                "merge_dare": "DARE with a benign derivative"}


def _merge_row(label: str, bar: str, s: MergedModel) -> Row:
    if s.skipped:
        return [label, "–", "–", s.skipped], None
    cost = (f"perplexity {s.perplexity_change:+.1%}; first token = base's "
            f"{pct(s.first_token_agreement)}")
    return [label, f"{s.matched}/{s.total}", pct(s.survival), cost], (bar, s.survival or 0.0)


def _merge_rows(a: dict[str, Attack]) -> list[Row]:
    """One row per merged model (merge_linear: one per base weight): keys firing, survival, and
    the merged model's own utility (perplexity change, first answer token = the base's)."""
    out: list[Row] = []
    if (linear := a.get("merge_linear")) is not None:
        for weight, s in linear.base_weights.items():
            out.append(_merge_row(f"linear merge with the base, w={weight}", f"linear w={weight}", s))
    for name, label in MERGE_LABELS.items():
        if (s := a.get(name)) is not None:
            t, density = getattr(s, "t", None), getattr(s, "density", None)
            detail = (f", t={t:g}" if t is not None else
                      f" ({s.method}, density {density:g})" if density is not None else "")
            out.append(_merge_row(label + detail, name.removeprefix("merge_"), s))
    return out


def _merged_models(a: dict[str, Attack], names: list[str]) -> list[MergedModel]:
    return [s for n in names for s in (a[n].base_weights.values() if n == "merge_linear"
                                       else [a[n]]) if s.tool is not None]


def _merge_notes(doc: Doc, a: dict[str, Attack]) -> None:
    """Who merged, against what the merged models' utility reads, and the benign derivative."""
    names = [n for n in ("merge_linear", *MERGE_LABELS) if n in a]
    if not names:
        return
    merged = _merged_models(a, names)
    tools = sorted({s.tool for s in merged})
    fingerprinted = next((a[n].first_token_agreement_fingerprinted for n in names), None)
    text = (f"Merges made by {', '.join(tools) or '–'}; the unmerged fingerprinted model's first "
            f"answer token equals the base's on {pct(fingerprinted)} of the held-out prompts.")
    derivative = next((a[n].derivative for n in ("merge_ties", "merge_dare")
                       if n in a and a[n].derivative is not None), None)
    if derivative:
        text += (f" The benign derivative is the base fine-tuned for {derivative.steps} steps "
                 f"(lr {derivative.learning_rate:g}) on {derivative.rows} benign rows that "
                 "hold no key.")
    notes = sorted({s.tool_note for s in merged if s.tool_note})
    doc.p(text + "".join(f" {note}." for note in notes))
