"""Experiment: do the audit's pre-registered null rates hold on innocent endpoints?

Ten (or --sets) key sets made as `make demo` makes its own (16 perinucleus keys of 16 tokens,
one-token responses, the bundled model), each calibrated with `oml calibrate`, are audited
with the default (sequential) audit against models that never saw them, served by a real
`transformers serve` on loopback: the base model itself, Gemma-3-270M (unrelated) and a
benign derivative of the base (a short fine-tune on ordinary chat, made by `oml eval`'s
robustness part, the second parent of its TIES/DARE merges).

Reported: the verdicts (a `match` here is a false conviction: there must be none), and per
probe layer the empirical hit rate of the probes sent against the pre-registered rate of the
same probes (the mean of plan.json's `probe_null_rates`), with a 95% Clopper-Pearson upper
bound on the empirical rate.

A default audit sends some 20 probes, so 30 audits put a few dozen probes in most layers. The
per-layer rates are therefore also measured on every probe the audit could send (`sweep`):
each innocent model, loaded here, answers every key of every set in every probe context
(oml_core.probe_contexts: raw, user turn, 12 system prompts, 3 embeddings, multi-turn, agent
frame and its JSON field), greedily as the default audit's probes are, in batches, and the
answers are judged by the audit's rule against each probe's pre-registered rate (the same
`probe_null_rate` the audit uses). That the offline answers are the served ones is checked on
every probe the audits sent (`agreement`). calibration.svg plots the sweep's layers.
Resumable: sets, calibrations, sweeps and audit folders already on disk are reused.

    .venv/bin/python experiments/calibration_study.py --out runs/calibration-study \\
        --derivative runs/demo/eval/benign-derivative/<key>
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository root, for benchmarks.harness

from clients.audit import run_audit  # noqa: E402
from clients.config import AuditConfig  # noqa: E402
from oml_core.calibrate import calibrate_set  # noqa: E402
from oml_core.config import CalibrateConfig, GenerateConfig  # noqa: E402
from oml_core.generate import generate_set  # noqa: E402
from oml_core.fingerprints import load_fingerprints  # noqa: E402
from oml_core.inference import greedy  # noqa: E402
from oml_core.models import load_model, resolve_model  # noqa: E402
from oml_core.null_rates import GREEDY_TEMPERATURES, context_rate, probe_null_rate  # noqa: E402
from oml_core.probe_contexts import all_contexts, render  # noqa: E402
from oml_core.verify.matching import starts_with_word  # noqa: E402
from benchmarks.harness import serve, stop_server, write_result  # noqa: E402

NO_KEY_ENV = "OML_AUDIT_CALIBRATION_NONE"  # unset: no API key is sent to our own server


def calibrated_now(path: Path) -> bool:
    """The set exists and holds rates at every temperature a greedy probe uses today."""
    if not path.exists():
        return False
    held = set((load_fingerprints(path).calibration or {}).get("temperatures") or ())
    return all(f"{t:g}" in held for t in GREEDY_TEMPERATURES)


def make_sets(out: Path, seeds: list[int]) -> list[Path]:
    """Generate and calibrate each set once (the demo's generation settings); a set calibrated
    under an older rule is calibrated again."""
    paths = [out / "sets" / f"set-{seed}.json" for seed in seeds]
    todo = [(seed, path) for seed, path in zip(seeds, paths) if not calibrated_now(path)]
    if todo:
        loaded = load_model(resolve_model(None), "cpu", "float32")
        for seed, path in todo:
            t0 = time.monotonic()
            fset = (load_fingerprints(path) if path.exists() else generate_set(GenerateConfig(
                strategy="perinucleus", num_fingerprints=16, key_length=16, response_length=1,
                seed=seed), loaded))
            calibrated, _ = calibrate_set(CalibrateConfig(temperatures=[1.0]), loaded, fset)
            calibrated.save(path)
            print(f"set {seed}: generated and calibrated in {time.monotonic() - t0:.0f} s",
                  flush=True)
    return paths


# Gemma-3-270M base ships no chat template, and `transformers serve` refuses a chat request to
# a model without one; a suspect serving it would give it Gemma's turn format, written here:
# the system prompt opens the first user turn, as Gemma's instruction-tuned models take it.
GEMMA_TURNS = (
    "{{ bos_token }}{% set ns = namespace(system='') %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = m['content'] ~ '\\n\\n' %}{% else %}"
    "{{ '<start_of_turn>' ~ ('model' if m['role'] == 'assistant' else 'user') ~ '\\n' }}"
    "{% if m['role'] == 'user' %}{{ ns.system }}{% set ns.system = '' %}{% endif %}"
    "{{ m['content'] | trim }}{{ '<end_of_turn>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}\n")


def gemma_with_chat_template(out: Path) -> Path:
    """The converted Gemma-3-270M folder, linked file by file, plus GEMMA_TURNS."""
    from oml_core.evaluate.false_positives import gemma_model_dir

    source, folder = gemma_model_dir(), out / "gemma-3-270m-chat"
    folder.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if not (folder / item.name).exists():
            (folder / item.name).symlink_to(item.resolve())
    (folder / "chat_template.jinja").write_text(GEMMA_TURNS, encoding="utf-8")
    return folder


def audit_probes(folder: Path) -> list[dict]:
    """(layer, pre-registered rate, hit) of every answered probe of a finished audit."""
    plan = json.loads((folder / "plan.json").read_text())
    rates = plan["probe_null_rates"]
    latest = {}
    for line in (folder / "evidence.jsonl").read_text().splitlines():
        record = json.loads(line)
        latest[record["probe"]] = record
    return [{"layer": r["layer"], "variant": r["variant"], "key": r["fingerprint_id"],
             "rate": rates[pid], "hit": bool(r["match"])}
            for pid, r in latest.items() if r["status"] == "ok"]


def study_row(path: Path, model: str, summary: dict, seconds: float | None) -> dict:
    return {"set": path.stem, "model": model, "folder": str(path.parent.parent / "audits" /
                                                            f"{path.stem}-{model}"),
            "verdict": summary["verdict"],
            "p_value": summary["p_value"], "keys": summary["keys_probed"],
            "calls": summary["probes_done"] + summary["probes_failed"],
            "hits": summary["decision"]["sequential"]["hits"],
            "seconds": None if seconds is None else round(seconds, 1)}


def layer_of(context: str) -> str:
    """The audit layer a probe context belongs to ("system-03" -> "system")."""
    for layer in ("system", "embedded", "agent"):
        if context.startswith(layer):
            return layer
    return context


def sweep(out: Path, model: str, folder: str, sets: list[Path], answer_tokens: int = 6) -> dict:
    """Every key of every set in every probe context, answered greedily by `model`: per probe
    (set, key, context) whether the audit's `start` rule counts the answer, and its
    pre-registered rate (a greedy probe's, floored as the audit floors it). Kept in
    out/sweep-<model>.json."""
    path = out / f"sweep-{model}.json"
    if path.exists():
        return json.loads(path.read_text())
    t0 = time.monotonic()
    loaded = load_model(folder, "cpu", "float32")
    rows = [(p.stem, fp, context) for p in sets for fp in load_fingerprints(p).fingerprints
            for context in all_contexts(loaded.has_chat_template)]
    answers = greedy(loaded, [render(loaded.tokenizer, c, fp.key) for _, fp, c in rows],
                     answer_tokens, 64)
    texts = loaded.tokenizer.batch_decode(answers, skip_special_tokens=True)
    probes = [{"set": name, "key": fp.id, "context": context,
               "hit": starts_with_word(text, fp.response),
               "rate": probe_null_rate([context_rate(fp, "start", context, 0.0)], None, None)[0]}
              for (name, fp, context), text in zip(rows, texts)]
    result = {"model": model, "seconds": round(time.monotonic() - t0, 1), "probes": probes}
    write_result(path, result, device="cpu")
    print(f"sweep {model}: {len(probes)} probes in {result['seconds']} s", flush=True)
    return result


def agreement(audited: list[dict], swept: dict[str, dict]) -> dict:
    """Per layer, how many probes the audits sent got the outcome the sweep predicts (the
    agent layer's served probe also counts JSON fields: compared with the sweep's answer
    start or field)."""
    predicted = {m: {(p["set"], p["key"], p["context"]): p["hit"] for p in s["probes"]}
                 for m, s in swept.items()}
    counts: dict = defaultdict(lambda: {"same": 0, "probes": 0})
    for row in audited:
        table = predicted.get(row["model"])
        if table is None:
            continue
        for probe in audit_probes(Path(row["folder"])):
            contexts = ["agent", "agent-field"] if probe["layer"] == "agent" else [probe["variant"]]
            guess = any(table.get((row["set"], probe["key"], c), False) for c in contexts)
            cell = counts[probe["layer"]]
            cell["probes"] += 1
            cell["same"] += guess == probe["hit"]
    return dict(sorted(counts.items()))


def layer_rows(cells: dict) -> list[dict]:
    return [{"model": model, "layer": layer, "probes": c["probes"], "hits": c["hits"],
             "empirical": c["hits"] / c["probes"],
             "upper_95": clopper_pearson_upper(c["hits"], c["probes"]),
             "pre_registered": c["rate_sum"] / c["probes"], "expected_hits": c["rate_sum"]}
            for (model, layer), c in sorted(cells.items())]


def clopper_pearson_upper(hits: int, n: int, level: float = 0.95) -> float:
    """One-sided upper confidence bound on a binomial rate (bisection on the tail)."""
    if n == 0:
        return 1.0
    if hits == n:
        return 1.0
    target = 1.0 - level
    lo, hi = hits / n, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        tail = sum(math.comb(n, k) * mid ** k * (1 - mid) ** (n - k) for k in range(hits + 1))
        lo, hi = (mid, hi) if tail > target else (lo, mid)
    return hi


def svg_plot(rows: list[dict], path: Path) -> None:
    """Empirical hit rate (with its 95% upper bound) against the pre-registered rate, per layer
    and model, on log axes; points under the diagonal are conservative."""
    w, h, pad = 520, 420, 60
    lo, hi = -4.0, 0.0

    def xy(pre: float, emp: float) -> tuple[float, float]:
        fx = (math.log10(max(pre, 1e-4)) - lo) / (hi - lo)
        fy = (math.log10(max(emp, 1e-4)) - lo) / (hi - lo)
        return pad + fx * (w - 2 * pad), h - pad - fy * (h - 2 * pad)

    colors = {"base": "#1f77b4", "gemma-3-270m": "#d62728", "derivative": "#2ca02c"}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
             f'font-family="sans-serif" font-size="11">',
             f'<rect width="{w}" height="{h}" fill="white"/>']
    x0, y0 = xy(1e-4, 1e-4)
    x1, y1 = xy(1.0, 1.0)
    parts.append(f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y1}" stroke="#888" '
                 'stroke-dasharray="4 3"/>')
    for e in range(-4, 1):
        gx, gy = xy(10.0 ** e, 10.0 ** e)
        parts.append(f'<text x="{gx}" y="{h - pad + 16}" text-anchor="middle">1e{e}</text>')
        parts.append(f'<text x="{pad - 6}" y="{gy + 4}" text-anchor="end">1e{e}</text>')
    parts.append(f'<text x="{w / 2}" y="{h - 18}" text-anchor="middle">pre-registered rate '
                 '(mean over the layer\'s probes, every key of every set)</text>')
    parts.append(f'<text x="16" y="{h / 2}" transform="rotate(-90 16 {h / 2})" '
                 'text-anchor="middle">empirical hit rate (bar: 95% upper bound; 0 drawn at 1e-4)'
                 '</text>')
    for row in rows:
        color = colors.get(row["model"], "black")
        px, py = xy(row["pre_registered"], row["empirical"])
        _, uy = xy(row["pre_registered"], row["upper_95"])
        px += 7 * (list(colors).index(row["model"]) - 1) if row["model"] in colors else 0
        parts.append(f'<line x1="{px}" y1="{py}" x2="{px}" y2="{uy}" stroke="{color}"/>')
        parts.append(f'<circle cx="{px}" cy="{py}" r="3.5" fill="{color}"><title>{row["model"]} '
                     f'{row["layer"]}: {row["hits"]}/{row["probes"]}</title></circle>')
    for i, (name, color) in enumerate(colors.items()):
        parts.append(f'<circle cx="{pad + 10}" cy="{pad + 14 * i}" r="4" fill="{color}"/>'
                     f'<text x="{pad + 20}" y="{pad + 14 * i + 4}">{name}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")


def run_audits(out: Path, models: list[str], sets: list[Path], folders: dict) -> list[dict]:
    """The default audit of every set against every model, through one `transformers serve`."""
    audits = []
    proc, base_url = serve(out / "serve.log")
    try:
        for model in models:
            for path in sets:
                folder = out / "audits" / f"{path.stem}-{model}"
                t0 = time.monotonic()
                # a finished audit is kept (the server's port, part of its settings, changes
                # between runs of this script); an unfinished one is started again
                if (folder / "report.json").exists():
                    summary = json.loads((folder / "report.json").read_text())
                    if summary.get("state") == "complete":
                        audits.append(study_row(path, model, summary, None))
                        continue
                shutil.rmtree(folder, ignore_errors=True)
                summary = run_audit(AuditConfig(
                    base_url=base_url, model=str(folders[model]), fingerprints=str(path),
                    dialect="transformers", reuse_keys=True, api_key_env=NO_KEY_ENV,
                    out=str(folder), request_timeout=300.0)).model_dump(mode="json")
                audits.append(study_row(path, model, summary, time.monotonic() - t0))
                print(json.dumps(audits[-1]), flush=True)
    finally:
        stop_server(proc)
    return audits


def tally(probes) -> list[dict]:
    """layer_rows over (model, layer, hit, rate) tuples, each also counted under "all"."""
    cells = defaultdict(lambda: {"hits": 0, "probes": 0, "rate_sum": 0.0})
    for model, layer, hit, rate in probes:
        for name in (model, "all"):
            cell = cells[(name, layer)]
            cell["hits"] += hit
            cell["probes"] += 1
            cell["rate_sum"] += rate
    return layer_rows(cells)


def summarise(audits: list[dict], swept: dict) -> dict:
    layers = tally((row["model"], probe["layer"], probe["hit"], probe["rate"])
                   for row in audits for probe in audit_probes(Path(row["folder"])))
    sweep_layers = tally((model, layer_of(probe["context"]), probe["hit"], probe["rate"])
                         for model, result in swept.items() for probe in result["probes"])
    return {"audits": audits, "layers": layers, "sweep_layers": sweep_layers,
            "agreement": agreement(audits, swept),
            "sweep_seconds": {m: r["seconds"] for m, r in swept.items()},
            "greedy_temperatures": list(GREEDY_TEMPERATURES),
            "false_matches": sum(a["verdict"] == "match" for a in audits),
            "verdicts": {v: sum(a["verdict"] == v for a in audits)
                         for v in ("match", "no_match", "inconclusive")}}


def print_summary(result: dict) -> None:
    print(f"false matches: {result['false_matches']} of {len(result['audits'])} audits")
    print("sweep/audit agreement per layer:", json.dumps(result["agreement"]))
    for title, rows in (("probes the audits sent", result["layers"]),
                        ("every probe (sweep)", result["sweep_layers"])):
        print(title)
        for r in rows:
            print(f"{r['model']:>13} {r['layer']:<10} {r['hits']:>4}/{r['probes']:<5} "
                  f"empirical {r['empirical']:.4f} (95% up {r['upper_95']:.4f})  pre-registered "
                  f"{r['pre_registered']:.4f}  expected hits {r['expected_hits']:.1f}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/calibration-study")
    parser.add_argument("--sets", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=101)
    parser.add_argument("--derivative", required=True, help="benign derivative model folder")
    parser.add_argument("--gemma", default=None, help="Gemma-3-270M folder with a chat template "
                                                      "(default: oml's, with GEMMA_TURNS)")
    parser.add_argument("--models", default="base,gemma-3-270m,derivative")
    parser.add_argument("--parts", default="audits,sweep",
                        help="audits (served, the verdicts), sweep (every probe, offline), or both")
    args = parser.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    out = Path(args.out)
    (out / "sets").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OML_PROGRESS", "0")
    os.environ.pop(NO_KEY_ENV, None)
    sets = make_sets(out, list(range(args.first_seed, args.first_seed + args.sets)))
    models = [m.strip() for m in args.models.split(",")]
    folders = {"base": resolve_model(None), "derivative": args.derivative}
    if "gemma-3-270m" in models:
        folders["gemma-3-270m"] = args.gemma or str(gemma_with_chat_template(out))
    audits = run_audits(out, models, sets, folders) if "audits" in parts else []
    swept = ({model: sweep(out, model, str(folders[model]), sets) for model in models}
             if "sweep" in parts else {})
    result = summarise(audits, swept)
    write_result(out / "calibration.json", result, device="cpu")
    svg_plot([r for r in (result["sweep_layers"] or result["layers"]) if r["model"] != "all"],
             out / "calibration.svg")
    print_summary(result)
    return result

if __name__ == "__main__":
    main()
