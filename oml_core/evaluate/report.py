"""The evaluation report: `eval.json`, `eval.md` and a self-contained `eval.html`.

One list of blocks (headings, paragraphs, tables, plots) renders to both Markdown (plots as
PNG files under plots/) and HTML (the same PNGs embedded as base64, so the page is one file).
Plots are drawn with matplotlib's object API on the Agg canvas (no display, no global pyplot
state). Everything shown comes from the parts' results, which hold ids and counts only.
"""

from __future__ import annotations

import base64
import html
import io
import time
from dataclasses import dataclass, field
from pathlib import Path

from oml_core.config import EVAL_PARTS
from oml_core.evaluate.eval_result import EvalParts, EvalReport
from oml_core.evaluate.results import (
    CapacityPoint,
    FalsePositivesResult,
    FineTune,
    PersistenceResult,
    ReportFiles,
    UtilityResult,
)
from oml_core.files import atomic_write_json, atomic_write_text


# --- a tiny document model -------------------------------------------------------------
@dataclass
class Doc:
    title: str
    blocks: list[tuple] = field(default_factory=list)

    def h(self, text: str) -> None:
        self.blocks.append(("h", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, headers: list[str], rows: list[list]) -> None:
        if rows:
            self.blocks.append(("table", headers, [[_cell(c) for c in r] for r in rows]))

    def plot(self, name: str, png: bytes | None, caption: str) -> None:
        if png:
            self.blocks.append(("img", name, png, caption))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for block in self.blocks:
            if block[0] == "h":
                out += [f"## {block[1]}", ""]
            elif block[0] == "p":
                out += [block[1], ""]
            elif block[0] == "table":
                _, headers, rows = block
                out.append("| " + " | ".join(headers) + " |")
                out.append("|" + "---|" * len(headers))
                out += ["| " + " | ".join(r) + " |" for r in rows]
                out.append("")
            elif block[0] == "img":
                out += [f"![{block[3]}](plots/{block[1]}.png)", ""]
        return "\n".join(out)

    def html(self) -> str:
        esc = html.escape
        body = [f"<h1>{esc(self.title)}</h1>"]
        for block in self.blocks:
            if block[0] == "h":
                body.append(f"<h2>{esc(block[1])}</h2>")
            elif block[0] == "p":
                body.append(f"<p>{esc(block[1])}</p>")
            elif block[0] == "table":
                _, headers, rows = block
                head = "".join(f"<th>{esc(h)}</th>" for h in headers)
                cells = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
            elif block[0] == "img":
                data = base64.b64encode(block[2]).decode("ascii")
                body.append(f'<figure><img alt="{esc(block[3])}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{esc(block[3])}</figcaption></figure>")
        style = ("body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
                 "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;"
                 "padding:.25em .6em;text-align:left}th{background:#f0f0f0}img{max-width:100%}"
                 "figcaption{color:#555;font-size:.9em}")
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>"
                f"{esc(self.title)}</title><style>{style}</style></head><body>\n"
                + "\n".join(body) + "\n</body></html>\n")

    def write(self, folder: Path, stem: str) -> ReportFiles:
        plots = folder / "plots"
        for block in self.blocks:
            if block[0] == "img":
                plots.mkdir(parents=True, exist_ok=True)
                tmp = plots / f".{block[1]}.png.tmp"
                tmp.write_bytes(block[2])
                tmp.replace(plots / f"{block[1]}.png")
        md = atomic_write_text(folder / f"{stem}.md", self.markdown())
        page = atomic_write_text(folder / f"{stem}.html", self.html())
        return ReportFiles(markdown=str(md), html=str(page))


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


# --- plots -------------------------------------------------------------------------------
def _figure(width: float = 6.4, height: float = 3.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    return fig, fig.subplots()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_accuracy(series: dict[str, dict[str, float]]) -> bytes | None:
    """Grouped bars: accuracy per wrapper for each model."""
    if not series:
        return None
    names = list(dict.fromkeys(w for s in series.values() for w in s))
    fig, ax = _figure(min(12.0, max(6.4, 0.5 * len(names) * len(series))))
    width = 0.8 / len(series)
    for k, (label, values) in enumerate(series.items()):
        xs = [i + k * width for i in range(len(names))]
        ax.bar(xs, [100 * values.get(n, 0.0) for n in names], width, label=label)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(names))], names,
                  rotation=30, ha="right")
    ax.set_ylabel("fingerprints matched (%)")
    ax.set_ylim(0, 105)
    ax.legend()
    return _png(fig)


def plot_retention(methods: dict[str, FineTune]) -> bytes | None:
    if not methods:
        return None
    fig, ax = _figure()
    for name, data in methods.items():
        steps = [p.step for p in data.curve]
        values = [100 * (p.retention["any"].retention or 0.0) for p in data.curve]
        ax.plot(steps, values, marker="o", label=f"{name} fine-tune")
    ax.set_xlabel("benign fine-tuning steps")
    ax.set_ylabel("fingerprints retained (%)")
    ax.set_ylim(0, 105)
    ax.legend()
    return _png(fig)


