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

from oml_core.config import EVAL_PARTS, ROBUSTNESS_ATTACKS
from oml_core.files import atomic_write_json, atomic_write_text

FORMAT = "oml-eval"
VERSION = 1


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

    def write(self, folder: Path, stem: str) -> dict:
        plots = folder / "plots"
        for block in self.blocks:
            if block[0] == "img":
                plots.mkdir(parents=True, exist_ok=True)
                tmp = plots / f".{block[1]}.png.tmp"
                tmp.write_bytes(block[2])
                tmp.replace(plots / f"{block[1]}.png")
        md = atomic_write_text(folder / f"{stem}.md", self.markdown())
        page = atomic_write_text(folder / f"{stem}.html", self.html())
        return {"markdown": str(md), "html": str(page)}


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


def plot_retention(methods: dict) -> bytes | None:
    if not methods:
        return None
    fig, ax = _figure()
    for name, data in methods.items():
        steps = [p["step"] for p in data["curve"]]
        values = [100 * (p["retention"]["any"]["retention"] or 0.0) for p in data["curve"]]
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


def plot_capacity(points: list[dict]) -> bytes | None:
    if not points:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8), dpi=100)
    left, right = fig.subplots(1, 2)
    for lam in sorted({p["regularizer"] for p in points}):
        series = sorted((p for p in points if p["regularizer"] == lam), key=lambda p: p["n"])
        ns = [p["n"] for p in series]
        label = "without regularizer" if lam == 0 else f"regularizer lambda={lam:g}"
        left.plot(ns, [100 * p["accuracy"] for p in series], marker="o", label=label)
        right.plot(ns, [100 * (p["perplexity_change"] or 0.0) for p in series], marker="o", label=label)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("fingerprints N")
        ax.legend()
    left.set_ylabel("fingerprints matched (%)")
    left.set_ylim(0, 105)
    right.set_ylabel("held-out perplexity change (%)")
    return _png(fig)


# --- the run report ----------------------------------------------------------------------
def capacity_section(doc: Doc, points: list[dict]) -> None:
    doc.h("Capacity")
    doc.p("Fingerprint accuracy (any wrapper: bare, chat, held-out system prompts) and the cost "
          "off the keys, against the number of fingerprints N trained into a fresh copy of the "
          "base model; lambda is the forgetting regularizer (0 = without).")
    doc.table(["N", "lambda", "matched", "verdict", "perplexity change", "first token = base's",
               "answers leaking a response", "steps"],
              [[p["n"], p["regularizer"], f"{p['matched']}/{p['total']} ({pct(p['accuracy'])})",
                p["verdict"], pct(p["perplexity_change"]), pct(p["first_token_agreement"]),
                p["leaks"], p["steps"]] for p in points])
    doc.plot("capacity", plot_capacity(points), "Accuracy and perplexity change against N")


def _utility(doc: Doc, r: dict) -> dict[str, dict[str, float]]:
    b = r["behaviour"]
    doc.h("Utility and specificity")
    doc.p("Base model vs fingerprinted model off the keys: perplexity on held-out Python "
          "documentation text, greedy answers to held-out ordinary prompts, and near-miss keys.")
    doc.table(["measure", "base", "fingerprinted"], [
        ["held-out perplexity", b["perplexity_base"],
         f"{b['perplexity_tuned']:.4g} ({b['perplexity_change']:+.1%})"],
        ["first answer token = base's", "100%", pct(b["first_token_agreement"])],
        ["first-token KL(base || tuned)", 0.0, b["first_token_kl"]],
        ["answers starting with a fingerprint response",
         b["base_answers_starting_with_a_fingerprint_response"],
         b["answers_starting_with_a_fingerprint_response"]],
    ])
    doc.table(["near-miss key", "still fires"],
              [[name, f"{v['fired']}/{v['total']}"] for name, v in b["near_miss_keys"].items()])
    series = {}
    rows = []
    for model, acc in r["accuracy"].items():
        series[model] = {w: v["matched"] / v["total"] for w, v in acc["wrappers"].items()}
        rows.append([model, f"{acc['matched']}/{acc['total']}"]
                    + [f"{v['matched']}/{v['total']}" for v in acc["wrappers"].values()])
    headers = ["model", "any wrapper"] + list(next(iter(r["accuracy"].values()))["wrappers"])
    doc.table(headers, rows)
    lm = r.get("lm_eval")
    if lm:
        if "skipped" in lm:
            doc.p(f"lm-eval: {lm['skipped']}")
        else:
            rows = [[label, task, metric, value] for label in ("base", "fingerprinted")
                    for task, metrics in lm.get(label, {}).items() for metric, value in metrics.items()]
            doc.table(["model", "task", "metric", "value"], rows)
    return series


