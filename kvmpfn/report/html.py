"""The HTML report (``kvmpfn replay --html``, ``kvmpfn audit --format html``): one self-contained file.

The plots are inline SVG written here (a few dozen lines, no dependency, no script): they work offline and
under a Content-Security-Policy that forbids every network request, weigh a few kilobytes each, and their
interactivity is what SVG gives without script — a tooltip (``<title>``) on every point, bar and finding
marker, and each marker a link to its finding. Series come sampled from :class:`~kvmpfn.inspect.series.Sampler`
(at most 2000 points, each the maximum of its bucket of events), so a long trace gives a plot as small as a
short one.
"""

from __future__ import annotations

from html import escape

from kvmpfn.report import finding_text, provenance_text
from kvmpfn.report.explain import step_text

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
COLOURS = ("#1f77b4", "#2ca02c", "#9467bd")
STEP_LIMIT = 200  # explain steps shown per finding (the ones at fault and where it broke always)

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px}h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}.pass{color:#2a7a2a}.fail,.error{color:#b00;font-weight:bold}
.finding{border-left:4px solid #b00;padding:4px 12px;margin:12px 0;background:#fff6f6}
pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:12px}
.fault{background:#ffe9a8;font-weight:bold}.broken{background:#ffd0d0}
svg{background:#fff;border:1px solid #ddd;margin:6px 0}svg text{font:11px system-ui,sans-serif}
"""


def page(title: str, body: list[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def line_plot(points: list[tuple], names: tuple[str, ...], events: int, markers: list[tuple]) -> str:
    """Lines of ``points`` ``(x, *values)`` over ``events``; ``markers`` ``(x, label, anchor, colour)`` as links
    (red where a finding was detected, orange where explain saw its invariant first break)."""
    w, h, left, bottom, top = 900, 240, 50, 30, 24
    ymax = max((max(p[1:]) for p in points), default=0) or 1
    xmax = max(events - 1, 1)

    def x(v):
        return left + (w - left - 10) * v / xmax

    def y(v):
        return h - bottom - (h - bottom - top) * v / ymax

    out = [f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img">']
    out.append(f'<line x1="{left}" y1="{h - bottom}" x2="{w - 10}" y2="{h - bottom}" stroke="#888"/>')
    out.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="#888"/>')
    out.append(f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{ymax}</text>')
    out.append(f'<text x="{left - 4}" y="{h - bottom}" text-anchor="end">0</text>')
    out.append(f'<text x="{w - 10}" y="{h - 8}" text-anchor="end">event {xmax}</text>')
    out.append(f'<text x="{left}" y="{h - 8}">event 0</text>')
    for i, name in enumerate(names):
        # a step line: each point holds the maximum of the events since the previous one
        steps = [(points[0][0], points[0][i + 1])] if points else []
        for prev, p in zip(points, points[1:], strict=False):
            steps += [(prev[0], p[i + 1]), (p[0], p[i + 1])]
        pts = " ".join(f"{x(a):.1f},{y(b):.1f}" for a, b in steps)
        colour = COLOURS[i % len(COLOURS)]
        out.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{pts}">'
            f"<title>{escape(name)}</title></polyline>"
        )
        out.append(f'<rect x="{left + 10 + 170 * i}" y="6" width="12" height="10" fill="{colour}"/>')
        out.append(f'<text x="{left + 26 + 170 * i}" y="15">{escape(name)}</text>')
    for seq, label, anchor, colour in markers:
        mx = x(min(seq, xmax))
        out.append(
            f'<a href="#{anchor}"><line x1="{mx:.1f}" y1="{top}" x2="{mx:.1f}" y2="{h - bottom}" stroke="{colour}" '
            f'stroke-dasharray="4 3" stroke-width="2"><title>{escape(label)}</title></line></a>'
        )
    out.append("</svg>")
    return "".join(out)


def bar_plot(pairs: list[tuple[str, int]], title: str) -> str:
    """Horizontal bars, one per ``(label, value)``."""
    if not pairs:
        return f"<p>{escape(title)}: none</p>"
    w, row, left = 900, 18, 200
    h = row * len(pairs) + 30
    vmax = max(v for _, v in pairs) or 1
    out = [f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img">']
    out.append(f'<text x="4" y="14" font-weight="bold">{escape(title)}</text>')
    for i, (label, value) in enumerate(pairs):
        y = 22 + i * row
        bw = (w - left - 60) * value / vmax
        out.append(f'<text x="{left - 6}" y="{y + 12}" text-anchor="end">{escape(label)}</text>')
        out.append(
            f'<rect x="{left}" y="{y}" width="{bw:.1f}" height="{row - 4}" fill="#1f77b4">'
            f"<title>{escape(label)}: {value}</title></rect>"
        )
        out.append(f'<text x="{left + bw + 4:.1f}" y="{y + 12}">{value}</text>')
    out.append("</svg>")
    return "".join(out)


def _steps(doc: dict) -> str:
    steps = doc["steps"]
    keep = set(range(min(len(steps), STEP_LIMIT))) | set(doc["at_fault"])
    keep |= {i for i, s in enumerate(steps) if s.get("broken") or s["kind"] == "finding"}
    out = []
    for i in sorted(keep):
        s = steps[i]
        cls = "fault" if s.get("at_fault") else "broken" if s.get("broken") else ""
        out.append(f'<span class="{cls}">{escape(step_text(s))}</span>' if cls else escape(step_text(s)))
    if len(keep) < len(steps):
        out.append(f"... {len(steps) - len(keep)} more steps (kvmpfn explain shows all)")
    return "<pre>" + "\n".join(out) + "</pre>"


def trace_section(result, tracker, histories: list[dict | None], anchor: str) -> list[str]:
    """One replay: its counts, its plots and every finding with its provenance and explain history."""
    doc = tracker.doc(result)
    body = [f'<h2 id="{anchor}">{escape(result.trace)}</h2>']
    body.append(
        f"<p>{result.events} events, {escape(str(result.mmu))} MMU, kernel {escape(str(result.kernel))}; "
        f"{len(result.findings)} finding(s)</p>"
    )
    if result.error:
        body.append(f'<p class="error">{escape(result.error)}</p>')
    markers = [
        (f["seq"], f"[{i}] {f['code']} detected", f"{anchor}-f{i}", "#d00") for i, f in enumerate(result.findings, 1)
    ]
    for i, history in enumerate(histories, 1):
        broken = history and history["first_broken"]
        if broken:
            markers.append((broken["seq"], f"[{i}] first broken: {broken['broken']}", f"{anchor}-f{i}", "#f80"))
    body.append(line_plot(tracker.points, ("frames referenced", "live sptes", "shadow pages"), result.events, markers))
    body.append(bar_plot([(gpa, n) for gpa, n in doc["hottest_gpas"]], "faults per guest page (gpa), hottest"))
    kinds = [(f"{op} {res}", n) for op, results in doc["by_kind"].items() for res, n in results.items()]
    body.append(bar_plot(kinds, "events by op and result"))
    for i, finding in enumerate(result.findings, 1):
        body.append(f'<div class="finding" id="{anchor}-f{i}"><h3>[{i}] {escape(finding_text(finding))}</h3>')
        prov = finding.get("provenance") or []
        if prov:
            body.append("<ul>" + "".join(f"<li>{escape(provenance_text(p))}</li>" for p in prov) + "</ul>")
        history = histories[i - 1] if i - 1 < len(histories) else None
        if history is not None and history["steps"]:
            body.append(_steps(history))
        body.append("</div>")
    return body


def replay_report(result, tracker, histories: list[dict | None], command: str) -> str:
    """The report of one replay (``kvmpfn replay --html``); ``command``: the command line that replays it so."""
    counts = result.summary()["results"]
    body = [f"<h1>kvmpfn replay: {escape(result.trace)}</h1>", f"<p><code>{escape(command)}</code></p>"]
    body.append("<table><tr><th>result</th><th>events</th></tr>")
    body += [f"<tr><td>{escape(k)}</td><td>{n}</td></tr>" for k, n in counts.items()]
    body.append("</table>")
    body += trace_section(result, tracker, histories, "trace")
    return page(command, body)


def audit_report(report, sections: dict[str, list[str]]) -> str:
    """The gate's table, then a section for every trace with findings (``kvmpfn audit --format html``)."""
    from kvmpfn.report import diff_text

    s = report.summary()
    body = ["<h1>kvmpfn audit</h1>"]
    body.append(
        f"<p>{s['traces']} traces: {s['pass']} pass, {s['fail']} fail, {s['error']} error; {s['events']} events</p>"
    )
    body.append(
        "<table><tr><th>trace</th><th>status</th><th>events</th><th>findings</th><th>against baseline</th></tr>"
    )
    for i, o in enumerate(report.outcomes):
        name = escape(o.key)
        if o.trace in sections:
            name = f'<a href="#t{i}">{name}</a>'
        found = ", ".join(f"{c} ×{n}" for c, n in o.counts.items())
        body.append(
            f'<tr><td>{name}</td><td class="{escape(o.status.replace(" ", "-"))}">{escape(o.status.upper())}</td>'
            f"<td>{o.events}</td><td>{escape(found)}</td><td>{escape(o.error or diff_text(o))}</td></tr>"
        )
    body.append("</table>")
    for o in report.outcomes:
        body += sections.get(o.trace, [])
    return page("kvmpfn audit", body)


def inspect_trace(path: str, options, anchor: str, findings_limit: int = 20) -> list[str]:
    """Replay ``path`` with the tracker, explain its first ``findings_limit`` findings, and render its
    section."""
    from kvmpfn.inspect.series import Tracker
    from kvmpfn.replay import replay_file

    tracker = Tracker()
    result = replay_file(path, options, observer=tracker)
    histories = histories_of(path, options, result, findings_limit)
    return trace_section(result, tracker, histories, anchor)


def histories_of(path: str, options, result, limit: int = 20) -> list[dict | None]:
    """The explain history of each of the first ``limit`` findings (one more replay for all of them)."""
    from kvmpfn.inspect.history import explain_findings

    return explain_findings(path, options, result, limit)


def audit_html(report, options) -> str:
    """``kvmpfn audit --format html``: the gate's table; every trace with findings replayed again for its
    plots and explain histories."""
    sections = {}
    for i, o in enumerate(report.outcomes):
        if o.findings:
            sections[o.trace] = inspect_trace(o.trace, options, f"t{i}")
    return audit_report(report, sections)
