"""The results table: one Markdown column per evaluated model, built from `eval.json` files.

A column is one or more eval.json files of the same model (e.g. one `oml eval --parts
persistence` and one `--parts robustness --attacks gguf_q8_0,gguf_q4_k_m`); their parts are
joined, and their attacks too. Rows: the utility figures, the keys with no attack, one row per
attack any column measured (keys firing, verdict where the attack gives one, the attacked
model's utility), persistence, capacity and false positives. A cell whose part or attack the
column's files lack reads "not measured"; nothing is filled in from elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from oml_core.config import ROBUSTNESS_ATTACKS
from oml_core.evaluate.attack_results import Attack, RobustnessResult, ServedAttack
from oml_core.evaluate.eval_result import EvalParts, EvalReport, load_eval_report
from oml_core.evaluate.report import pct
from oml_core.evaluate.results import Check

NOT_MEASURED = "not measured"


class Column:
    """One model's results, joined from its eval.json files (later files win per part, except
    robustness, whose attacks are joined)."""

    def __init__(self, label: str, reports: Sequence[EvalReport]):
        self.label = label
        self.parts = EvalParts()
        for report in reports:
            for name, part in report.parts.measured().items():
                if name == "robustness" and self.parts.robustness is not None:
                    part = _join_attacks(self.parts.robustness, part)
                setattr(self.parts, name, part)


def _join_attacks(first: RobustnessResult, second: RobustnessResult) -> RobustnessResult:
    joined = second.model_copy(update={"attacks": {**first.attacks, **second.attacks}})
    joined.__pydantic_fields_set__.add("attacks")
    return joined


def load_columns(specs: Sequence[str], labels: Sequence[str] = ()) -> list[Column]:
    """`specs`: one per column, `PATH[+PATH...]` (eval.json files of one model); `labels`: one
    per column, or none (then each column is named after its run folder)."""
    from oml_core.errors import OMLInputError

    if labels and len(labels) != len(specs):
        raise OMLInputError(f"{len(labels)} --label for {len(specs)} columns; pass one --label "
                            "per EVAL_JSON argument, or none")
    columns = []
    for i, spec in enumerate(specs):
        reports = [load_eval_report(path) for path in spec.split("+") if path]
        if not reports:
            raise OMLInputError(f"column {i + 1} names no file; pass EVAL_JSON[+EVAL_JSON...]")
        label = labels[i] if labels else Path(reports[0].run).name or spec
        columns.append(Column(label, reports))
    return columns


# --- cells ---------------------------------------------------------------------------------
def _keys(check: Check | None) -> str:
    if check is None or check.matched is None:
        return NOT_MEASURED
    per = _per_wrapper({name: row.matched for name, row in check.wrappers.items()})
    return f"{check.matched}/{check.total}" + (f" ({per})" if per else "")


def _per_wrapper(matched: dict[str, int]) -> str:
    """'chat 16, system 15-16': the held-out system prompts as one range."""
    system = [n for name, n in matched.items() if name.startswith("system-")]
    words = [f"{name} {n}" for name, n in matched.items() if not name.startswith("system-")]
    if system:
        low, high = min(system), max(system)
        words.append(f"system {low}" if low == high else f"system {low}-{high}")
    return ", ".join(words)


def _change(value: float | None) -> str:
    return "–" if value is None else f"{value:+.1%}"


def _no_attack(parts: EvalParts) -> str:
    """Keys firing on the unattacked model, from whichever part measured it."""
    if parts.false_positives is not None and parts.false_positives.fingerprinted is not None:
        own = parts.false_positives.fingerprinted
        return (f"{_keys(own)}, `{own.verdict_with_measured_rates}` (p = "
                f"{own.p_value_with_measured_rates:.2g}, measured null rates)")
    if parts.utility is not None:
        return _keys(parts.utility.accuracy.get("fingerprinted"))
    source = parts.robustness.baseline if parts.robustness else (
        parts.persistence.before if parts.persistence else None)
    return _keys(source)


def _merged(s) -> str:
    if s.skipped:
        return f"skipped: {s.skipped}"
    return (f"{_keys(s)}; first token {pct(s.first_token_agreement)}, perplexity "
            f"{_change(s.perplexity_change)}")


def _served(s: ServedAttack) -> str:
    if s.skipped or s.verdict is None:
        return f"skipped: {s.skipped or 'no verdict'}"
    layers = ", ".join(f"{name} {row.matched}" for name, row in s.layers.items())
    return (f"{s.matched}/{s.total} ({layers}), `{s.verdict}` (p = {s.p_value:.2g}); perplexity "
            f"{_change(s.perplexity_change)}")


def _suppression(s) -> str:
    if s.skipped or s.utility_cost is None:
        return f"skipped: {s.skipped}"
    u = s.utility_cost
    return (f"{_keys(s)}; answers unchanged {pct(u.answers_unchanged)}, next-token accuracy "
            f"{pct(u.next_token_accuracy)} → {pct(u.next_token_accuracy_attacked)}")


def _attack_cell(name: str, s: Attack) -> str:
    if isinstance(s, ServedAttack):
        return _served(s)
    if s.skipped:
        return f"skipped: {s.skipped}"
    if name == "system_prompts":
        return f"{s.matched}/{s.total} in any; mean {pct(s.mean_accuracy)} per prompt"
    if name == "suppression":
        return _suppression(s)
    if name == "int8":
        return f"{_keys(s)}; perplexity {_change(s.perplexity_change)}"
    return _merged(s)


# --- rows ----------------------------------------------------------------------------------
Row = tuple[str, Callable[[EvalParts], str]]


def _utility_rows() -> list[Row]:
    def behaviour(read):
        return lambda p: NOT_MEASURED if p.utility is None else read(p.utility.behaviour)

    return [
        ("first answer token = base's", behaviour(lambda b: pct(b.first_token_agreement))),
        ("perplexity change", behaviour(lambda b: _change(b.perplexity_change))),
        ("answers opening with a fingerprint response (base)", behaviour(
            lambda b: f"{b.answers_starting_with_a_fingerprint_response} "
                      f"({b.base_answers_starting_with_a_fingerprint_response})")),
        ("keys, no attack", _no_attack),
    ]


def _attack_label(name: str, key: str | None = None) -> str:
    labels = {"system_prompts": "held-out system prompts", "int8": "torch dynamic int8",
              "merge": "linear merge with the base (old result)", "merge_slerp": "SLERP with the base",
              "merge_ties": "TIES with a benign derivative", "merge_dare": "DARE with a benign derivative",
              "suppression": "suppression (top-k blocked when confident)"}
    if name == "sampling":
        return f"sampling, T = {key}"
    if name == "merge_linear":
        return f"linear merge with the base, base weight {key}"
    return labels.get(name, f"{name} (served, `oml audit`)")


def _attack_rows(columns: Sequence[Column]) -> list[Row]:
    """One row per attack (per merge weight, per temperature) any column measured."""
    seen: dict[tuple[str, str | None], None] = {}
    for column in columns:
        r = column.parts.robustness
        for name, s in (r.attacks.items() if r else ()):
            subkeys = (list(s.base_weights) if name == "merge_linear" else
                       list(s.temperatures) if name == "sampling" else [None])
            seen.update({(name, key): None for key in subkeys})
    order = {name: i for i, name in enumerate(ROBUSTNESS_ATTACKS)}
    keys = sorted(seen, key=lambda nk: (order.get(nk[0], len(order)), nk[0], nk[1] or ""))
    return [(_attack_label(name, key), _attack_reader(name, key)) for name, key in keys]


def _attack_reader(name: str, key: str | None) -> Callable[[EvalParts], str]:
    def read(parts: EvalParts) -> str:
        s = parts.robustness.attacks.get(name) if parts.robustness else None
        if s is None:
            return NOT_MEASURED
        if name == "merge_linear":
            return _merged(s.base_weights[key]) if key in s.base_weights else NOT_MEASURED
        if name == "sampling":
            t = s.temperatures.get(key)
            return NOT_MEASURED if t is None else (
                f"{t.keys_hit_in_any_sample}/{t.total} in any of {s.samples} samples; "
                f"{pct(t.sample_hit_rate_any_wrapper)} of samples")
        return _attack_cell(name, s)
    return read


def _persistence(parts: EvalParts, method: str) -> str:
    p = parts.persistence
    m = p.methods.get(method) if p else None
    if m is None:
        return NOT_MEASURED
    curve = ", ".join(f"{point.step}: {point.matched}" for point in m.curve[1:])
    return (f"{m.after.matched}/{m.after.total} after {p.steps} steps (retention "
            f"{pct(m.retention['any'].retention)}; keys at step {curve})")


def _capacity(parts: EvalParts) -> str:
    if parts.capacity is None:
        return NOT_MEASURED
    return "; ".join(f"N = {p.n}, λ = {p.regularizer:g}: {p.matched}/{p.total}, perplexity "
                     f"{_change(p.perplexity_change)}" for p in parts.capacity.points)


def _false_positives(parts: EvalParts) -> str:
    f = parts.false_positives
    if f is None:
        return NOT_MEASURED
    models = "; ".join(f"{m.model} {m.matched}/{m.total} `{m.verdict}`" for m in f.models)
    rate = f", pooled null rate {f.null_rate:.2g}" if f.null_rate is not None else ""
    return (models or f.note or "no model run") + rate


def _tail_rows() -> list[Row]:
    return [
        ("LoRA fine-tuning", lambda p: _persistence(p, "lora")),
        ("full fine-tuning", lambda p: _persistence(p, "full")),
        ("capacity", _capacity),
        ("false positives (models never fingerprinted)", _false_positives),
    ]


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def results_table(columns: Sequence[Column]) -> str:
    """The Markdown table: a row per figure, a column per model."""
    rows = _utility_rows() + _attack_rows(columns) + _tail_rows()
    lines = ["| | " + " | ".join(_escape(c.label) for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    lines += ["| " + " | ".join([label] + [_escape(read(c.parts)) for c in columns]) + " |"
              for label, read in rows]
    return "\n".join(lines) + "\n"