def _persistence(doc: Doc, r: dict) -> None:
    doc.h("Persistence (benign fine-tuning)")
    doc.p(f"{r['steps']} steps of benign instruction-style fine-tuning ({r['rows']} rows: the base "
          "model's own answers to ordinary prompts and Python documentation explanations), from "
          "the fingerprinted weights; retention = share of the keys that fired before which still fire.")
    wrappers = list(r["before"]["wrappers"])
    rows = []
    for name, m in r["methods"].items():
        ret = m["retention"]
        rows.append([name, m["learning_rate"], pct(ret["any"]["retention"])]
                    + [pct(ret[w]["retention"]) for w in wrappers]
                    + [f"{m['perplexity_before']:.4g} → {m['perplexity_after']:.4g}"])
    doc.table(["fine-tune", "lr", "retained (any wrapper)"] + wrappers + ["perplexity"], rows)
    doc.plot("retention", plot_retention(r["methods"]), "Retention after benign fine-tuning")


def _false_positives(doc: Doc, r: dict) -> None:
    doc.h("False positives (models never fingerprinted)")
    for note in r.get("skipped_models", []):
        doc.p(f"Skipped: {note}")
    if not r.get("models"):
        return
    doc.table(["model", "keys matched", "probes matched", "probe rate", "p-value", "verdict"],
              [[m["model"], f"{m['matched']}/{m['total']}", f"{m['probes_matched']}/{m['probes']}",
                m["probe_rate"], m["p_value"], m["verdict"]] for m in r["models"]])
    own = r["fingerprinted"]
    doc.p(f"Measured pooled per-probe null rate {r['null_rate']:.3g} ({r['probes_matched']} of "
          f"{r['probes']} probes; {r['keys_that_fired']} keys fired at least once). Written to "
          f"null_rates.json for `oml verify --null-file` and `oml audit --null-file`. With these "
          f"rates the fingerprinted model's {own['matched']}/{own['total']} gives p = "
          f"{own['p_value_with_measured_rates']:.3g} ({own['verdict_with_measured_rates']}).")
    doc.plot("null_rates", plot_null_rates(r["per_key_rates"], r.get("null_rate")),
             "Per-key measured null rates")


