"""The viewer's HTML: recent traces, one trace's waterfall, latency by route.

What it is for: turning ``spans.py`` / ``report.py`` dataclasses into small
self-contained pages (inline CSS, no script, no CDN, so they work offline
and under a ``default-src 'none'`` Content Security Policy). Every value
that came from a span is escaped: span names and attributes are whatever
any OTLP client sent.

Not for: HTTP (``app.py``) or computing anything shown (``spans.py``,
``report.py``).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Sequence
from html import escape
from typing import Any, Final

from viewer.report import METRICS, PERCENTILES, RouteStats, fmt_ms
from viewer.spans import (
    KIND_NAMES,
    TraceSummary,
    Waterfall,
    gateway_span,
    latency_attributes,
)

_CSS: Final = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 1.5rem 2rem;color:#222;background:#fff}
nav{padding:.7rem 0;border-bottom:1px solid #ddd;margin-bottom:1rem}
nav a{margin-right:1.2rem;font-weight:600}
a{color:#1f5fa8;text-decoration:none} a:hover{text-decoration:underline}
h1{font-size:1.25rem;margin:.4rem 0} h2{font-size:1.05rem;margin:1.4rem 0 .5rem}
code,.mono{font-family:ui-monospace,monospace;font-size:.92em}
table{border-collapse:collapse}
th,td{padding:.2rem .55rem;border-bottom:1px solid #e4e4e4;text-align:left;vertical-align:top}
th{background:#f5f5f5;font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
table.traces{font-size:.9em} table.traces th,table.traces td{white-space:nowrap}
table.traces td.wrap{white-space:normal}
.muted{color:#777}
.verdict{font-weight:600}
.verdict-ok{color:#17803d} .verdict-implausible,.verdict-invalid{color:#b42318}
.verdict-unsynced,.verdict-rate_limited{color:#a15c00} .verdict-absent{color:#777}
.waterfall{border:1px solid #ddd;max-width:100%}
.axis,.span-row{display:flex;align-items:center}
.span-row{height:1.55rem;border-top:1px solid #f0f0f0}
.span-label{flex:0 0 24rem;box-sizing:border-box;overflow:hidden;white-space:nowrap;
 text-overflow:ellipsis;padding-right:.5rem}
.track{flex:1 1 auto;position:relative;height:.95rem;margin-right:.6rem}
.axis .track{height:1.2rem;display:flex;justify-content:space-between;font-size:.8em;color:#777}
.bar{height:100%;min-width:1px;border-radius:2px;background:#8c8c8c}
.svc-browser .bar{background:#4e79a7} .svc-gateway .bar{background:#f28e2b}
.svc-backend .bar{background:#59a14f} .bar.error{outline:2px solid #d62728}
.bar .wait{height:100%;background:repeating-linear-gradient(45deg,#b35806 0 3px,#f28e2b 3px 6px)}
.svc{display:inline-block;min-width:4.2rem;font-weight:600}
.dur{color:#555}
details{margin:.2rem 0} summary{cursor:pointer}
.hists{display:flex;flex-wrap:wrap;gap:.5rem 2rem}
.hists h2{font-size:.95rem;margin:1rem 0 .3rem}
.hist{display:flex;gap:.15rem}
.hcol{width:2.9rem;text-align:center;font-size:.78em;color:#555}
.harea{height:3.2rem;display:flex;align-items:flex-end;justify-content:center}
.hbar{width:70%;background:#4e79a7;border-radius:2px 2px 0 0}
.hlabel{border-top:1px solid #bbb;white-space:nowrap}
"""


def _page(title: str, body: str) -> str:
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)} · trace viewer</title><style>{_CSS}</style></head>"
        '<body><nav><a href="/">Recent traces</a><a href="/latency">Latency by route</a></nav>'
        f"<main>{body}</main></body></html>\n"
    )


def utc_time(ns: int) -> str:
    try:
        moment = dt.datetime.fromtimestamp(ns / 1e9, tz=dt.UTC)
    except (OverflowError, OSError, ValueError):
        return f"{ns} ns"  # a client's nonsense timestamp: show it, do not crash
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def duration(ns: int) -> str:
    if ns >= 1_000_000_000:
        return f"{ns / 1e9:.2f} s"
    if ns >= 10_000_000:
        return f"{ns / 1e6:.1f} ms"
    return f"{ns / 1e6:.3g} ms" if ns else "0 ms"


def service_class(service: str) -> str:
    # A service name is free text; a class name must be one safe token.
    return "svc-" + (re.sub(r"[^a-z0-9_-]+", "-", service.lower()).strip("-") or "unknown")


def _verdict(status: Any) -> str:
    if not isinstance(status, str):
        return '<span class="muted">–</span>'
    cls = "verdict-" + re.sub(r"[^a-z_]", "", status)
    return f'<span class="verdict {cls}">{escape(status)}</span>'


