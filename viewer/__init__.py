"""The local trace viewer: an OTLP/HTTP receiver, a SQLite span store and a
small server-rendered web UI, the default sink when no OTLP
endpoint is configured.

Module map: ``otlp.py`` wire formats → ``spans.py`` records and trace shapes
→ ``store.py`` SQLite (``rollup.py`` its per-route figures) → ``report.py``
per-route latency statistics → ``pages.py`` HTML → ``app.py`` the aiohttp
routes → ``cli.py`` the command; ``hosts.py`` which Host names it answers.

Not for: production storage or querying (use Honeycomb or any OTLP backend
through an OpenTelemetry Collector); nothing here is imported by the gateway's
request path.
"""
