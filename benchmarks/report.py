"""Turn the measurements of ``run.py`` into RESULTS.md, overhead.png and the
tables printed at the end of a run.

What it is for: aggregation (median with min–max over the repeats), the
derived figures (added latency = case − direct at the same concurrency,
ratios of CPU per request), the met / not met verdict of every target, and
the picture. Not for: measuring anything.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from footprint import RssRun
from harness import LoadSample
from pyspy import Profile

# -- the cases -----------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    meaning: str
    #: The case whose latency is subtracted to get "added" latency.
    baseline: str | None
    concurrencies: tuple[int, ...]


@dataclass
class Agg:
    """One case at one concurrency over its repeats."""

    n: int
    rps: tuple[float, float, float]  # median, min, max
    p50: tuple[float, float, float]
    p99: tuple[float, float, float]
    cpu: tuple[float, float, float]
    errors: int
    requests: int


def _mmm(values: Sequence[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def aggregate(samples: list[LoadSample]) -> dict[tuple[str, int], Agg]:
    groups: dict[tuple[str, int], list[LoadSample]] = {}
    for sample in samples:
        groups.setdefault((sample.case, sample.connections), []).append(sample)
    out = {}
    for key, group in groups.items():
        out[key] = Agg(
            n=len(group),
            rps=_mmm([s.result.rps for s in group]),
            p50=_mmm([s.result.p50_ms for s in group]),
            p99=_mmm([s.result.p99_ms for s in group]),
            cpu=_mmm([s.cpu_us_per_request for s in group]),
            errors=sum(s.result.errors + s.result.non_2xx for s in group),
            requests=sum(s.result.requests for s in group),
        )
    return out


# -- formatting ----------------------------------------------------------------------


def _f(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}"


def _range(t: tuple[float, float, float], digits: int = 2) -> str:
    if t[1] == t[2]:
        return _f(t[0], digits)
    return f"{_f(t[0], digits)} ({_f(t[1], digits)}–{_f(t[2], digits)})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


# -- targets -------------------------------------------------------------------------


@dataclass
class Target:
    text: str
    figure: str
    met: bool | None  # None: not measured


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def evaluate_targets(r: dict[str, Any], agg: dict[tuple[str, int], Agg]) -> list[Target]:
    def cpu(case: str, c: int = 16) -> float | None:
        a = agg.get((case, c))
        return a.cpu[0] if a else None

    def p(case: str, c: int, which: str) -> float | None:
        a = agg.get((case, c))
        return getattr(a, which)[0] if a else None

    targets: list[Target] = []
    gw, bare, otel = cpu("gateway"), cpu("bare-aiohttp"), cpu("flask-otel")
    ratio_bare = _ratio(gw, bare)
    targets.append(
        Target(
            "CPU per request, full tracing + checks ≤ 1.5× bare aiohttp proxy (c=16)",
            f"{_f(gw, 0)} µs vs {_f(bare, 0)} µs = **{_f(ratio_bare)}×**",
            None if ratio_bare is None else ratio_bare <= 1.5,
        )
    )
    notrace = cpu("gateway-notrace")
    ratio_notrace = _ratio(notrace, bare)
    targets.append(
        Target(
            "CPU per request, tracing disabled ≤ 1.2× bare aiohttp proxy (c=16)",
            f"{_f(notrace, 0)} µs vs {_f(bare, 0)} µs = **{_f(ratio_notrace)}×**",
            None if ratio_notrace is None else ratio_notrace <= 1.2,
        )
    )
    ratio_otel = _ratio(gw, otel)
    targets.append(
        Target(
            "CPU per request ≤ 1/6 of instrumented Flask + requests (c=16)",
            f"{_f(gw, 0)} µs vs {_f(otel, 0)} µs = "
            f"**1/{_f(1 / ratio_otel if ratio_otel else None, 1)}**",
            None if ratio_otel is None else ratio_otel <= 1 / 6,
        )
    )
    gw50, direct50 = p("gateway", 1, "p50"), p("direct", 1, "p50")
    added50 = gw50 - direct50 if gw50 is not None and direct50 is not None else None
    targets.append(
        Target(
            "added latency at c=1 ≤ 0.5 ms p50",
            f"**+{_f(added50, 3)} ms** ({_f(gw50, 3)} − {_f(direct50, 3)} direct)",
            None if added50 is None else added50 <= 0.5,
        )
    )
    gw99, bare99 = p("gateway", 1, "p99"), p("bare-aiohttp", 1, "p99")
    ratio99 = _ratio(gw99, bare99)
    targets.append(
        Target(
            "p99 at c=1 ≤ 1.5× bare aiohttp proxy's p99",
            f"{_f(gw99, 2)} ms vs {_f(bare99, 2)} ms = **{_f(ratio99)}×**",
            None if ratio99 is None else ratio99 <= 1.5,
        )
    )
    stall = next(iter(r.get("loop_lag") or []), None)
    if stall is None or stall.get("stall_ms_per_batch_max") is None:
        targets.append(
            Target(
                "longest event-loop stall per export batch ≤ 1 ms (c=1; p90 over batches)",
                "not measured in this run",
                None,
            )
        )
    else:
        targets.append(
            Target(
                "longest event-loop stall per export batch ≤ 1 ms (c=1; p90 over batches)",
                f"p90 over {stall['batches']} batches "
                f"**{_f(stall['stall_ms_per_batch_p90'], 3)} ms**, median "
                f"{_f(stall['stall_ms_per_batch_median'], 3)} ms, worst "
                f"{_f(stall['stall_ms_per_batch_max'], 2)} ms (outside exports: p99 "
                f"{_f(stall['stall_ms_outside_exports_p99'], 3)} ms, worst "
                f"{_f(stall['stall_ms_outside_exports_max'], 2)} ms: the machine's own noise)",
                stall["stall_ms_per_batch_p90"] <= 1.0,
            )
        )
    targets += _accuracy_targets(r.get("accuracy") or [])
    targets.append(_every_span_exported(r.get("spans_exported")))
    sizes = r.get("sizes", {})
    if "snippet" in sizes:
        gz = sizes["snippet"]["gz"]
        targets.append(
            Target("snippet ≤ 3 KB (3 072 B) minified + gzip", f"**{gz} B**", gz <= 3072)
        )
    down = next((x for x in r.get("rss", []) if x.label == "exporter down"), None)
    if down is not None:
        complete = down.requests >= r["settings"]["rss_requests"]
        targets.append(
            Target(
                f"RSS growth < 50 MB over {r['settings']['rss_requests']:,} requests, "
                "exporter down",
                f"**{down.growth_mib:+.1f} MiB** ({down.idle_kib / 1024:.1f} → "
                f"{down.after_kib / 1024:.1f} MiB, {down.requests:,} requests)",
                (down.growth_mib * 1.048576 < 50) if complete else None,
            )
        )
    return targets


def _accuracy_targets(cells: list[dict[str, Any]]) -> list[Target]:
    """Uplink and rtt error ≤ 1 ms mean on every symmetric cell (0/0, the
    relay alone, included), and the relay's own overhead ≤ 0.3 ms.

    Gated on each request's error against the delay the relay actually
    applied to it (its trace log): on a busy machine its threads can wake
    late, and that request then really took longer than the nominal delay.
    The error against the nominal up / up + down of every request is shown
    next to it, never dropped."""
    uplink_text = "uplink error ≤ 1 ms mean, every symmetric cell, every skew"
    rtt_text = "rtt error ≤ 1 ms mean, every symmetric cell, every skew"
    relay_text = "delay relay's own round trip ≤ 0.3 ms beyond up + down (probe, every path)"
    symmetric = [c for c in cells if c["symmetric"]]
    if not symmetric:
        return [Target(t, "not measured in this run", None) for t in (uplink_text, rtt_text)]
    out = []
    for text, key in ((uplink_text, "uplink"), (rtt_text, "rtt")):

        def gate(c: dict[str, Any], key: str = key) -> float:
            held = c.get(f"{key}_held_mean")
            return float(c[f"{key}_mean"] if held is None or math.isnan(held) else held)

        worst = max(symmetric, key=gate)
        worst_nominal = max(symmetric, key=lambda c, key=key: c[f"{key}_mean"])
        figure = (
            f"worst cell {worst['path']} ms at skew {_skew(worst['skew_ms'])}: "
            f"**{_f(gate(worst))} ms** mean against the delay the relay applied to each "
            f"request ({worst.get(f'n_{key}_held' if key == 'rtt' else 'n_held', 0)} of "
            f"{worst['n_rtt' if key == 'rtt' else 'n']} requests traced; max "
            f"{_f(worst.get(f'{key}_held_max'))} ms); against the nominal delay, every "
            f"request: worst cell {worst_nominal['path']} ms at skew "
            f"{_skew(worst_nominal['skew_ms'])}, {_f(worst_nominal[f'{key}_mean'])} ms mean, "
            f"{_f(worst_nominal[f'{key}_max'])} ms max"
        )
        if key == "uplink":
            figure += (
                "; against each request's real uplink (the clock sync alone): worst cell "
                f"{_f(max(c.get('exact_mean', float('nan')) for c in symmetric))} ms"
            )
        out.append(Target(text, figure, gate(worst) <= 1.0))
    overheads = [
        (c["relay_rtt_ms"] - _up_plus_down(c["path"]), c["path"])
        for c in cells
        if c.get("relay_rtt_ms") is not None and not math.isnan(c["relay_rtt_ms"])
    ]
    if overheads:
        overhead, path = max(overheads)
        out.append(
            Target(relay_text, f"worst path {path} ms: **{overhead:+.2f} ms**", overhead <= 0.3)
        )
    else:
        out.append(Target(relay_text, "not measured in this run", None))
    return out


def _up_plus_down(path: str) -> float:
    up, _, down = path.partition("/")
    return float(up) + float(down)


def _every_span_exported(counts: dict[str, int] | None) -> Target:
    text = "every span exported: SERVER spans received ≥ requests completed (wrk, exporter up)"
    if not counts:
        return Target(text, "not measured in this run", None)
    received, completed = counts["received"], counts["completed"]
    extra = received - completed
    return Target(
        text,
        f"**{received:,}** spans received by the OTLP receiver for **{completed:,}** requests "
        f"wrk completed ({extra:+,}; wrk stops each run with requests in flight that the "
        f"gateway still serves and exports, and wrk's errors may have been served: "
        f"up to {counts['in_flight_max']:,} here)",
        0 <= extra <= counts["in_flight_max"],
    )


def _skew(ms: float) -> str:
    if abs(ms) >= 3_600_000:
        return f"{ms / 3_600_000:+g} h"
    return f"{ms / 1000:+g} s"


# -- the picture ---------------------------------------------------------------------


def plot(path: Path, cases: list[Case], agg: dict[tuple[str, int], Agg]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    proxies = [c for c in cases if c.baseline and (c.key, 16) in agg]
    fig, (ax_cpu, ax_lat) = plt.subplots(1, 2, figsize=(13, 0.55 * len(proxies) + 2.2))
    labels = [c.label.replace("**", "") for c in proxies]
    y = list(range(len(proxies)))

    cpu = [agg[(c.key, 16)].cpu for c in proxies]
    medians = [t[0] for t in cpu]
    err = [[t[0] - t[1] for t in cpu], [t[2] - t[0] for t in cpu]]
    colors = ["#d62728" if c.key.startswith("gateway") else "#7f7f7f" for c in proxies]
    ax_cpu.barh(y, medians, xerr=err, color=colors, capsize=3)
    ax_cpu.set_xscale("log")
    ax_cpu.set_yticks(y, labels)
    ax_cpu.invert_yaxis()
    ax_cpu.set_xlabel("CPU µs per request (c=16, log scale; median, min–max)")
    ax_cpu.set_title("Proxy CPU per request")
    for yi, (value, _, top) in zip(y, cpu, strict=True):
        ax_cpu.text(top * 1.08, yi, f"{value:,.0f}", va="center", fontsize=8)

    def added(case: Case, which: str) -> float:
        a, base = agg.get((case.key, 1)), agg.get((case.baseline or "", 1))
        if a is None or base is None:
            return float("nan")
        return float(getattr(a, which)[0] - getattr(base, which)[0])

    p50 = [added(c, "p50") for c in proxies]
    p99 = [added(c, "p99") for c in proxies]
    h = 0.38
    ax_lat.barh([v - h / 2 for v in y], [max(v, 0.005) for v in p50], h, label="p50 added")
    ax_lat.barh([v + h / 2 for v in y], [max(v, 0.005) for v in p99], h, label="p99 added")
    ax_lat.set_xscale("log")
    ax_lat.set_yticks(y, [""] * len(y))
    ax_lat.invert_yaxis()
    ax_lat.set_xlabel("ms added over direct at c=1 (log scale; ≤0 drawn at 0.005)")
    ax_lat.set_title("Added latency at concurrency 1")
    for yi, a50, a99 in zip(y, p50, p99, strict=True):
        if math.isnan(a50):
            ax_lat.text(
                0.02,
                yi,
                "not run at c=1",
                va="center",
                fontsize=7,
                color="#7f7f7f",
                transform=ax_lat.get_yaxis_transform(),  # x in axes fraction, y in data
            )
            continue
        ax_lat.text(max(a50, 0.005) * 1.08, yi - h / 2, f"{a50:+.2f}", va="center", fontsize=7)
        ax_lat.text(max(a99, 0.005) * 1.08, yi + h / 2, f"{a99:+.2f}", va="center", fontsize=7)
    ax_lat.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- RESULTS.md -------------------------------------------------------------------------


def render(r: dict[str, Any], cases: list[Case], png_name: str) -> str:
    agg = aggregate(r["samples"])
    by_key = {c.key: c for c in cases}
    meta, settings = r["meta"], r["settings"]
    out: list[str] = ["# Benchmark results", ""]
    out += [
        f"Generated by `make bench` (`python benchmarks/run.py"
        f"{' --quick' if settings['quick'] else ''}`) on {meta['date']}, "
        f"in {meta['runtime_s'] / 60:.1f} min. Every figure below was measured in this one run, "
        "side by side, on loopback.",
        "",
        f"**Machine**: {meta['nproc']} cores ({meta['cpu_model']}), "
        f"{meta['mem_gib']:.1f} GiB memory, Linux {meta['kernel']}.  ",
        "**Versions**: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        "",
        f"**Method**: `wrk` in its own process (1 thread at c=1, else 2), "
        f"{settings['duration_s']:g} s per run after a warm-up, at concurrencies "
        f"{', '.join(map(str, settings['concurrencies']))}; every case repeated "
        f"{settings['repeats']}× in alternating order (figures are the median, with min–max "
        "in brackets when they differ). CPU per request = (utime + stime of every process "
        "of the server under test, from `/proc/<pid>/stat`, over the wrk window) / requests "
        "completed. Added latency = case − direct at the same concurrency (medians). "
        "Every request carries the headers the snippet sends (`traceparent`, "
        "`X-Client-Timestamp`, `X-Client-Clock` with a fresh valid token, `X-Client-Prev`), "
        "so the gateway runs its full latency checks on each one.",
        "",
        f"![CPU per request and added latency]({png_name})",
        "",
        "## Targets",
        "",
    ]
    targets = evaluate_targets(r, agg)
    out += _table(
        ["target", "figure", "verdict"],
        [
            [
                t.text,
                t.figure,
                "not measured" if t.met is None else ("**met**" if t.met else "**not met**"),
            ]
            for t in targets
        ],
    )
    out += ["", "## 1. Overhead (static nginx upstream, ~1 KB JSON)", ""]
    out += ["| case | what it is |", "|---|---|"]
    out += [f"| {c.label} | {c.meaning} |" for c in cases]
    for conc in settings["concurrencies"]:
        out += ["", f"### Concurrency {conc}", ""]
        rows = []
        for case in cases:
            a = agg.get((case.key, conc))
            if a is None:
                continue
            base = agg.get((case.baseline, conc)) if case.baseline else None
            add50 = a.p50[0] - base.p50[0] if base else None
            add99 = a.p99[0] - base.p99[0] if base else None
            rows.append(
                [
                    case.label,
                    _range(a.rps, 0),
                    _range(a.p50, 3),
                    _range(a.p99, 2),
                    "–" if add50 is None else f"{add50:+.3f}",
                    "–" if add99 is None else f"{add99:+.2f}",
                    _range(a.cpu, 0),
                    str(a.errors),
                ]
            )
        out += _table(
            [
                "case",
                "req/s",
                "p50 ms",
                "p99 ms",
                "added p50 ms",
                "added p99 ms",
                "CPU µs/req",
                "errors",
            ],
            rows,
        )
    out += ["", "### Ratios of CPU per request", ""]
    ratio_rows = []
    for conc in settings["concurrencies"]:
        gw = agg.get(("gateway", conc))
        if gw is None:
            continue
        row = [str(conc)]
        for other in ("bare-aiohttp", "flask-otel", "flask", "nginx-proxy", "gateway-notrace"):
            o = agg.get((other, conc))
            ratio = _ratio(gw.cpu[0], o.cpu[0]) if o else None
            row.append(_f(ratio))
        ratio_rows.append(row)
    out += _table(
        [
            "c",
            "gateway / bare aiohttp",
            "gateway / instrumented Flask",
            "gateway / plain Flask",
            "gateway / nginx",
            "gateway / gateway without tracing",
        ],
        ratio_rows,
    )
    verdicts = r.get("verdicts") or {}
    if verdicts:
        total = sum(verdicts.values())
        shares = ", ".join(
            f"`{k}` {v:,} ({100 * v / total:.1f} %)"
            for k, v in sorted(verdicts.items(), key=lambda kv: -kv[1])
        )
        out += [
            "",
            f"Latency verdicts on the gateway SERVER spans the OTLP sink received during "
            f"these loads: {shares}. (The per-client timing rate limit is lifted for the bench "
            "with `GATEWAY_TIMING_RATE`: wrk is one address standing for many users, and "
            "`rate_limited` requests would skip the checks.)",
        ]

    out += _encoder_and_stall(r)
    out += _accuracy(r)
    out += _footprint(r)
    out += _scaling(agg, by_key, settings)
    out += _where_cpu_goes(r, agg)
    profiles: dict[str, Profile] = r.get("profiles") or {}
    if not profiles:
        out += ["", "## Profile", "", "Not taken in this run (every gateway target was met)."]
    for key, profile in profiles.items():
        out += _profile(by_key[key].label.replace("**", ""), profile)
    out += ["", "## Log", "", *[f"- {line}" for line in r.get("notes", [])]]
    return "\n".join(out) + "\n"


def _encoder_and_stall(r: dict[str, Any]) -> list[str]:
    out: list[str] = []
    encoder = r.get("encoder") or []
    if encoder:
        out += [
            "",
            "### OTLP encoding alone",
            "",
            "CPU µs per span (thread time, median of 9 repeats) to encode the gateway's "
            "spans, the official protobuf encoder against `latency_common/otlp_encode.py` "
            "(what the gateway exports with):",
            "",
        ]
        out += _table(
            ["batch", "official", "otlp_encode", "speed-up"],
            [
                [str(size), _f(off), _f(ours), f"{_f(_ratio(off, ours), 1)}×"]
                for size, off, ours in encoder
            ],
        )
    lag = r.get("loop_lag") or []
    if lag:
        out += [
            "",
            "### Event-loop stalls per export batch (c=1)",
            "",
            "`benchmarks/loop_lag.py`: one gateway worker run as `python -m gateway` runs "
            "it, at c=1 against the static upstream, with a thread that sleeps 0.1 ms in a "
            "loop: how late it wakes is how long it waited for the GIL, as the event loop "
            "does after each poll. Per export batch, the worst lateness inside the batch's "
            "export window; outside the windows, the same probe measures the machine's own "
            "noise (other processes, the gateway's own request work).",
            "",
        ]
        out += _table(
            [
                "GIL switch interval",
                "batches",
                "spans",
                "stall per batch, median ms",
                "p90 ms",
                "worst ms",
                "outside exports, median ms",
                "p99 ms",
                "worst ms",
                "wrk p99 ms",
            ],
            [
                [
                    f"{x['switch_interval_s'] * 1e3:g} ms",
                    str(x["batches"]),
                    str(x["spans"]),
                    _f(x["stall_ms_per_batch_median"], 3),
                    _f(x["stall_ms_per_batch_p90"], 3),
                    _f(x["stall_ms_per_batch_max"], 2),
                    _f(x["stall_ms_outside_exports_median"], 3),
                    _f(x["stall_ms_outside_exports_p99"], 3),
                    _f(x["stall_ms_outside_exports_max"], 2),
                    _f(x.get("p99_ms"), 2),
                ]
                for x in lag
            ],
        )
    return out


def _accuracy(r: dict[str, Any]) -> list[str]:
    cells = r.get("accuracy") or []
    out = ["", "## 2. Accuracy (real Chromium, snippet, delay relay)", ""]
    if not cells:
        return [*out, "Not measured in this run."]
    out += [
        "The demo page in Debian Chromium (Playwright), its requests through "
        "`tests/relay.py` (one-way delays up/down injected in its own process) to "
        "`python -m gateway`; the page clock skewed by `tests/browser.py`'s init script. "
        f"{r['settings']['clicks']} sequential requests per cell, after 2 warm-up requests "
        "that are not counted (the first requests after a page load meet a machine still "
        "busy with it, and the first measured request reports the rtt of the one before it). "
        "Truth for the uplink: "
        "the injected up delay + the request's own pre-request wait (Resource Timing "
        "`requestStart − startTime`, the snippet's `pre`); for rtt: up + down. "
        "Naive = `t1 − X-Client-Timestamp` (t1 from the response's `X-Gateway-Clock`, the "
        "timestamp as Chromium sent it), what a gateway that trusted the client clock "
        "would report. Errors are |measured − truth| in ms. On the asymmetric path no "
        "two-way exchange can split the delays (the estimate is rtt/2-centred), so its "
        "uplink error is physics, not a defect. The relay's actual round trip (median of a "
        "one-byte echo probe through a twin relay) is shown next to up + down: what it "
        "adds (its own forwarding; it sleeps on threads and spins the last 0.3 ms of each "
        "delay, so well under 0.3 ms) is in every measurement through it, and counted here "
        "as error. "
        "Path 0/0 is the relay with no added delay. Page and gateway share this machine's "
        "clock and the skew is the bench's own, so `t1 − X-Client-Timestamp + skew` is each "
        "request's real uplink, hiccups of the relay or the scheduler included (to within "
        "the < 1 ms the snippet's `Date.now()` anchor is truncated by): the *vs real uplink* "
        "column is the gateway's error against that, i.e. the error of the clock sync alone. "
        "The relay logs when each request's first bytes reached it and when it passed them "
        "on, both ways (`--trace-log`; it counts each delay from the kernel's receive "
        "timestamp and runs under SCHED_FIFO, so a thread that wakes late does not lengthen "
        "the delay): *vs relay hold* is the error against the delay the relay really applied to "
        "that request (up: `pre` + its up hold; rtt: the up + down holds of the request whose "
        "round trip `X-Client-Prev` reports), and *relay extra* how much longer than up + "
        "down it held a request, mean / max. The targets gate on *vs relay hold*; the errors "
        "against the nominal delays, over every measured request, stay in the table. "
        "`python benchmarks/accuracy.py` runs this section alone and prints every request: "
        "its pre, the time from Chromium's `requestStart` to the relay, the relay's hold, "
        "relay → the gateway's receipt, and the rtt reported for it.",
        "",
    ]
    rows = []
    for c in cells:
        rows.append(
            [
                f"{c['path']}",
                _f(c.get("relay_rtt_ms")),
                _skew(c["skew_ms"]),
                str(c["n"]),
                _f(c["pre_mean"]),
                f"{_f(c['uplink_mean'])} / {_f(c['uplink_max'])}",
                f"{_f(c.get('exact_mean'))} / {_f(c.get('exact_max'))}",
                f"{_f(c.get('uplink_held_mean'))} / {_f(c.get('uplink_held_max'))}",
                f"{_f(c['rtt_mean'])} / {_f(c['rtt_max'])}",
                _f(c.get("rtt_probe_mean")),
                f"{_f(c.get('rtt_held_mean'))} / {_f(c.get('rtt_held_max'))}",
                f"{_f(c.get('relay_extra_mean'))} / {_f(c.get('relay_extra_max'))}",
                f"{_f(c.get('to_relay_median'))} / {_f(c.get('to_gateway_median'))}",
                f"{_f(c['naive_mean'], 1)} / {_f(c['naive_max'], 1)}",
                ", ".join(f"{k} {v}" for k, v in c["statuses"].items()),
            ]
        )
    out += _table(
        [
            "path up/down ms",
            "relay rtt ms (probe)",
            "skew",
            "n",
            "pre ms (mean)",
            "uplink err mean / max",
            "vs real uplink mean / max",
            "uplink err vs relay hold mean / max",
            "rtt err mean / max",
            "rtt err vs probe, mean",
            "rtt err vs relay hold mean / max",
            "relay extra ms mean / max",
            "Chromium → relay / relay → t1 ms (median)",
            "naive err mean / max",
            "verdicts",
        ],
        rows,
    )
    return out + _slowest_requests(cells)


#: A request whose uplink error against the nominal delay passes this is
#: listed with where its time went.
SLOW_REQUEST_MS = 3.0


def _slowest_requests(cells: list[dict[str, Any]], limit: int = 15) -> list[str]:
    """Every measured request of a symmetric path (on the asymmetric one the
    error is physics) whose uplink error against the nominal delay is over
    SLOW_REQUEST_MS, worst first, split into its parts: all of them
    stay in the means above, this only says where their time went."""
    slow = []
    symmetric = [c for c in cells if c["symmetric"]]
    for c in symmetric:
        up_ms = float(c["path"].split("/")[0])
        for row in c.get("rows", []):
            if row.get("uplink_ms") is None or row.get("pre_ms") is None:
                continue
            error = row["uplink_ms"] - up_ms - row["pre_ms"]
            if abs(error) > SLOW_REQUEST_MS:
                slow.append((abs(error), error, c, row))
    out = [
        "",
        f"Requests of the symmetric paths with an uplink error over {SLOW_REQUEST_MS:g} ms "
        f"against the nominal delay ({len(slow)} of "
        f"{sum(len(c.get('rows', [])) for c in symmetric)} measured; all are in the means "
        "above), worst first: where their time went. *Chromium → relay*: from the "
        "request's Resource Timing `requestStart` to its first bytes reaching the relay "
        "(includes up to 1 ms of the page clock's whole-millisecond anchor); *relay extra*: "
        "how much longer than the nominal up delay the relay held them; *relay → t1*: from "
        "the relay passing them on to the gateway's receipt time; *GC pause in it*: the "
        "gateway's garbage collections within that stretch (`benchmarks/gc_watch`); "
        "*gateway's CPU wait*: how long the gateway's threads waited, runnable, for a core "
        "while the request was in flight (`/proc/<pid>/task/*/schedstat`: other processes "
        "held both cores); "
        "*export*: the gateway's nearest span export (ms after t1; its thread holds the GIL "
        "while it encodes).",
        "",
    ]
    if not slow:
        return [*out, "None."]
    rows = []
    for _, error, c, row in sorted(slow, key=lambda x: -x[0])[:limit]:
        up_extra = None
        if row.get("relay_up_sent_ms") is not None and row.get("relay_up_arrived_ms") is not None:
            up_nominal = float(c["path"].split("/")[0])
            up_extra = row["relay_up_sent_ms"] - row["relay_up_arrived_ms"] - up_nominal
        rows.append(
            [
                f"{c['path']}, {_skew(c['skew_ms'])}",
                str(row["i"] + 1),
                f"{error:+.2f}",
                _f(
                    None
                    if row.get("real_uplink_ms") is None
                    else row["uplink_ms"] - row["real_uplink_ms"]
                ),
                _f(row.get("to_relay_ms")),
                _f(up_extra),
                _f(row.get("to_gateway_ms")),
                _f(row.get("gc_ms"), 1),
                _f(row.get("gw_runqueue_ms"), 1),
                _f(row.get("export_ms"), 1),
            ]
        )
    return out + _table(
        [
            "cell",
            "request",
            "uplink err ms",
            "vs real uplink",
            "Chromium → relay",
            "relay extra (up)",
            "relay → t1",
            "GC pause in it",
            "gateway's CPU wait",
            "export",
        ],
        rows,
    )


def _footprint(r: dict[str, Any]) -> list[str]:
    out = ["", "## 3. Footprint", ""]
    sizes = r.get("sizes") or {}
    if sizes:
        rows = []
        if "snippet" in sizes:
            s = sizes["snippet"]
            rows.append(
                [
                    "`frontend-snippet/snippet.js` (terser, as `scripts/size.mjs`)",
                    f"{s['min']:,}",
                    f"**{s['gz']:,}**",
                    "1×",
                ]
            )
        base = sizes.get("snippet", {}).get("gz")
        if "served" in sizes:
            s = sizes["served"]
            rows.append(
                [
                    "`/__gateway/snippet.js` as the gateway sends it (comments out, gzip -9)",
                    f"{s['identity']:,} (not minified)",
                    f"{s['gzip']:,}",
                    f"{s['gzip'] / base:.1f}×" if base else "–",
                ]
            )
        names = {
            "otel-fetch": "OTel web: sdk-trace-web + instrumentation-fetch + api",
            "otel-fetch-zone": "… + context-zone (zone.js), as the OTel docs set it up",
            "otel-fetch-export": "… + BatchSpanProcessor + exporter-trace-otlp-http",
        }
        for key, size in sorted(sizes.get("otel", {}).items(), key=lambda kv: kv[1]["gz"]):
            rows.append(
                [
                    names.get(key, key) + " (esbuild)",
                    f"{size['min']:,}",
                    f"{size['gz']:,}",
                    f"{size['gz'] / base:.1f}×" if base else "–",
                ]
            )
        out += _table(["bundle", "minified B", "min + gzip -9 B", "vs snippet"], rows)
        versions = sizes.get("otel_versions", {})
        if versions:
            out += [
                "",
                "Pinned in `benchmarks/footprint/package.json` (+ lock): "
                + ", ".join(f"{k} {v}" for k, v in versions.items())
                + ". Entry files: `benchmarks/footprint/entries/`.",
            ]
    runs: list[RssRun] = r.get("rss") or []
    if runs:
        out += ["", "Gateway RSS (all processes: parent + workers; c=16 load):", ""]
        rows = []
        for run in runs:
            curve = ", ".join(f"{n // 1000}k: {kib / 1024:.0f}" for n, kib in run.curve)
            rows.append(
                [
                    run.label,
                    f"{run.idle_kib / 1024:.1f}",
                    f"{run.requests:,}",
                    f"{run.after_kib / 1024:.1f}",
                    f"{run.growth_mib:+.1f}",
                    " + ".join(f"{k / 1024:.0f}" for k in run.per_process_kib),
                    curve,
                ]
            )
        out += _table(
            [
                "exporter",
                "idle MiB",
                "requests",
                "after MiB",
                "growth MiB",
                "per process MiB",
                "RSS MiB along the way",
            ],
            rows,
        )
    return out


def _scaling(
    agg: dict[tuple[str, int], Agg], by_key: dict[str, Case], settings: dict[str, Any]
) -> list[str]:
    out = ["", "## 4. Scaling", "", "Gateway processes (`--workers`), full tracing:", ""]
    rows = []
    for key, workers in (("gateway-w1", 1), ("gateway", 2), ("gateway-w4", 4)):
        for conc in settings["concurrencies"]:
            a = agg.get((key, conc))
            if a is None or conc == 1:
                continue
            rows.append(
                [
                    str(workers),
                    str(conc),
                    _range(a.rps, 0),
                    _range(a.cpu, 0),
                    _range(a.p50, 3),
                    _range(a.p99, 2),
                ]
            )
    out += _table(["workers", "c", "req/s", "CPU µs/req", "p50 ms", "p99 ms"], rows)
    out += ["", "p99 (ms) as concurrency grows:", ""]
    keys = ["direct", "nginx-proxy", "bare-aiohttp", "gateway-notrace", "gateway"]
    keys += ["flask", "flask-otel"]
    rows = []
    for key in keys:
        if key not in by_key:
            continue
        rows.append(
            [by_key[key].label]
            + [
                _f(agg[(key, c)].p99[0]) if (key, c) in agg else "–"
                for c in settings["concurrencies"]
            ]
        )
    out += _table(["case", *[f"c={c}" for c in settings["concurrencies"]]], rows)
    out += [
        "",
        "Span export batch size (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`; the gateway's default "
        "is 64). The processor thread encodes a whole batch while holding the GIL, "
        "stalling the event loop (ARCHITECTURE.md §11):",
        "",
    ]
    rows = []
    for key, size in (("gateway", 64), ("gateway-b512", 512)):
        for conc in settings["concurrencies"]:
            a = agg.get((key, conc))
            if a is None or (conc == 64 and key == "gateway"):
                continue
            rows.append(
                [
                    str(size),
                    str(conc),
                    _range(a.p50, 3),
                    _range(a.p99, 2),
                    _range(a.cpu, 0),
                    _range(a.rps, 0),
                ]
            )
    out += _table(["batch", "c", "p50 ms", "p99 ms", "CPU µs/req", "req/s"], rows)
    return out


def _where_cpu_goes(r: dict[str, Any], agg: dict[tuple[str, int], Agg]) -> list[str]:
    out = ["", "## Where the gateway's CPU goes", ""]
    layers = [
        ("bare-aiohttp", "bare aiohttp proxy (the floor: aiohttp server + client, kernel)"),
        ("gateway-notrace", "+ the gateway's own work without spans (OTEL_SDK_DISABLED)"),
        ("gateway", "+ tracing (1 span per request, batch export over OTLP/HTTP)"),
        ("gateway-2spans", "(with GATEWAY_SPANS=server,client: 2 spans per request)"),
    ]
    rows, previous = [], None
    for key, text in layers:
        a = agg.get((key, 16))
        if a is None:
            continue
        step = "–" if previous is None else f"{a.cpu[0] - previous:+,.0f}"
        rows.append([text, _f(a.cpu[0], 0), step])
        if not text.startswith("("):
            previous = a.cpu[0]
    if rows:
        out += ["Measured under load (c=16, CPU µs per request, medians):", ""]
        out += _table(["layer", "CPU µs/req", "step"], rows)
    steps = r.get("steps") or []
    if steps:
        out += [
            "",
            "Each step of the request path timed in-process (`benchmarks/microbench.py`: "
            "the gateway's own functions in a loop with the bench's headers, best of 5; "
            "warm caches, so a lower bound of what the same step costs inside a loaded "
            "worker; rows in brackets are alternatives, not in the sum):",
            "",
        ]
        # Rows in brackets are alternatives shown for comparison, not steps.
        total = sum(us for name, _, us, _ in steps if us is not None and name[:1] != "(")
        out += _table(
            ["step", "where", "µs per request"],
            [
                [name, f"`{where}`" if where else "", _f(us, 1) if us is not None else note]
                for name, where, us, note in steps
            ]
            + [["**sum**", "", f"**{_f(total, 1)}**"]],
        )
    gil = r.get("gil") or {}
    if gil:
        out += [
            "",
            "GIL hand-off: the same call alone, and while another Python thread is busy "
            "(as the span export thread is while it encodes a batch). A call that releases "
            "the GIL must take it back from that thread, which may hold it for up to the "
            "5 ms switch interval:",
            "",
        ]
        out += _table(
            ["call", "µs alone", "µs with a busy thread"],
            [[name, _f(a, 2), _f(b, 2)] for name, (a, b) in gil.items()],
        )
    return out


def _profile(label: str, profile: Profile) -> list[str]:
    out = ["", f"## Profile: {label} (py-spy, one worker, c=16)", ""]
    if not profile.samples:
        return [*out, "py-spy recorded nothing (see the run's log)."]
    total = profile.samples

    def share(counter: Any, limit: int, fmt: Callable[[str], str]) -> list[list[str]]:
        return [[fmt(name), f"{100 * n / total:.1f} %"] for name, n in counter.most_common(limit)]

    svg = f"[`{profile.svg.name}`]({profile.svg.name})" if profile.svg else "not written"
    out += [
        f"{total:,} samples of one worker (pid {profile.pid}) during a c=16 load (py-spy "
        "200 Hz, every active thread, `--native`: the C function or system call below a "
        "Python frame is shown after →, and a wait to take the GIL back is a component of "
        f"its own). Flame graph of its twin worker (Python frames only): {svg}.",
        "",
        "By component (first match in the stack, in this order):",
        "",
    ]
    out += _table(["component", "samples"], share(profile.by_category, 20, str))
    out += [
        "",
        "By the gateway's own source line (each sample goes to the deepest `gateway/` "
        "frame on its stack, so a line's share includes what it calls; samples with no "
        "gateway frame, such as the event loop, the HTTP parser or the export thread, "
        "are in none of these rows):",
        "",
    ]
    out += _table(
        ["gateway line", "samples"], share(profile.by_gateway_line, 15, lambda s: f"`{s}`")
    )
    out += ["", "Hottest leaf frames (self time):", ""]
    out += _table(["frame", "samples"], share(profile.by_leaf, 15, lambda s: f"`{s}`"))
    return out


def console_tables(r: dict[str, Any], cases: list[Case]) -> str:
    """The overhead table at c=16 and the targets, for the terminal."""
    agg = aggregate(r["samples"])
    lines = []
    for conc in r["settings"]["concurrencies"]:
        lines.append(f"\nconcurrency {conc}")
        lines.append(
            f"{'case':<46} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU µs/req':>11} {'err':>5}"
        )
        for case in cases:
            a = agg.get((case.key, conc))
            if a:
                lines.append(
                    f"{case.label:<46} {a.rps[0]:>8.0f} {a.p50[0]:>8.3f} {a.p99[0]:>8.2f} "
                    f"{a.cpu[0]:>11.0f} {a.errors:>5}"
                )
    lines.append("\ntargets")
    for t in evaluate_targets(r, agg):
        verdict = "not measured" if t.met is None else ("met" if t.met else "NOT MET")
        lines.append(f"  [{verdict}] {t.text}: {t.figure.replace('**', '')}")
    return "\n".join(lines)
