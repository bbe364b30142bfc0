"""Mutation testing of the gateway's core modules and of the snippet: ``make mutate``.

What it is for: running mutmut over the pure and thin modules listed in
``[tool.mutmut]`` of pyproject.toml (each mutant runs only the fast tests that
cover the mutated function) and Stryker over ``frontend-snippet/snippet.js``
(its ``node --test`` suite, see ``frontend-snippet/stryker.conf.json``), then
writing the score of every module to ``benchmarks/MUTATION.md``: killed,
survived, timeout, no-coverage, equivalent and the score, with the date and the
tool versions, the surviving mutants as diffs and the equivalent ones with the
reason they cannot be killed.

Score = (killed + timeout) / (all − equivalent). A mutant is listed in
``EQUIVALENT`` only when no test could tell it apart from the original (say
why in one line); every other survivor is a missing test.

Not for: ``make test`` (a run takes tens of minutes), or judging tests by
line coverage.

    .venv/bin/python benchmarks/mutation.py [--keep] [--only python|snippet]
        [--max-children N] [--stryker BIN]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parent.parent
SNIPPET_DIR: Final = ROOT / "frontend-snippet"
OUT: Final = ROOT / "benchmarks" / "MUTATION.md"
STRYKER_REPORT: Final = SNIPPET_DIR / "reports" / "mutation" / "mutation.json"
#: How long the last run took, for --report-only (inside the ignored ./mutants).
DURATIONS: Final = ROOT / "mutants" / "durations.json"
#: Whole-run bounds; each mutant has its own timeout inside the tools
#: (mutmut: timeout_multiplier/constant in pyproject.toml; Stryker: timeoutMS).
MUTMUT_RUN_TIMEOUT_S: Final = 3 * 3600
STRYKER_RUN_TIMEOUT_S: Final = 2 * 3600
TARGET_SCORE: Final = 95.0
#: The packages [tool.mutmut] mutates (its source_paths).
MUTATED_DIRS: Final = ("gateway", "latency_common")

#: mutmut exit codes (mutmut/stats.py) grouped as the report shows them.
KILLED_CODES: Final = frozenset({1, 3})
TIMEOUT_CODES: Final = frozenset({36, 24, -24, 152, 255})
NO_TESTS_CODES: Final = frozenset({5, 33})

HEADER_CASE: Final = "header name case only (RFC 9110 §5.1: field names are case-insensitive)"

#: Mutants no test can kill, by mutmut name, with the reason.
EQUIVALENT: Final[dict[str, str]] = {
    "gateway.beacon.x_build_span__mutmut_215": "`parent=None` is ReadableSpan's default",
    "gateway.beacon.x_ingest__mutmut_12": "`+=` on a fresh Counter is `=`",
    "latency_common.redact.xǁQueryRedactorǁquery__mutmut_1": (
        "a fast path: a query without `=` comes back unchanged either way"
    ),
    "latency_common.redact.xǁQueryRedactorǁquery__mutmut_8": "`None` is as falsy as `False`",
    "latency_common.redact.xǁQueryRedactorǁquery__mutmut_9": (
        "a fast path: joining the unchanged parts gives the same string back"
    ),
    "latency_common.redact.xǁQueryRedactorǁquery__mutmut_21": (
        "a fast path: joining the unchanged parts gives the same string back"
    ),
    "gateway.context.xǁ_TraceparentGetterǁget__mutmut_7": (
        "only called when the request has a traceparent line, so the default is never used"
    ),
    "gateway.context.xǁ_TraceparentGetterǁget__mutmut_9": (
        "only called when the request has a traceparent line, so `values` is never empty"
    ),
    "gateway.context.xǁ_HeadersGetterǁkeys__mutmut_1": (
        "the Getter interface's `keys()`: neither the W3C nor the B3 propagators call it"
    ),
    "latency_common.tracestate.xǁ_WithoutTracestateǁkeys__mutmut_1": (
        "the Getter interface's `keys()`: OTel's W3C propagator never calls it"
    ),
    "latency_common.tracestate.x_parse__mutmut_32": (
        "an empty Level2TraceState and EMPTY behave alike everywhere"
    ),
    "gateway.context.x__parse__mutmut_3": (
        "getall's default only feeds `if traceparents`: None and () are both empty"
    ),
    "gateway.context.x__parse__mutmut_25": (
        "getall's default only feeds `if fields`: None and () are both empty"
    ),
    "gateway.context.x__parse__mutmut_50": (
        "no valid b3 single header reaches 128 characters (it has at most 68)"
    ),
    "gateway.context.x__parse__mutmut_56": (
        "for one b3 line OTel's default getter reads the same value as ours"
    ),
    "gateway.context.x__parse__mutmut_76": (
        "OTel's B3 propagator reads the first x-b3-* value, which both getters give"
    ),
    "gateway.context.x__parse__mutmut_82": (
        'the "none" source is only compared with "invalid": any other string is alike'
    ),
    "gateway.context.x__parse__mutmut_83": (
        'the "none" source is only compared with "invalid": any other string is alike'
    ),
    "gateway.context.x_inject__mutmut_9": (
        "OTel's default setter does what _HeadersSetter does: carrier[key] = value"
    ),
    "gateway.cors.x_parse_entry__mutmut_14": (
        'yarl gives "/" as the path of an origin without one, never ""'
    ),
    "gateway.cors.x_parse_entry__mutmut_32": (
        "an entry without a host was refused just above, so raw_host is never empty"
    ),
    "gateway.proxy.x__is_utf8__mutmut_3": "codec names are case-insensitive",
    "gateway.proxy.x_response_headers__mutmut_13": "codec names are case-insensitive",
    "gateway.cors.x__add_vary_origin__mutmut_11": HEADER_CASE,
    "gateway.cors.x__add_vary_origin__mutmut_12": HEADER_CASE,
    "gateway.cors.xǁCorsǁown_preflight__mutmut_22": HEADER_CASE,
    "gateway.cors.xǁCorsǁown_preflight__mutmut_23": HEADER_CASE,
    "gateway.proxy.x_header_limit_error__mutmut_17": "codec names are case-insensitive",
    "gateway.proxy.x_header_limit_error__mutmut_28": "codec names are case-insensitive",
    "latency_common.redact.x__without_credentials__mutmut_17": (
        'find("/") from past "://" is never 0: only < 0 means "no slash"'
    ),
    "latency_common.redact.x__without_credentials__mutmut_18": (
        'find("/") from past "://" is never 0: only < 0 means "no slash"'
    ),
    "latency_common.redact.x__without_credentials__mutmut_19": (
        "rfind's end of None is the end of the string, as len(base) is"
    ),
    "latency_common.redact.x__without_credentials__mutmut_29": (
        'the "@" is searched past "://", so it is never at 0'
    ),
    "latency_common.redact.x__without_credentials__mutmut_30": (
        'the "@" is searched past "://", so it is never at 0'
    ),
    "gateway.timing.x__b64__mutmut_5": (
        "tokens and macs are made and checked by the same _b64: they stay self-consistent"
    ),
    "gateway.timing.x__b64__mutmut_7": "codec names are case-insensitive",
    "gateway.timing.x__mac__mutmut_6": "codec names are case-insensitive",
    "gateway.timing.x_verify_bind__mutmut_3": "a bind is 22 characters: none is near 64",
    "gateway.timing.x_verify_bind__mutmut_4": "a bind is 22 characters: none is near 64",
    "gateway.timing.xǁRateLimiterǁallow__mutmut_22": "`last=None` is as falsy as `last=False`",
    "gateway.proxy.x_connection_tokens__mutmut_3": (
        "getall's default only feeds `if not values`: None and () are both empty"
    ),
    "gateway.proxy.xǁUpstreamǁtarget__mutmut_15": (
        'yarl gives "/" as the path of an absolute URL without one, never ""'
    ),
    "gateway.proxy.xǁUpstreamǁcall__mutmut_5": "`None` is as falsy as `False`",
    "gateway.proxy.xǁUpstreamǁcall__mutmut_11": "`compress=None` is aiohttp's default",
    "gateway.proxy.xǁUpstreamǁcall__mutmut_12": "`chunked=None` is aiohttp's default",
    "gateway.proxy.xǁUpstreamǁcall__mutmut_19": (
        "classify() answers 400, 408, 413, 502 or 504: none is 500 or 501"
    ),
    "gateway.proxy.xǁUpstreamǁcall__mutmut_20": (
        "classify() answers 400, 408, 413, 502 or 504: none is 500 or 501"
    ),
    "gateway.proxy.x_build_session__mutmut_3": (
        "limit_per_host None and 0 both mean no per-host limit (there is one upstream)"
    ),
    "gateway.proxy.x_build_session__mutmut_4": (
        "DNS cached forever instead of 60 s: no test can wait a minute for a DNS change"
    ),
    "gateway.proxy.x_build_session__mutmut_5": "`None` is as falsy as `False`",
    "gateway.proxy.x_drop_default_headers__mutmut_15": (
        "aiohttp sets its default Server before on_response_prepare: the field is always there"
    ),
    "gateway.proxy.x_drop_default_headers__mutmut_17": HEADER_CASE,
    "gateway.proxy.x_drop_default_headers__mutmut_18": HEADER_CASE,
    **{
        f"gateway.beacon.x__gateway_sampled__mutmut_{n}": (
            "build_span already refused an entry without a valid traceparent, and the span"
            " it made always has a context: the guard is defensive"
        )
        for n in (7, 10)
    },
    **{
        f"gateway.beacon.x__gateway_sampled__mutmut_{n}": (
            "the SDK's samplers read only the trace id and the parent's sampled flag:"
            " ParentBased from OTEL_TRACES_SAMPLER treats remote and local parents alike,"
            " and none reads the span's name or kind"
        )
        for n in (14, 20, 24, 25, 28, 29)
    },
    "gateway.proxy.x_build_session__mutmut_7": (
        "limit_per_host=0 is TCPConnector's default (no per-host limit)"
    ),
    "gateway.proxy.x_build_session__mutmut_8": (
        "DNS cached 10 s (the default) instead of 60 s: no test can wait for a DNS change"
    ),
    "gateway.proxy.x_build_session__mutmut_9": (
        "enable_cleanup_closed=False is TCPConnector's default"
    ),
    "gateway.proxy.x_upstream_request_headers__mutmut_40": HEADER_CASE,
    "gateway.proxy.x_upstream_request_headers__mutmut_41": HEADER_CASE,
    "gateway.proxy.xǁUpstreamǁresponse__mutmut_5": (
        'logging formats a lone exception with str(), as "%s" does'
    ),
    "gateway.proxy.x_build_session__mutmut_11": (
        "DNS cached 61 s instead of 60 s: no test can wait a minute for a DNS change"
    ),
    "gateway.proxy.x_build_session__mutmut_12": (
        "enable_cleanup_closed only aborts TLS transports; the upstream here is plain HTTP"
    ),
    **{
        f"gateway.proxy.x_build_session__mutmut_{n}": (
            "aiohttp's default jar refuses cookies from an IP address (unsafe=False), and the"
            " tests' upstreams are 127.0.0.1"
        )
        for n in (14, 21)
    },
    "gateway.proxy.x_build_session__mutmut_15": "`trust_env=None` is as falsy as `False`",
    "gateway.proxy.x_build_session__mutmut_16": "`None` is as falsy as `False`",
    "gateway.proxy.x_build_session__mutmut_22": "trust_env=False is ClientSession's default",
    "gateway.proxy.x_build_session__mutmut_43": (
        "ClientTimeout's default total of 300 s instead of none: only an exchange longer"
        " than 5 minutes could tell, and no test waits that long"
    ),
    "gateway.proxy.x_build_session__mutmut_26": (
        "read_bufsize sizes aiohttp's read buffer, not what is read: the bytes are the same"
    ),
    "gateway.proxy.x_build_session__mutmut_30": HEADER_CASE,
    "gateway.proxy.x_build_session__mutmut_31": HEADER_CASE,
    "gateway.proxy.xǁStallTimerǁwait__mutmut_12": (
        "the first check then comes at once, finds nothing due and re-arms for the deadline"
    ),
    **{
        f"gateway.proxy.xǁStallTimerǁ{name}__mutmut_{n}": (
            'the field is set before it is read, or "" passes the same `is None or` test'
        )
        for name, n in (("__init__", 7), ("__init__", 8), ("wait", 18), ("wait", 19))
    },
    "gateway.proxy.xǁStallTimerǁ__init____mutmut_9": "every wait() sets _fired first",
    "gateway.proxy.xǁStallTimerǁ__init____mutmut_10": "every wait() sets _fired first",
    "gateway.proxy.xǁStallTimerǁ_check__mutmut_3": (
        "_pending_since and _task are set and cleared together: one is None only when both are"
    ),
    "gateway.proxy.xǁStallTimerǁ_check__mutmut_7": (
        "the check runs at since + timeout_s or later: on a tie it re-arms for that instant"
    ),
    "gateway.proxy.xǁBodyReaderǁ__init____mutmut_7": "`None` is as falsy as `False`",
    "gateway.proxy.xǁBodyReaderǁ_read__mutmut_10": (
        "BodyTooLarge's argument is never read: the answer is a fixed 413"
    ),
    "gateway.proxy.xǁ_ClientWritesǁsend__mutmut_4": "`None` is as falsy as `False`",
    "gateway.proxy.xǁUpstreamǁrelay__mutmut_1": "`None` is as falsy as `False`",
    "gateway.proxy.xǁUpstreamǁrelay__mutmut_2": (
        "release() of an answer not read to its end closes its connection too"
    ),
    **{
        f"gateway.proxy.xǁUpstreamǁrelay__mutmut_{n}": (
            "aiohttp's client releases a connection itself once the body is read to its end"
        )
        for n in (33, 34)
    },
    **{
        name: "given no loop, StallTimer asks for the running one: the same loop"
        for name in (
            *(f"gateway.proxy.xǁUpstreamǁrelay__mutmut_{n}" for n in (3, 4, 5, 8)),
            *(f"gateway.proxy.xǁ_ClientWritesǁ__init____mutmut_{n}" for n in (3, 5)),
            "gateway.proxy.xǁStallTimerǁ__init____mutmut_3",
            "gateway.proxy.xǁStallTimerǁwait__mutmut_2",
        )
    },
    "gateway.proxy.xǁUpstreamǁresponse__mutmut_23": HEADER_CASE,
    "gateway.proxy.xǁUpstreamǁresponse__mutmut_24": HEADER_CASE,
    "gateway.proxy.xǁUpstreamǁresponse__mutmut_26": HEADER_CASE,
    "gateway.proxy.xǁUpstreamǁresponse__mutmut_27": HEADER_CASE,
    **{
        f"gateway.proxy.xǁUpstreamǁrelay__mutmut_{n}": (
            "aiohttp's client gives HEAD, 204 and 304 answers an empty body (RFC 9112 §6.3):"
            " there is nothing to read either way"
        )
        for n in (15, 17, 18, 20, 21)
    },
    **{
        f"gateway.proxy.xǁ_ClientGoneǁ__init____mutmut_{n}": (
            "the message is never shown or logged: relay() reads only timed_out"
        )
        for n in range(1, 8)
    },
    "gateway.measure.xǁMeasurementǁ__init____mutmut_9": (
        "random.Random(None) seeds from the OS too: nonces only have to differ"
    ),
    "gateway.measure.xǁMeasurementǁ__init____mutmut_11": (
        "33 bytes of OS seed instead of 32: nonces only have to differ"
    ),
    "gateway.measure.xǁMeasurementǁevaluate__mutmut_3": (
        "getall's default only feeds `if not stamp`: None and [] are both empty"
    ),
    "gateway.measure.xǁMeasurementǁclock_header__mutmut_26": (
        '`to_bytes` defaults to "big" since Python 3.11'
    ),
}

#: RFC 9110 §5.1: field names are case-insensitive. A mutant that only changes
#: the case of a header name in a string literal (``"Vary"`` → ``"VARY"``) is
#: equivalent: multidict looks names up case-insensitively and no client may
#: treat ``vary`` and ``Vary`` differently.
HEADER_NAME: Final = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:-[A-Za-z0-9]+)*")
CASE_ONLY_REASON: Final = HEADER_CASE

#: Snippet mutants no test can kill: (source line, stripped; mutator; replacement) → reason.
EQUIVALENT_JS: Final[dict[tuple[str, str, str], str]] = {
    (
        '? { t1: +fields.t1, t2: +fields.t2, tok: /^[\\w.-]{1,256}$/.test(fields.tok || "") '
        "? fields.tok : null, b: fields.bind }",
        "StringLiteral",
        '"Stryker was here!"',
    ): 'the token check fails for "" and for any text with a space alike',
    (
        'const tokenTimestamp = (answer.tok + "").split(".")[2];',
        "StringLiteral",
        '"Stryker was here!"',
    ): "text appended to the token only lengthens its last field (the mac), not TS",
    (
        'const [, traceId, spanId] = (sentTraceparent + "").split("-");',
        "StringLiteral",
        '"Stryker was here!"',
    ): "text appended to the traceparent only lengthens its flags field, not the ids read",
    (
        "for (const gatewayUrl of options.gatewayOrigins || [])",
        "ArrayDeclaration",
        '["Stryker was here"]',
    ): "a non-URL origin is skipped by the same try as any bad entry",
    (
        'gatewayOrigins: [ownScript.src, ...(ownScript.dataset.gatewayOrigins || "").split(",")],',
        "StringLiteral",
        '"Stryker was here!"',
    ): "a non-URL origin is skipped by the same try as any bad entry",
    (
        'const globalScope = typeof globalThis == "object" ? globalThis : self;',
        "ConditionalExpression",
        "true",
    ): "`self` is for browsers before globalThis (2019); every engine that runs the tests has it",
    ("if (!answer) break;", "ConditionalExpression", "false"): (
        "take() of a null answer throws into the same catch that ends the burst"
    ),
    ("if (!eligible) return;", "ConditionalExpression", "false"): (
        "fetch checks eligibility before, XHR calls it inside safely(): a throw is the same no-op"
    ),
    (
        "if (tagged) (args = [new Request(request, { headers })]), (record = tagged);",
        "ConditionalExpression",
        "true",
    ): "the URL was checked eligible just above, so tagRequest always returns a record here",
    (
        "if (record) safely(() => result.then((response) => responded(record, (name) => "
        "response.headers.get(name), response.status), noop));",
        "ConditionalExpression",
        "true",
    ): "responded() of no record throws inside its own safely(): nothing happens either way",
    ("if (record)", "ConditionalExpression", "true"): (
        "responded() of no record throws inside its own safely(): nothing happens either way"
    ),
    (
        'this.addEventListener("loadend", () => this[MARK] == opened && responded(record, '
        "(name) => this.getResponseHeader(name), this.status), {",
        "ObjectLiteral",
        "{}",
    ): "a listener kept past its loadend is ignored by the this[MARK] == opened check",
    ("once: true,", "BooleanLiteral", "false"): (
        "a listener kept past its loadend is ignored by the this[MARK] == opened check"
    ),
    (
        "const gatewayTraceparents = (entry.serverTiming || [])"
        '.filter((metric) => metric.name == "traceparent");',
        "ArrayDeclaration",
        '["Stryker was here"]',
    ): "without serverTiming a string's .name is undefined: filtered out like an empty list",
    ("if (ownScript)", "ConditionalExpression", "true"): (
        "without a currentScript, ownScript.src throws inside safely(): no init either way"
    ),
}


@dataclass
class Score:
    module: str
    killed: int = 0
    survived: int = 0
    timeout: int = 0
    no_coverage: int = 0
    equivalent: int = 0
    other: int = 0
    survivors: list[str] = field(default_factory=list)
    equivalents: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return (
            self.killed
            + self.survived
            + self.timeout
            + self.no_coverage
            + self.equivalent
            + self.other
        )

    @property
    def score(self) -> float:
        counted = self.total - self.equivalent
        return 100.0 * (self.killed + self.timeout) / counted if counted else 100.0


def _mutmut_run(max_children: int, names: list[str]) -> None:
    # mutmut prints a progress spinner; its exit code says nothing about survivors.
    done = subprocess.run(
        [sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children), *names],
        cwd=ROOT,
        check=False,
        timeout=MUTMUT_RUN_TIMEOUT_S,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        tail = done.stdout.replace("\r", "\n").splitlines()[-20:]
        sys.exit("mutmut run failed:\n" + "\n".join(tail) + done.stderr[-2000:])


def _not_killed() -> list[str]:
    names = []
    for meta in (m for d in MUTATED_DIRS for m in (ROOT / "mutants" / d).glob("*.py.meta")):
        codes: dict[str, int | None] = json.loads(meta.read_text())["exit_code_by_key"]
        names += [n for n, c in codes.items() if c not in KILLED_CODES | TIMEOUT_CODES]
    return sorted(names)


def run_mutmut(max_children: int, keep: bool) -> float:
    if not keep:
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)
    started = time.monotonic()
    _mutmut_run(max_children, [])
    if keep and (survivors := _not_killed()):
        # mutmut's cache keeps a survivor's verdict until its function changes;
        # a new test may kill it, so every survivor is checked again.
        _mutmut_run(max_children, survivors)
    return time.monotonic() - started


def mutmut_diff(name: str, path: str) -> tuple[list[str], list[str]]:
    """The lines a mutant removes and adds (what ``mutmut show`` prints)."""
    # In-process: ``mutmut show`` costs a second per mutant in start-up alone.
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    lines = [
        ln
        for ln in get_diff_for_mutant(name, path=path).splitlines()
        if not ln.startswith(("+++", "---"))
    ]
    return (
        [ln[1:].strip() for ln in lines if ln.startswith("-")],
        [ln[1:].strip() for ln in lines if ln.startswith("+")],
    )


#: Where the case of a literal matters even when it looks like a header name:
#: compared with a lowercased string, or a codec name.
_CASE_MATTERS: Final = ("startswith", "endswith", "lower()", "upper()", "decode(", "encode(")
#: Header names without a hyphen that the modules spell in literals.
_ONE_WORD_HEADERS: Final = frozenset(
    {"vary", "origin", "host", "connection", "via", "upgrade", "traceparent", "tracestate", "b3"}
)


def header_case_only(removed: list[str], added: list[str]) -> bool:
    """Whether a mutant only changes the case of one header-name literal."""
    if len(removed) != 1 or len(added) != 1 or removed == added:
        return False
    if removed[0].lower() != added[0].lower():
        return False
    before = re.findall(r'"([^"]*)"', removed[0])
    after = re.findall(r'"([^"]*)"', added[0])
    changed = [old for old, new in zip(before, after, strict=False) if old != new]
    if len(before) != len(after) or len(changed) != 1:
        return False
    name = changed[0]
    if HEADER_NAME.fullmatch(name) is None or any(w in removed[0] for w in _CASE_MATTERS):
        return False
    # A one-word literal counts only where the line handles headers: elsewhere
    # "traceparent" may be a value (a span attribute) whose case matters.
    return "-" in name or (name.lower() in _ONE_WORD_HEADERS and "headers" in removed[0])


def shown(removed: list[str], added: list[str]) -> str:
    return " / ".join([*(f"- {x}" for x in removed), *(f"+ {x}" for x in added)])[:300]


def python_scores() -> list[Score]:
    scores = []
    for meta in sorted(m for d in MUTATED_DIRS for m in (ROOT / "mutants" / d).glob("*.py.meta")):
        module = f"{meta.parent.name}/{meta.name.removesuffix('.meta')}"
        score = Score(module)
        codes: dict[str, int | None] = json.loads(meta.read_text())["exit_code_by_key"]
        for name, code in sorted(codes.items()):
            if code in KILLED_CODES:
                score.killed += 1
                continue
            if code in TIMEOUT_CODES:
                score.timeout += 1
                continue
            removed, added = mutmut_diff(name, module)
            diff = f"`{name}`: `{shown(removed, added)}`"
            if name in EQUIVALENT:
                score.equivalent += 1
                score.equivalents.append((diff, EQUIVALENT[name]))
            elif code in (0, *NO_TESTS_CODES) and header_case_only(removed, added):
                score.equivalent += 1
                score.equivalents.append((diff, CASE_ONLY_REASON))
            elif code == 0:
                score.survived += 1
                score.survivors.append(diff)
            elif code in NO_TESTS_CODES:
                score.no_coverage += 1
                score.survivors.append(diff + " (no test covers it)")
            else:
                score.other += 1
                score.survivors.append(f"{diff} (exit code {code})")
        scores.append(score)
    return scores


def run_stryker(stryker: Path) -> float:
    STRYKER_REPORT.unlink(missing_ok=True)
    started = time.monotonic()
    subprocess.run(
        [str(stryker), "run"],
        cwd=SNIPPET_DIR,
        check=True,
        timeout=STRYKER_RUN_TIMEOUT_S,
        stdout=subprocess.DEVNULL,
    )
    return time.monotonic() - started


def snippet_score() -> Score:
    report = json.loads(STRYKER_REPORT.read_text())
    score = Score("frontend-snippet/snippet.js")
    for name, result in report["files"].items():
        lines = result["source"].splitlines()
        for mutant in result["mutants"]:
            status = mutant["status"]
            line_no = mutant["location"]["start"]["line"]
            line = lines[line_no - 1].strip()
            key = (line, mutant["mutatorName"], mutant.get("replacement", ""))
            where = f"{name}:{line_no} {mutant['mutatorName']}"
            shown = f"`{where}`: `{line[:120]}` → `{key[2][:120]}`"
            if status == "Killed":
                score.killed += 1
            elif status == "Timeout":
                score.timeout += 1
            elif key in EQUIVALENT_JS:
                score.equivalent += 1
                score.equivalents.append((shown, EQUIVALENT_JS[key]))
            elif status == "Survived":
                score.survived += 1
                score.survivors.append(shown)
            elif status == "NoCoverage":
                score.no_coverage += 1
                score.survivors.append(shown + " (no coverage)")
            else:
                score.other += 1
                score.survivors.append(f"{shown} ({status})")
    return score


def versions() -> str:
    node = subprocess.run(
        ["node", "--version"], check=False, capture_output=True, text=True, timeout=30
    ).stdout.strip()
    package = SNIPPET_DIR / "node_modules" / "@stryker-mutator" / "core" / "package.json"
    pinned = json.loads((SNIPPET_DIR / "package.json").read_text())["devDependencies"]
    stryker = (
        json.loads(package.read_text())["version"]
        if package.is_file()
        else pinned["@stryker-mutator/core"]
    )
    return (
        f"Python {platform.python_version()}, mutmut {metadata.version('mutmut')}, "
        f"pytest {metadata.version('pytest')}, hypothesis {metadata.version('hypothesis')}; "
        f"Node {node}, @stryker-mutator/core {stryker}"
    )


def write_report(scores: list[Score], durations: dict[str, float]) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    ran = ", ".join(f"{what} {seconds / 60:.1f} min" for what, seconds in durations.items())
    rows = [
        "| module | killed | survived | timeout | no coverage | equivalent | score |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in scores:
        flag = "" if s.score >= TARGET_SCORE else " ✗"
        rows.append(
            f"| `{s.module}` | {s.killed} | {s.survived} | {s.timeout} | {s.no_coverage} "
            f"| {s.equivalent} | {s.score:.1f} %{flag} |"
        )
    lines = [
        "# Mutation testing",
        "",
        "Written by `make mutate` (`benchmarks/mutation.py`); do not edit by hand.",
        f"Run {now} on {os.cpu_count()} CPU(s) ({ran}).",
        f"Versions: {versions()}.",
        "",
        "Score = (killed + timeout) / (all − equivalent); the target is "
        f"≥ {TARGET_SCORE:.0f} % per module. Python mutants run the fast tests that cover",
        "the mutated function (`[tool.mutmut]` in pyproject.toml); snippet mutants run",
        "`node --test frontend-snippet/test/` (`frontend-snippet/stryker.conf.json`).",
        "",
        *rows,
        "",
        "## Surviving mutants",
        "",
        "Each one is a behaviour no test checks: add a test, or list it as equivalent",
        "in `benchmarks/mutation.py` with the reason.",
        "",
    ]
    for s in scores:
        if s.survivors:
            lines += [f"### `{s.module}`", "", *(f"- {x}" for x in s.survivors), ""]
    if not any(s.survivors for s in scores):
        lines += ["None.", ""]
    lines += ["## Equivalent mutants", ""]
    for s in scores:
        if s.equivalents:
            lines += [f"### `{s.module}`", ""]
            lines += [f"- {name}: {reason}" for name, reason in s.equivalents]
            lines.append("")
    if not any(s.equivalents for s in scores):
        lines += ["None.", ""]
    return "\n".join(lines)


def main() -> int:
    os.chdir(ROOT)  # mutmut reads pyproject.toml and ./mutants from the working directory
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--keep", action="store_true", help="reuse mutmut's cached results in ./mutants"
    )
    parser.add_argument("--only", choices=("python", "snippet"), help="run one half only")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite MUTATION.md from ./mutants and the last Stryker report, running nothing",
    )
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    parser.add_argument(
        "--stryker",
        type=Path,
        default=SNIPPET_DIR / "node_modules" / ".bin" / "stryker",
        help="the stryker executable (default: the one npm ci installs in frontend-snippet)",
    )
    args = parser.parse_args()
    scores: list[Score] = []
    durations: dict[str, float] = {}
    if args.only != "snippet":
        if not args.report_only:
            durations["mutmut"] = run_mutmut(args.max_children, args.keep)
        scores += python_scores()
    if args.only != "python":
        if not args.report_only:
            durations["Stryker"] = run_stryker(args.stryker)
        scores.append(snippet_score())
    if args.report_only:
        durations = json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}
    else:
        DURATIONS.parent.mkdir(exist_ok=True)
        DURATIONS.write_text(json.dumps(durations))
    text = write_report(scores, durations)
    if args.only is None:
        OUT.write_text(text)
        print(f"wrote {OUT.relative_to(ROOT)}")
    else:
        print(text)
    for s in scores:
        print(f"{s.module}: {s.score:.1f} % ({s.survived + s.no_coverage} left)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
