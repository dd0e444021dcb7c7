"""``--html FILE``: one self-contained page, inline SVG charts, nothing loaded from anywhere.

The page's Content-Security-Policy forbids every fetch and every script (``default-src 'none'``),
so even a value that got past escaping could not load or run anything. Every value from the
event file (user names, commands, addresses: an attacker chose them) goes through :func:`h`.
Elements carry ``data-*`` attributes with the raw numbers, for tests and for anyone scraping it.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from typing import Any

from pop3shield import __version__
from pop3shield.eventview.aggregate import Aggregate
from pop3shield.events import rfc3339
from pop3shield.logsetup import escape

PALETTE = ("#d62728", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
ACTION_COLOURS = {"prevent": "#d62728", "detect": "#ff7f0e"}

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:24px 0 8px}
.totals{display:flex;gap:24px;margin:12px 0}.totals div{background:#f3f3f3;padding:8px 14px;border-radius:4px}
.totals b{display:block;font-size:22px}
.row{display:flex;flex-wrap:wrap;gap:32px}
svg text{font:11px sans-serif;fill:#333}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ddd;padding:3px 6px;text-align:left;
vertical-align:top}th{background:#f3f3f3}td.time{white-space:nowrap}td.cmd{font-family:monospace;max-width:420px;overflow-wrap:anywhere}
.legend span{display:inline-block;margin-right:14px}.legend i{display:inline-block;width:10px;height:10px;
margin-right:4px}.muted{color:#777}
"""