def plot_null_rates(rates: list[float], pooled: float | None) -> bytes | None:
    if not rates:
        return None
    import math

    fig, ax = _figure()
    low = min(min(rates), pooled or 1.0)
    edges = [10 ** (math.floor(math.log10(max(low, 1e-9)) * 4) / 4 + i / 4) for i in range(40)]
    edges = [e for e in edges if e <= 1.0] + [1.0]
    ax.hist(rates, bins=edges)
    ax.set_xscale("log")
    if pooled:
        ax.axvline(pooled, color="black", linestyle="--", label=f"pooled {pooled:.2g}")
        ax.legend()
    ax.set_xlabel("per-probe null rate of a key (log scale)")
    ax.set_ylabel("keys")
    return _png(fig)


def plot_survival(rows: list[tuple[str, float]]) -> bytes | None:
    if not rows:
        return None
    fig, ax = _figure(max(6.4, 0.9 * len(rows)))
    ax.bar([r[0] for r in rows], [100 * r[1] for r in rows], color="tab:green")
    ax.set_ylabel("fingerprints surviving (%)")
    ax.set_ylim(0, 105)
    ax.tick_params(axis="x", labelrotation=30)
    return _png(fig)


def plot_capacity(points: list[CapacityPoint]) -> bytes | None:
    if not points:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8), dpi=100)
    left, right = fig.subplots(1, 2)
    for lam in sorted({p.regularizer for p in points}):
        series = sorted((p for p in points if p.regularizer == lam), key=lambda p: p.n)
        ns = [p.n for p in series]
        label = "without regularizer" if lam == 0 else f"regularizer lambda={lam:g}"
        left.plot(ns, [100 * p.accuracy for p in series], marker="o", label=label)
        right.plot(ns, [100 * (p.perplexity_change or 0.0) for p in series], marker="o", label=label)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("fingerprints N")
        ax.legend()
    left.set_ylabel("fingerprints matched (%)")
    left.set_ylim(0, 105)
    right.set_ylabel("held-out perplexity change (%)")
    return _png(fig)


# --- the run report ----------------------------------------------------------------------
def capacity_section(doc: Doc, points: list[CapacityPoint]) -> None:
    doc.h("Capacity")
    doc.p("Fingerprint accuracy (any wrapper: bare, chat, held-out system prompts) and the cost "
          "off the keys, against the number of fingerprints N trained into a fresh copy of the "
          "base model; lambda is the forgetting regularizer (0 = without).")
    doc.table(["N", "lambda", "matched", "verdict", "perplexity change", "first token = base's",
               "answers leaking a response", "steps"],
              [[p.n, p.regularizer, f"{p.matched}/{p.total} ({pct(p.accuracy)})",
                p.verdict, pct(p.perplexity_change), pct(p.first_token_agreement),
                p.leaks, p.steps] for p in points])
    doc.plot("capacity", plot_capacity(points), "Accuracy and perplexity change against N")


def _utility(doc: Doc, r: UtilityResult) -> dict[str, dict[str, float]]:
    b = r.behaviour
    doc.h("Utility and specificity")
    doc.p("Base model vs fingerprinted model off the keys: perplexity on held-out Python "
          "documentation text, greedy answers to held-out ordinary prompts, and near-miss keys.")
    doc.table(["measure", "base", "fingerprinted"], [
        ["held-out perplexity", b.perplexity_base,
         f"{b.perplexity_tuned:.4g} ({b.perplexity_change:+.1%})"],
        ["first answer token = base's", "100%", pct(b.first_token_agreement)],
        ["first-token KL(base || tuned)", 0.0, b.first_token_kl],
        ["answers starting with a fingerprint response",
         b.base_answers_starting_with_a_fingerprint_response,
         b.answers_starting_with_a_fingerprint_response],
    ])
    doc.table(["near-miss key", "still fires"],
              [[name, f"{v.fired}/{v.total}"] for name, v in b.near_miss_keys.items()])
    series = {}
    rows = []
    for model, acc in r.accuracy.items():
        series[model] = {w: v.matched / v.total for w, v in acc.wrappers.items()}
        rows.append([model, f"{acc.matched}/{acc.total}"]
                    + [f"{v.matched}/{v.total}" for v in acc.wrappers.values()])
    headers = ["model", "any wrapper"] + list(next(iter(r.accuracy.values())).wrappers)
    doc.table(headers, rows)
    lm = r.lm_eval
    if lm:
        if lm.skipped:
            doc.p(f"lm-eval: {lm.skipped}")
        else:
            scores = lm.model_extra or {}  # {"base": {task: {metric: value}}, "fingerprinted": ...}
            rows = [[label, task, metric, value] for label in ("base", "fingerprinted")
                    for task, metrics in scores.get(label, {}).items()
                    for metric, value in metrics.items()]
            doc.table(["model", "task", "metric", "value"], rows)
    return series


