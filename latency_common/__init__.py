"""What the gateway, the viewer and the example backend share.

What it is for: the pieces all three programs need and none of them owns:
the OpenTelemetry set-up and fast OTLP export (``telemetry``, ``otlp_*``),
the ``latency.*`` attribute names (``attributes``), W3C Level 2 tracestate
(``tracestate``), query redaction (``redact``), and the small command-line
and logging helpers every entry point uses (``cli``, ``logs``).

Not for: anything that belongs to one program. The gateway, the viewer and
the backend import this package and their own modules, never each other
(``tests/test_layout.py`` checks it).
"""

from __future__ import annotations

__version__ = "0.2.0"