def h(value: Any) -> str:
    """A value from the file as HTML text or attribute: controls escaped, then markup escaped."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=True)
    return html.escape(escape(text), quote=True)


def _colours(names: Sequence[str]) -> dict[str, str]:
    return {name: PALETTE[index % len(PALETTE)] for index, name in enumerate(names)}


def time_chart(agg: Aggregate, colours: dict[str, str], width: int = 760, height: int = 220) -> str:
    start, step, buckets = agg.histogram.rebin(60)
    left, bottom, top = 48, 30, 10
    plot_w, plot_h = width - left - 10, height - bottom - top
    parts = [f'<svg id="chart-time" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="security events over time by protection" data-bucket-seconds="{step:g}">']
    if not buckets:
        parts.append(f'<text x="{left}" y="{height // 2}">no security events</text></svg>')
        return "".join(parts)
    most = max(sum(c.values()) for _, c in buckets) or 1
    bar_w = plot_w / len(buckets)
    parts.append(f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#999"/>')
    parts.append(f'<text x="{left - 6}" y="{top + 10}" text-anchor="end">{most}</text>'
                 f'<text x="{left - 6}" y="{top + plot_h}" text-anchor="end">0</text>')
    for index, (when, counts) in enumerate(buckets):
        x = left + index * bar_w
        y = top + plot_h
        total = sum(counts.values())
        parts.append(f'<g class="bucket" data-start="{rfc3339(when)}" data-count="{total}">')
        for protection in colours:
            n = counts.get(protection, 0)
            if not n:
                continue
            seg = n * plot_h / most
            y -= seg
            parts.append(f'<rect class="segment" data-protection="{h(protection)}" data-count="{n}" '
                         f'x="{x + 0.5:.1f}" y="{y:.1f}" width="{max(1.0, bar_w - 1):.1f}" height="{seg:.1f}" '
                         f'fill="{colours[protection]}"><title>{h(protection)}: {n} from '
                         f'{rfc3339(when)}</title></rect>')
        parts.append("</g>")
    for index in (0, len(buckets) - 1) if len(buckets) > 1 else (0,):
        x = left + index * bar_w + (bar_w if index else 0)
        anchor = "end" if index else "start"
        label = rfc3339(buckets[index][0] + (step if index else 0))[:19 if step < 60 else 16].replace("T", " ")
        parts.append(f'<text x="{x:.1f}" y="{height - 10}" text-anchor="{anchor}">{label}</text>')
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(chart_id: str, label: str, items: list[tuple[str, int]], colour: dict[str, str] | str,
              width: int = 360) -> str:
    row, left = 22, 150
    height = max(row, row * len(items)) + 8
    parts = [f'<svg id="{chart_id}" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="{h(label)}">']
    if not items:
        parts.append(f'<text x="4" y="16">none</text></svg>')
        return "".join(parts)
    most = max(n for _, n in items) or 1
    for index, (key, n) in enumerate(items):
        y = 4 + index * row
        bar = max(1.0, n * (width - left - 60) / most)
        fill = colour.get(key, "#1f77b4") if isinstance(colour, dict) else colour
        shown = key if len(key) <= 22 else key[:21] + "\u2026"
        parts.append(f'<g class="item" data-key="{h(key)}" data-count="{n}">'
                     f'<text x="{left - 6}" y="{y + 14}" text-anchor="end">{h(shown)}</text>'
                     f'<rect class="bar" x="{left}" y="{y + 2}" width="{bar:.1f}" height="{row - 6}" fill="{fill}">'
                     f'<title>{h(key)}: {n}</title></rect>'
                     f'<text x="{left + bar + 4:.1f}" y="{y + 14}">{n}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def render(agg: Aggregate, sources: Sequence[str], top: int = 10) -> str:
    protections = [name for name, _ in agg.by_protection()]
    series = list(dict.fromkeys([*protections, *agg.histogram.series]))
    colours = _colours(series)
    span = (f"{rfc3339(agg.first)} to {rfc3339(agg.last)}" if agg.first is not None and agg.last is not None
            else "no times")
    legend = "".join(f'<span><i style="background:{colours[p]}"></i>{h(p)}</span>' for p in series)
    rows = []
    for data in reversed(agg.latest):
        client = data.get("client") if isinstance(data.get("client"), dict) else {}
        rows.append("<tr>" + "".join(f"<td{cls}>{h(value)}</td>" for cls, value in (
            (' class="time"', data.get("time")), ("", data.get("action")), ("", data.get("protection")),
            ("", client.get("address")), ("", data.get("user") if data.get("user") is not None else "-"),
            (' class="cmd"', data.get("command") if data.get("command") is not None else "-"),
            ("", data.get("attack_info")), ("", data.get("session")))) + "</tr>")
    combos = "".join(f'<tr data-protection="{h(p)}" data-action="{h(a)}"><td>{h(p)}</td><td>{h(a)}</td>'
                     f'<td class="n">{n}</td></tr>' for (p, a), n in agg.by_protection_action.most_common())
    files = ", ".join(h(name) for name in sources)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<meta name="referrer" content="no-referrer">
<title>pop3shield security events</title><style>{STYLE}</style></head>
<body>
<h1>pop3shield security events</h1>
<div class="muted">{files} &middot; {h(span)} &middot; pop3shield {h(__version__)}</div>
<div class="totals">
<div>security events<b id="total-security">{agg.security}</b></div>
<div>records<b id="total-records">{agg.records}</b></div>
<div>suppressed by the rate limit<b id="total-suppressed">{agg.suppressed}</b></div>
<div>malformed lines<b id="total-malformed">{agg.malformed}</b></div>
</div>
<h2>Security events over time, by protection</h2>
<div class="legend">{legend}</div>
{time_chart(agg, colours)}
<div class="row">
<div><h2>By action</h2>{bar_chart("chart-actions", "security events by action", agg.by_action.most_common(),
                                   ACTION_COLOURS)}</div>
<div><h2>Top sources</h2>{bar_chart("chart-sources", "top sources", agg.sources.most_common(top), "#1f77b4")}</div>
<div><h2>By protection and action</h2><table id="by-protection-action"><tr><th>protection</th><th>action</th>
<th>events</th></tr>{combos}</table></div>
</div>
<h2>Latest {len(agg.latest)} security events</h2>
<table id="latest"><tr><th>time</th><th>action</th><th>protection</th><th>client</th><th>user</th><th>command</th>
<th>what</th><th>session</th></tr>
{"".join(rows)}
</table>
</body></html>
"""
