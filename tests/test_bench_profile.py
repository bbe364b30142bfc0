"""benchmarks/pyspy.py's analysis and RESULTS.md's profile section, on
stacks a real py-spy recorded (``py-spy record --format raw --native
--full-filenames`` of a gateway worker run from another worktree,
``/work/wt-perf``; in the last line the upstream call sits below
``gateway/proxy.py``, as it does since proxy.py makes it): every table of
the section must have rows."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.servers import ROOT

sys.path[:0] = [str(ROOT / "benchmarks")]
import pyspy  # noqa: E402
import report  # noqa: E402

SAMPLE = (Path(__file__).parent / "data" / "pyspy-raw-sample.txt").read_text()


def test_a_frame_of_the_gateway_counts_as_ours_from_any_checkout() -> None:
    profile = pyspy.analyse(SAMPLE)
    # Line 1: the event loop in gateway/timing.py; line 2: the span export
    # thread (no gateway frame); line 3: gateway/proxy.py waiting for the GIL;
    # line 4: the upstream call from gateway/proxy.py.
    assert profile.samples == 5
    assert profile.by_gateway_line == {
        "gateway/timing.py:639 (allow)": 1,
        "gateway/proxy.py:215 (response_headers)": 1,
        "gateway/proxy.py:611 (call)": 1,
    }


def test_leaf_frames_name_files_by_package() -> None:
    profile = pyspy.analyse(SAMPLE)
    assert profile.by_leaf == {
        "allow (gateway/timing.py:639)": 1,
        "worker (opentelemetry/sdk/_shared_internal/__init__.py:162)": 2,
        "response_headers (gateway/proxy.py:215) → GIL wait": 1,
        "_request (aiohttp/client.py:900)": 1,
    }


def test_components() -> None:
    assert pyspy.analyse(SAMPLE).by_category == {
        "latency checks (gateway/timing.py, measure.py)": 1,
        pyspy.EXPORT_THREAD: 2,
        pyspy.GIL_WAIT: 1,
        # Not "header rules": proxy.py is on the stack, but the time is the call.
        "upstream request (aiohttp client)": 1,
    }


@pytest.mark.parametrize(
    ("path", "short"),
    [
        ("/work/wt-perf/gateway/app.py", "gateway/app.py"),
        (f"{ROOT}/gateway/measure.py", "gateway/measure.py"),
        ("/srv/gateway/checkout/gateway/app.py", "gateway/app.py"),
        ("/work/wt-perf/viewer/store.py", "viewer/store.py"),
        ("/work/wt-perf/.venv/lib/python3.11/site-packages/aiohttp/web.py", "aiohttp/web.py"),
        ("/root/.pyenv/versions/3.11.7/lib/python3.11/asyncio/runners.py", "asyncio/runners.py"),
        # Not a file of this repository: left as it is.
        ("/opt/other/gateway/nothere.py", "/opt/other/gateway/nothere.py"),
        ("<frozen runpy>", "<frozen runpy>"),
    ],
)
def test_short_paths(path: str, short: str) -> None:
    assert pyspy._short(path) == short


def test_profile_section_has_rows_in_every_table() -> None:
    section = "\n".join(report._profile("gateway (full)", pyspy.analyse(SAMPLE)))
    assert "| `gateway/timing.py:639 (allow)` | 20.0 % |" in section
    assert "| `gateway/proxy.py:215 (response_headers)` | 20.0 % |" in section
    assert "| `worker (opentelemetry/sdk/_shared_internal/__init__.py:162)` | 40.0 % |" in section
    assert "| latency checks (gateway/timing.py, measure.py) | 20.0 % |" in section
