"""The local trace viewer: an OTLP/HTTP receiver, a SQLite span store and a
small server-rendered web UI (DESIGN §2), the default sink when no OTLP
endpoint is configured.

Module map: ``otlp.py`` wire formats → ``spans.py`` records and trace shapes
→ ``store.py`` SQLite → ``report.py`` per-route latency statistics →
``pages.py`` HTML → ``app.py`` the aiohttp routes → ``cli.py`` the command.

Not for: production storage or querying (use Honeycomb or any OTLP backend
through an OpenTelemetry Collector); nothing here is imported by the gateway's
request path.
"""