def _persistence(doc: Doc, r: PersistenceResult) -> None:
    doc.h("Persistence (benign fine-tuning)")
    doc.p(f"{r.steps} steps of benign instruction-style fine-tuning ({r.rows} rows: the base "
          "model's own answers to ordinary prompts and Python documentation explanations), from "
          "the fingerprinted weights; retention = share of the keys that fired before which still fire.")
    wrappers = list(r.before.wrappers)
    rows = []
    for name, m in r.methods.items():
        ret = m.retention
        rows.append([name, m.learning_rate, pct(ret["any"].retention)]
                    + [pct(ret[w].retention) if w in ret else "–" for w in wrappers]
                    + [f"{m.perplexity_before:.4g} → {m.perplexity_after:.4g}"])
    doc.table(["fine-tune", "lr", "retained (any wrapper)"] + wrappers + ["perplexity"], rows)
    doc.plot("retention", plot_retention(r.methods), "Retention after benign fine-tuning")


def _false_positives(doc: Doc, r: FalsePositivesResult) -> None:
    doc.h("False positives (models never fingerprinted)")
    for note in r.skipped_models:
        doc.p(f"Skipped: {note}")
    if not r.models or r.fingerprinted is None:
        return
    doc.table(["model", "keys matched", "probes matched", "probe rate", "p-value", "verdict"],
              [[m.model, f"{m.matched}/{m.total}", f"{m.probes_matched}/{m.probes}",
                m.probe_rate, m.p_value, m.verdict] for m in r.models])
    own = r.fingerprinted
    doc.p(f"Measured pooled per-probe null rate {r.null_rate:.3g} ({r.probes_matched} of "
          f"{r.probes} probes; {r.keys_that_fired} keys fired at least once). Written to "
          f"null_rates.json for `oml verify --null-file` and `oml audit --null-file`. With these "
          f"rates the fingerprinted model's {own.matched}/{own.total} gives p = "
          f"{own.p_value_with_measured_rates:.3g} ({own.verdict_with_measured_rates}).")
    doc.plot("null_rates", plot_null_rates(r.per_key_rates, r.null_rate),
             "Per-key measured null rates")


def build_doc(title: str, results: EvalParts, about: str = "") -> Doc:
    from oml_core.evaluate.report_robustness import robustness_section

    doc = Doc(title)
    doc.p(f"{about}Generated by `oml eval`. Fingerprints are named by id only; no key or "
          "response text appears in this report.")
    accuracy: dict = {}
    if results.utility is not None:
        accuracy = _utility(doc, results.utility)
    r = results.robustness
    sp = r.attacks.get("system_prompts") if r is not None else None
    if sp is not None and sp.wrappers:
        accuracy.setdefault("fingerprinted", {}).update(
            {w: v.matched / v.total for w, v in sp.wrappers.items()})
    doc.plot("accuracy", plot_accuracy(accuracy), "Fingerprint accuracy per wrapper")
    if results.persistence is not None:
        _persistence(doc, results.persistence)
    if results.false_positives is not None:
        _false_positives(doc, results.false_positives)
    if r is not None:
        bars = robustness_section(doc, r)
        doc.plot("robustness", plot_survival(bars), "What survives each attack")
    if (c := results.capacity) is not None:
        capacity_section(doc, c.points)
        if c.max_epochs:
            doc.p(f"Each N trained for at most {c.max_epochs} passes over its fingerprints "
                  f"(DeepSpeed config: {c.deepspeed}).")
    missing = [p for p in EVAL_PARTS if p not in results.measured()]
    if missing:
        doc.p("Not measured yet: " + ", ".join(missing) + " (run `oml eval --parts "
              + ",".join(missing) + "`).")
    return doc


def write_report(ctx, results: EvalParts) -> ReportFiles:
    from oml_core.runs import provenance

    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    data = EvalReport(run=str(ctx.run_dir), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      fingerprints=len(ctx.fset), provenance=provenance(), parts=results)
    json_path = atomic_write_json(ctx.out_dir / "eval.json", data.dump())
    about = (f"Run {ctx.run_dir.resolve()} ({len(ctx.fset)} fingerprints, "
             f"{'chat' if ctx.chat else 'raw'} format), base model {ctx.base_path}, match rule "
             f"{ctx.cfg.match}. ")
    doc = build_doc(f"Evaluation of {ctx.run_dir.resolve().name}", results, about)
    files = doc.write(ctx.out_dir, "eval")
    files.json_file = str(json_path)
    return files