def _robustness(doc: Doc, r: dict) -> list[tuple[str, float]]:
    doc.h("Robustness (deployment changes and attacks)")
    base = r["baseline"]
    doc.p(f"Baseline: {base['matched']}/{base['total']} keys fire under the configured wrappers; "
          f"held-out perplexity {r['perplexity']:.4g}. Survival = share of those keys that still fire.")
    rows, bars = [], []
    a = r["attacks"]
    if "system_prompts" in a:
        s = a["system_prompts"]
        if "skipped" in s:
            rows.append(["held-out system prompts", "–", "–", s["skipped"]])
        else:
            rows.append([f"{s['prompts']} held-out system prompts", f"{s['matched']}/{s['total']}",
                         f"mean {pct(s['mean_accuracy'])}, min {pct(s['min_accuracy'])}", "–"])
            bars.append(("system prompts (mean)", s["mean_accuracy"]))
    if "sampling" in a:
        for temp, s in a["sampling"]["temperatures"].items():
            rows.append([f"sampling T={temp} ({a['sampling']['samples']} samples)",
                         f"{s['keys_hit_in_any_sample']}/{s['total']} in any sample",
                         (f"{pct(s['sample_hit_rate_any_wrapper'])} of samples; "
                          f"{s['keys_hit_in_most_samples']} keys in most"), "–"])
            bars.append((f"T={temp} per sample", s["sample_hit_rate_any_wrapper"]))
    # torch's dynamic int8 (one scale per tensor, every Linear) is how no one serves a model; it
    # stays as a stress test, and the GGUF rows below are the deployment measurement
    for name, label in (("int8", "int8 dynamic quantization (torch; stress test, not a deployment)"),
                        ("merge", "merge with base")):
        if name in a:
            s = a[name]
            if "skipped" in s:
                rows.append([label, "–", "–", s["skipped"]])
                continue
            rows.append([label, f"{s['matched']}/{s['total']}", pct(s["survival"]),
                         f"perplexity {s['perplexity_change']:+.1%}"])
            bars.append((name, s["survival"] or 0.0))
    merged = _merge_rows(a)
    rows += [row for row, _ in merged]
    bars += [bar for _, bar in merged if bar is not None]
    if "suppression" in a:
        s = a["suppression"]
        u = s["utility_cost"]
        rows.append([f"suppression (block top-{s['top_k']} when p > {s['threshold']:g})",
                     f"{s['matched']}/{s['total']}", pct(s["survival"]),
                     (f"answers unchanged {pct(u['answers_unchanged'])}, first token unchanged "
                      f"{pct(u['first_answer_token_unchanged'])}; next-token accuracy "
                      f"{pct(u['next_token_accuracy'])} → {pct(u['next_token_accuracy_attacked'])}")])
        bars.append(("suppression", s["survival"] or 0.0))
    served = _served_rows(a)
    rows += [row for row, _ in served]
    bars += [bar for _, bar in served if bar is not None]
    doc.table(["attack", "keys firing", "survival", "utility cost"], rows)
    _merge_notes(doc, a)
    if "int8" in a:
        doc.p("int8 is a stress test: torch's dynamic int8 quantizes every Linear layer with one "
              "scale per weight tensor and per activation, which no serving stack does. How quantized models are "
              "really deployed is measured by the gguf_* attacks (`--attacks gguf_q8_0,gguf_q4_k_m`: "
              "llama.cpp's q8_0 / q4_K_M served by its OpenAI-compatible server and audited "
              "with `oml audit`).")
    return bars


def _served_rows(a: dict) -> list[tuple[list, tuple[str, float] | None]]:
    """Registered attacks (robustness.PLUGIN_GROUP), e.g. gguf_*: a model served and audited
    over HTTP."""
    out = []
    for name, s in a.items():
        if name in (*ROBUSTNESS_ATTACKS, "merge") or not isinstance(s, dict):  # merge: old name
            continue
        if "skipped" in s or "verdict" not in s:
            out.append(([name, "–", pct(s.get("survival")), s.get("skipped", "–")], None))
            continue
        layers = ", ".join(f"{layer} {row['matched']}/{row['total']}"
                           for layer, row in s["layers"].items())
        cost = (f"perplexity {s['perplexity_change']:+.1%}" if "perplexity_change" in s
                else "perplexity not measured")
        out.append(([f"{name} (served, audited over HTTP)",
                     f"{s['matched']}/{s['total']} ({layers}); verdict {s['verdict']}, "
                     f"p = {s['p_value']:.3g}", pct(s.get("survival")), cost],
                    (name, s.get("survival") or 0.0)))
    return out


MERGE_LABELS = {"merge_slerp": "slerp with the base", "merge_ties": "TIES with a benign derivative",
                "merge_dare": "DARE with a benign derivative"}


def _merge_rows(a: dict) -> list[tuple[list, tuple[str, float] | None]]:
    """One row per merged model (merge_linear: one per base weight): keys firing, survival, and
    the merged model's own utility (perplexity change, first answer token = the base's)."""
    out = []

    def row(label: str, bar: str, s: dict) -> None:
        if "skipped" in s:
            out.append(([label, "–", "–", s["skipped"]], None))
            return
        cost = (f"perplexity {s['perplexity_change']:+.1%}; first token = base's "
                f"{pct(s['first_token_agreement'])}")
        out.append(([label, f"{s['matched']}/{s['total']}", pct(s["survival"]), cost],
                     (bar, s["survival"] or 0.0)))

    if "merge_linear" in a:
        for weight, s in a["merge_linear"]["base_weights"].items():
            row(f"linear merge with the base, w={weight}", f"linear w={weight}", s)
    for name, label in MERGE_LABELS.items():
        if name in a:
            s = a[name]
            detail = (f", t={s['t']:g}" if "t" in s else
                      f" ({s['method']}, density {s['density']:g})" if "density" in s else "")
            row(label + detail, name.removeprefix("merge_"), s)
    return out