def _value(value: Any) -> str:
    if isinstance(value, str):
        return escape(value)
    return escape(json.dumps(value))


def not_found_page(message: str) -> str:
    return _page("Not found", f"<h1>Not found</h1><p>{escape(message)}</p>")


def index_page(traces: Sequence[TraceSummary], endpoint: str) -> str:
    if not traces:
        body = (
            "<h1>Recent traces</h1><p>No traces yet. Point an OTLP/HTTP exporter at "
            f"<code>{escape(endpoint)}</code> (the gateway and backend do by default).</p>"
        )
        return _page("Recent traces", body)
    rows = "".join(
        f'<tr data-trace-id="{escape(t.trace_id)}">'
        f'<td class="mono" title="{escape(utc_time(t.start_ns))}">'
        f"{escape(utc_time(t.start_ns)[11:])}</td>"
        f'<td><a class="mono" href="/traces/{escape(t.trace_id)}">{escape(t.trace_id)}</a></td>'
        f'<td class="wrap" title="root span, service {escape(t.root_service)}">'
        f"{escape(t.root_name)}</td>"
        f"<td>{escape(' → '.join(t.services))}</td>"
        f'<td class="num">{t.span_count}</td>'
        f'<td class="num">{escape(duration(t.duration_ns))}</td>'
        f'<td class="verdict-cell">{_verdict(t.latency_status)}</td>'
        f'<td class="num uplink">{escape(fmt_ms(t.uplink_ms))}</td></tr>'
        for t in traces
    )
    body = (
        f"<h1>Recent traces</h1><p class=muted>The newest {len(traces)}, newest first. "
        "Verdict and uplink (ms) are the gateway's latency.status and latency.uplink_ms.</p>"
        '<table class="traces"><thead><tr><th>Start (UTC)</th><th>Trace</th><th>Root span</th>'
        '<th>Services</th><th class="num">Spans</th><th class="num">Duration</th>'
        '<th>Verdict</th><th class="num">Uplink ms</th></tr></thead>'
        f"<tbody>{rows}</tbody></table>"
    )
    return _page("Recent traces", body)


def trace_page(shape: Waterfall) -> str:
    spans = [row.span for row in shape.rows]
    total = shape.duration_ns
    ticks = "".join(f"<span>{escape(duration(total * i // 4))}</span>" for i in range(5))
    rows = []
    for row in shape.rows:
        span = row.span
        kind = KIND_NAMES.get(span.kind, str(span.kind))
        error = " error" if span.status_code == 2 else ""
        wait = ""
        if row.wait is not None:
            # The upstream wait inside the gateway span (latency.upstream_ms),
            # whether or not a CLIENT span was exported for it.
            wait = (
                f'<div class="wait" title="waiting for the upstream" '
                f'style="margin-left:{row.wait[0]:.3f}%;width:{row.wait[1]:.3f}%"></div>'
            )
        label = (
            f'<span class="svc">{escape(span.service)}</span> {escape(span.name)} '
            f'<span class="dur">{escape(duration(span.duration_ns))}</span>'
        )
        rows.append(
            f'<div class="span-row {service_class(span.service)}" '
            f'data-span-id="{escape(span.span_id)}" data-depth="{row.depth}">'
            f'<span class="span-label" style="padding-left:{row.depth * 1.1:.1f}rem" '
            f'title="{escape(span.service)} {escape(kind)} {escape(span.name)}">{label}</span>'
            f'<span class="track"><div class="bar{error}" '
            f'style="margin-left:{row.offset_pct:.3f}%;width:{row.width_pct:.3f}%">{wait}</div>'
            "</span></div>"
        )
    gateway = gateway_span(spans)
    latency = latency_attributes(gateway)
    if gateway is None:
        verdict = "<p class=muted>No gateway SERVER span in this trace (yet).</p>"
    else:
        cells = "".join(
            f'<tr data-key="{escape(k)}"><th class="mono">{escape(k)}</th>'
            f'<td class="num">{_value(v)}</td></tr>'
            for k, v in latency.items()
        )
        verdict = (
            f"<p>Verdict: {_verdict(latency.get('latency.status'))} on "
            f'<span class="mono">{escape(gateway.name)}</span> '
            f'(span <span class="mono">{escape(gateway.span_id)}</span>)</p>'
            f'<table class="latency-attributes">{cells}</table>'
        )
    details = "".join(
        f'<details data-span-id="{escape(s.span_id)}"><summary>{escape(s.service)} · '
        f"{escape(s.name)} <span class=muted>{escape(KIND_NAMES.get(s.kind, str(s.kind)))}, "
        f"span {escape(s.span_id)}, parent {escape(s.parent_span_id or '–')}</span></summary>"
        "<table>"
        + "".join(
            f'<tr><th class="mono">{escape(k)}</th><td>{_value(v)}</td></tr>'
            for k, v in sorted(s.attributes.items())
        )
        + "</table></details>"
        for s in spans
    )
    body = (
        f'<h1>Trace <span class="mono">{escape(shape.trace_id)}</span></h1>'
        f"<p class=muted>{escape(utc_time(shape.start_ns))} · {escape(duration(total))} · "
        f"{len(spans)} spans</p>"
        '<div class="waterfall"><div class="axis"><span class="span-label"></span>'
        f'<span class="track">{ticks}</span></div>{"".join(rows)}</div>'
        f"<h2>Gateway verdict</h2>{verdict}<h2>Spans</h2>{details}"
    )
    return _page(f"Trace {shape.trace_id}", body)


