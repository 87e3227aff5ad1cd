"""Audit reports: report.json (everything), report.md and a self-contained report.html.

The HTML page needs nothing but a browser: styles inline, the chart an inline SVG (keys that
came back per layer), the verdict in plain words an auditor can hand to someone else. Keys and
responses appear only when the audit ran with --reveal-keys.

Three verdicts: `match`, `no_match`, and `inconclusive` when no probe got a valid answer (the
endpoint was not tested; that must never read as a clean result).
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from clients.audit_result import AuditReport, LayerTally, SequentialSummary
from oml_core.files import atomic_write_json, atomic_write_text


def verdict_words(summary: AuditReport) -> str:
    d = summary.decision
    ep = f"{summary.endpoint} (model {summary.model!r})"
    k, n = summary.matched, summary.total
    if summary.verdict == "inconclusive":
        kinds = ", ".join(f"{count} {kind}" for kind, count in
                          summary.errors_by_kind.items()) or "none sent"
        return (f"The endpoint {ep} gave no valid answer to any probe (failed calls: {kinds}), so "
                f"the audit could not test it: this is neither evidence that it serves a model "
                f"carrying these fingerprints nor that it does not. The errors are in "
                f"evidence.jsonl; fix their cause and rerun the same command to retry the failed "
                f"probes (the keys already sent stay recorded as spent).")
    sequential = d.sequential
    if sequential:
        return _sequential_words(summary, sequential, ep)
    if summary.verdict == "match":
        text = (f"The endpoint {ep} answered {k} of {n} secret fingerprint keys with the "
                f"fingerprint's response. If it served a model that was never fingerprinted with "
                f"this set, a result at least this strong would happen with probability at most "
                f"{d.p_value:.2g} (corrected for the {d.family_size} tests tried), below the "
                f"false-positive level {d.alpha:g} fixed before probing. Conclusion: the "
                f"endpoint serves a model carrying these fingerprints.")
    else:
        text = (f"The endpoint {ep} answered {k} of {n} secret fingerprint keys with the "
                f"fingerprint's response. That is not enough to claim a match at the "
                f"false-positive level {d.alpha:g} (p = {d.p_value:.2g}, corrected for the "
                f"{d.family_size} tests tried). This does not prove the model is unrelated: "
                f"fingerprints can be removed by further training or suppressed by the host.")
        if d.best_possible_p_value > d.alpha:
            text += (f" With only these answers, even all {n} keys coming back would have given "
                     f"p = {d.best_possible_p_value:.2g}, above {d.alpha:g}: this audit "
                     f"could not have shown a match, so its result says little.")
    if summary.incomplete:
        text += (f" {summary.pending} planned probe(s) did not complete (errors, timeouts or an "
                 f"interruption); rerunning the same command finishes them without repeating the "
                 f"others.")
    return text


def _sequential_words(summary: AuditReport, sequential: SequentialSummary, ep: str) -> str:
    hits, tested = sequential.hits, sequential.keys_tested
    unsent = summary.keys_not_sent
    kept = f" The other {unsent} key(s) were never sent and stay unspent." if unsent else ""
    if summary.verdict == "match":
        text = (f"The endpoint {ep} answered {hits} of the {tested} secret fingerprint keys it was "
                f"shown with the fingerprint's response. If it served a model that was never "
                f"fingerprinted with this set, evidence this strong would appear at any point of "
                f"the audit with probability at most {sequential.p_value:.2g} (an anytime-valid "
                f"bound: stopping once the evidence sufficed does not make it smaller), below the "
                f"false-positive level {sequential.alpha:g} fixed before probing. Conclusion: "
                f"the endpoint serves a model carrying these fingerprints.{kept}")
    else:
        text = (f"The endpoint {ep} answered {hits} of the {tested} secret fingerprint keys it was "
                f"shown with the fingerprint's response: not enough to claim a match at the "
                f"false-positive level {sequential.alpha:g} (anytime-valid p = "
                f"{sequential.p_value:.2g}), and the audit stopped once the keys and calls left "
                f"could no longer get there.{kept} This does not prove the model is unrelated: "
                f"fingerprints can be removed by further training or suppressed by the host; "
                f"`--exhaustive` or a larger --max-keys probes further.")
    if summary.incomplete:
        text += (f" {summary.pending} probe(s) did not complete (errors, timeouts or an "
                 f"interruption); rerunning the same command goes on without repeating the "
                 f"others.")
    return text


def _layer_rows(summary: AuditReport) -> list[tuple[str, LayerTally]]:
    return list(summary.layers.items())


def table_rows(summary: AuditReport) -> list[list[str]]:
    """One row per layer (and the pooled test): the numbers behind the verdict."""
    tests = summary.decision.tests
    rows = []
    for name, row in _layer_rows(summary):
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(row.answer_kinds.items()))
        p = tests[name].p_value if name in tests else None
        rows.append([name, str(row.matched), str(row.total), f"{row.hits}/{row.probes}",
                     str(row.errors), str(row.tokens), kinds,
                     "" if p is None else f"{p:.3g}"])
    if "any" in tests:
        t = tests["any"]
        rows.append(["any layer", str(t.matched), str(t.total), "", "", "", "",
                     f"{t.p_value:.3g}"])
    return rows


def markdown(summary: AuditReport) -> str:
    d = summary.decision
    lines = [f"# Fingerprint audit of {summary.endpoint}", "",
             f"**Verdict: {summary.verdict}** — p = {d.p_value:.3g} (alpha {d.alpha:g})", "",
             verdict_words(summary), "",
             ("| layer | keys matched | keys answered | probe hits / answers | errors | tokens "
              "| answer kinds | p (uncorrected) |"), "|---|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(summary)]
    lines += ["", f"Decision rule: {summary.rule}", "",
              (f"Null rates: {d.null_rate_source}. Keys probed: {summary.keys_probed} "
              f"(budget {summary.key_budget}; {summary.keys_passed_over} already-spent keys "
              f"passed over). Probes: {summary.probes_done} answered, {summary.probes_failed} "
              f"failed, {summary.probes_skipped} not sendable here. Tokens the endpoint "
              f"reported: {summary.tokens_reported} over every call of this audit "
              f"(retries{' and ' + str(summary.decoys_sent) + ' decoys' if summary.decoys_sent else ''} included)."), ""]
    sequential = d.sequential
    if sequential:
        lines += [(f"Sequential audit: {summary.keys_probed} keys sent, "
                   f"{summary.keys_not_sent} never sent (not spent). The verdict is the "
                   "e-value's; the per-layer p-values above describe the keys sent and decide "
                   "nothing."), "", "| key # | hit | null rate | p-value after it |", "|---|---|---|---|"]
        lines += [f"| {i} | {'-' if row.hit is None else ('yes' if row.hit else 'no')} | "
                  f"{row.null_rate:.3g} | {row.p_value:.3g} |"
                  for i, row in enumerate(sequential.curve, 1)]
        lines.append("")
    for note in summary.notes:
        lines.append(f"- {note}")
    if summary.revealed:
        lines += ["", "## Revealed keys (--reveal-keys)", "", "| id | key | response |", "|---|---|---|"]
        for fp in summary.revealed:
            lines.append(f"| {fp.id} | {fp.key} | {fp.response} |")
    lines += ["", (f"Audit {summary.audit_id}, fingerprint set {summary.set_sha256[:16]}…, "
                  f"{summary.finished}; evidence: evidence.jsonl (one line per call)."), ""]
    return "\n".join(lines)


def _svg_chart(summary: AuditReport) -> str:
    rows = _layer_rows(summary)
    if "any" in summary.decision.tests:
        t = summary.decision.tests["any"]
        rows.append(("any layer", LayerTally(matched=t.matched, total=t.total)))
    bar_w, label_w, row_h = 360, 110, 28
    height = row_h * len(rows) + 30
    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + 120}" '
             f'height="{height}" role="img" aria-label="keys matched per layer">')]
    for i, (name, row) in enumerate(rows):
        y = 10 + i * row_h
        total = max(row.total, 1)
        width = bar_w * row.matched / total
        parts.append(f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end" font-size="13">'
                     f'{html.escape(name)}</text>')
        parts.append(f'<rect x="{label_w}" y="{y}" width="{bar_w}" height="20" fill="#eee"/>')
        parts.append(f'<rect x="{label_w}" y="{y}" width="{width:.1f}" height="20" fill="#c0392b"/>')
        parts.append(f'<text x="{label_w + bar_w + 8}" y="{y + 15}" font-size="13">'
                     f'{row.matched} / {row.total} keys</text>')
    parts.append(f'<text x="{label_w}" y="{height - 4}" font-size="11" fill="#555">keys whose '
                 f'response came back, per probe layer</text></svg>')
    return "".join(parts)


def _svg_evidence_curve(sequential: SequentialSummary) -> str:
    """The sequential audit's anytime-valid p-value after each key (log scale), with the
    false-positive level it had to reach: where the curve crosses the line, the audit stopped."""
    curve = sequential.curve
    if not curve:
        return ""
    width, height, left, top, bottom = 520, 220, 60, 12, 36
    floor = min(min(row.p_value for row in curve), sequential.alpha) / 10
    decades = max(1.0, -math.log10(floor))

    def x(i: int) -> float:
        return left + (width - left - 20) * i / max(len(curve), 1)

    def y(p: float) -> float:
        return top + (height - top - bottom) * (-math.log10(max(p, floor)) / decades)

    points = [(x(0), y(1.0))] + [(x(i), y(row.p_value)) for i, row in enumerate(curve, 1)]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             'role="img" aria-label="p-value after each key">',
             f'<line x1="{left}" y1="{y(sequential.alpha):.1f}" x2="{width - 20}" '
             f'y2="{y(sequential.alpha):.1f}" stroke="#c0392b" stroke-dasharray="5 3"/>',
             f'<text x="{width - 22}" y="{y(sequential.alpha) - 4:.1f}" text-anchor="end" '
             f'font-size="11" fill="#c0392b">alpha {sequential.alpha:g}</text>',
             '<polyline fill="none" stroke="#2c3e50" stroke-width="2" points="'
             + " ".join(f"{px:.1f},{py:.1f}" for px, py in points) + '"/>']
    for i, row in enumerate(curve, 1):
        fill = "#c0392b" if row.hit else ("#bbb" if row.hit is None else "#2c3e50")
        parts.append(f'<circle cx="{x(i):.1f}" cy="{y(row.p_value):.1f}" r="3.5" '
                     f'fill="{fill}"/>')
    for p in (1.0, *(10.0 ** -k for k in range(2, int(decades) + 1, 2))):
        parts.append(f'<text x="{left - 6}" y="{y(p) + 4:.1f}" text-anchor="end" '
                     f'font-size="11">{p:g}</text>')
    parts.append(f'<text x="{left}" y="{height - 8}" font-size="11" fill="#555">keys in the '
                 f'order sent ({len(curve)}); red: the response came back</text></svg>')
    return "".join(parts)


def html_page(summary: AuditReport) -> str:
    color = {"match": "#c0392b", "inconclusive": "#b9770e"}.get(summary.verdict, "#2c3e50")
    rows = ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
            for row in table_rows(summary)]
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in summary.notes)
    d = summary.decision
    curve, deciding = "", d.deciding_test
    if d.sequential:
        deciding = "the sequential e-value over keys"
        curve = ("<h3>The evidence after each key (anytime-valid p-value)</h3>"
                 + _svg_evidence_curve(d.sequential))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Fingerprint audit: {html.escape(summary.verdict)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:900px;margin:2em auto;color:#222}}
.verdict{{border-left:6px solid {color};padding:0.6em 1em;background:#fafafa}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px}}
.small{{color:#555;font-size:12px}}</style></head><body>
<h1>Fingerprint audit of {html.escape(summary.endpoint)}</h1>
<div class="verdict"><h2>Verdict: {html.escape(summary.verdict)}</h2>
<p>{html.escape(verdict_words(summary))}</p>
<p class="small">p = {d.p_value:.3g}, false-positive level {d.alpha:g}, deciding test:
{html.escape(deciding)}</p></div>
{curve}<h3>Keys that came back, per layer</h3>
{_svg_chart(summary)}
<table><tr><th>layer</th><th>keys matched</th><th>keys answered</th><th>probe hits / answers</th>
<th>errors</th><th>tokens</th><th>answer kinds</th><th>p (uncorrected)</th></tr>{''.join(rows)}</table>
<h3>Decision rule (fixed before probing)</h3><p>{html.escape(summary.rule)}</p>
<ul>{notes}</ul>
<p class="small">Audit {html.escape(summary.audit_id)}; model {html.escape(str(summary.model))};
fingerprint set sha256 {html.escape(summary.set_sha256)}; finished {html.escape(summary.finished)};
every call is in evidence.jsonl.</p>
</body></html>
"""


def write_reports(folder: Path, summary: AuditReport) -> dict[str, str]:
    paths = {"json": folder / "report.json", "md": folder / "report.md", "html": folder / "report.html"}
    # report.json: everything but the list of report files, which it is one of
    atomic_write_json(paths["json"], summary.model_dump(mode="json", exclude={"reports"}))
    atomic_write_text(paths["md"], markdown(summary))
    atomic_write_text(paths["html"], html_page(summary))
    return {k: str(v) for k, v in paths.items()}