def _merge_notes(doc: Doc, a: dict) -> None:
    """Who merged, against what the merged models' utility reads, and the benign derivative."""
    names = [n for n in ("merge_linear", *MERGE_LABELS) if n in a]
    if not names:
        return
    merged = [s for n in names for s in (a[n]["base_weights"].values() if n == "merge_linear"
                                         else [a[n]]) if "tool" in s]
    tools = sorted({s["tool"] for s in merged})
    fingerprinted = next((a[n].get("first_token_agreement_fingerprinted") for n in names), None)
    text = (f"Merges made by {', '.join(tools) or '–'}; the unmerged fingerprinted model's first "
            f"answer token equals the base's on {pct(fingerprinted)} of the held-out prompts.")
    derivative = next((a[n]["derivative"] for n in ("merge_ties", "merge_dare")
                       if n in a and "derivative" in a[n]), None)
    if derivative:
        text += (f" The benign derivative is the base fine-tuned for {derivative['steps']} steps "
                 f"(lr {derivative['learning_rate']:g}) on {derivative['rows']} benign rows that "
                 "hold no key.")
    notes = sorted({s["tool_note"] for s in merged if "tool_note" in s})
    doc.p(text + "".join(f" {note}." for note in notes))


def build_doc(title: str, results: dict, about: str = "") -> Doc:
    doc = Doc(title)
    doc.p(f"{about}Generated by `oml eval`. Fingerprints are named by id only; no key or "
          "response text appears in this report.")
    accuracy: dict = {}
    if "utility" in results:
        accuracy = _utility(doc, results["utility"])
    if "robustness" in results and "system_prompts" in results["robustness"]["attacks"]:
        sp = results["robustness"]["attacks"]["system_prompts"]
        if "wrappers" in sp:
            accuracy.setdefault("fingerprinted", {}).update(
                {w: v["matched"] / v["total"] for w, v in sp["wrappers"].items()})
    doc.plot("accuracy", plot_accuracy(accuracy), "Fingerprint accuracy per wrapper")
    if "persistence" in results:
        _persistence(doc, results["persistence"])
    if "false_positives" in results:
        _false_positives(doc, results["false_positives"])
    if "robustness" in results:
        bars = _robustness(doc, results["robustness"])
        doc.plot("robustness", plot_survival(bars), "What survives each attack")
    if "capacity" in results:
        c = results["capacity"]
        capacity_section(doc, c["points"])
        if c.get("max_epochs"):
            doc.p(f"Each N trained for at most {c['max_epochs']} passes over its fingerprints "
                  f"(DeepSpeed config: {c.get('deepspeed')}).")
    missing = [p for p in EVAL_PARTS if p not in results]
    if missing:
        doc.p("Not measured yet: " + ", ".join(missing) + " (run `oml eval --parts "
              + ",".join(missing) + "`).")
    return doc


def write_report(ctx, results: dict) -> dict:
    from oml_core.runs import provenance

    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    data = {"format": FORMAT, "version": VERSION, "run": str(ctx.run_dir),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "fingerprints": len(ctx.fset),
            "provenance": provenance(), "parts": results}
    json_path = atomic_write_json(ctx.out_dir / "eval.json", data)
    about = (f"Run {ctx.run_dir.resolve()} ({len(ctx.fset)} fingerprints, "
             f"{'chat' if ctx.chat else 'raw'} format), base model {ctx.base_path}, match rule "
             f"{ctx.cfg.match}. ")
    doc = build_doc(f"Evaluation of {ctx.run_dir.resolve().name}", results, about)
    return {"json": str(json_path), **doc.write(ctx.out_dir, "eval")}