_METRIC_TITLES: Final = {
    "rtt": "RTT ms (latency.rtt_ms)",
    "uplink": "Uplink ms (verdict ok)",
    "gateway": "Gateway ms",
    "backend": "Backend ms",
}


def _short(lo_ms: float | None, hi_ms: float | None) -> str:
    """A bin's range short enough for a narrow column: 1000 ms → 1s."""

    def edge(ms: float) -> str:
        return f"{ms / 1000:g}s" if ms >= 1000 else f"{ms:g}"

    if lo_ms is None:
        return f"<{edge(hi_ms or 0)}"
    if hi_ms is None:
        return f"≥{edge(lo_ms)}"
    return f"{edge(lo_ms)}–{edge(hi_ms)}"


def latency_page(stats: Sequence[RouteStats], since_minutes: float | None) -> str:
    window = f"the last {since_minutes:g} minutes" if since_minutes else "all stored traces"
    form = (
        '<form method="get" action="/latency">Window: <input name="since_minutes" '
        f'type="number" min="0" step="any" value="{"" if since_minutes is None else since_minutes}"'
        ' placeholder="all"> minutes <button type="submit">Show</button></form>'
    )
    if not stats:
        body = f"<h1>Latency by route</h1>{form}<p>No traces in {escape(window)}.</p>"
        return _page("Latency by route", body)
    head_top = '<th rowspan="2">Route</th><th rowspan="2" class="num">Traces</th>'
    head_sub = ""
    for metric in METRICS:
        extra = 1 if metric == "uplink" else 0
        head_top += f'<th colspan="{3 + extra}">{escape(_METRIC_TITLES[metric])}</th>'
        head_sub += '<th class="num">n</th>' if extra else ""
        head_sub += "".join(f'<th class="num">p{p}</th>' for p in PERCENTILES)
    body_rows = []
    for r in stats:
        cells = f"<td>{escape(r.route)}</td><td class='num count'>{r.count}</td>"
        for metric in METRICS:
            summary = r.metric(metric)
            if metric == "uplink":
                cells += f'<td class="num n-uplink">{summary.count}</td>'
            for p in PERCENTILES:
                value = fmt_ms(getattr(summary, f"p{p}"))
                cells += f'<td class="num p{p}-{metric}">{escape(value)}</td>'
        body_rows.append(f'<tr data-route="{escape(r.route)}">{cells}</tr>')
    hists = []
    for r in stats:
        peak = max((b.count for b in r.uplink_histogram), default=0) or 1
        # One column per bin: count, a bar scaled to the route's fullest bin,
        # the bin's range in ms.
        bins = "".join(
            f'<div class="hcol" title="{escape(b.label)} ms: {b.count}">'
            f'<div class="hcount">{b.count}</div><div class="harea"><div class="hbar" '
            f'style="height:{b.count / peak * 100:.1f}%"></div></div>'
            f'<div class="hlabel">{escape(_short(b.lo_ms, b.hi_ms))}</div></div>'
            for b in r.uplink_histogram
        )
        hists.append(
            f'<div class="hist-route" data-route="{escape(r.route)}"><h2>{escape(r.route)}: '
            f"uplink ms, {r.uplink_ms.count} ok samples</h2>"
            f'<div class="hist">{bins}</div></div>'
        )
    body = (
        f"<h1>Latency by route</h1>{form}<p class=muted>Over {escape(window)}; nearest-rank "
        "percentiles in ms. Route: the backend span's http.route, else the gateway span's "
        "name. Backend: the backend SERVER span's duration.</p>"
        f'<table class="latency"><thead><tr>{head_top}</tr><tr>{head_sub}</tr></thead>'
        f"<tbody>{''.join(body_rows)}</tbody></table>"
        f'<div class="hists">{"".join(hists)}</div>'
    )
    return _page("Latency by route", body)
