"""The demo frontend: a Cruddur-like home feed that uses the snippet.

``python frontend-snippet/demo/server.py [--host H] [--port P] [--gateway URL]``
serves one page on port 3000 (cross-origin to the gateway on 8080, as a real
frontend would be). The page loads the snippet from the gateway with a plain
``<script src>`` tag and fetches the feed through the gateway; a table shows,
per request, the trace id, the gateway's verdict and the measured latency.

A Flask development server is enough here: it serves three static files.
"""

from __future__ import annotations

import argparse
import html
import os
import signal
import sys
from pathlib import Path

from flask import Flask, Response, send_from_directory
from werkzeug.serving import make_server

HERE = Path(__file__).resolve().parent


def create_app(gateway_url: str) -> Flask:
    app = Flask(__name__, static_folder=None)
    page = (HERE / "index.html").read_text(encoding="utf-8")
    page = page.replace("{{GATEWAY}}", html.escape(gateway_url.rstrip("/"), quote=True))

    @app.get("/")
    def index() -> Response:
        return Response(page, mimetype="text/html", headers={"Cache-Control": "no-store"})

    @app.get("/static/<path:name>")
    def static_file(name: str) -> Response:
        return send_from_directory(HERE / "static", name, max_age=0)

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="demo", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--host",
        default=os.environ.get("DEMO_HOST", "127.0.0.1"),
        help="listen address [DEMO_HOST] (default 127.0.0.1)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("DEMO_PORT", "3000")),
        help="listen port [DEMO_PORT] (default 3000)",
    )
    parser.add_argument(
        "--gateway",
        default=os.environ.get("DEMO_GATEWAY", "http://127.0.0.1:8080"),
        help="the gateway the page talks to [DEMO_GATEWAY]",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be 0..65535, got {args.port}")
    server = make_server(args.host, args.port, create_app(args.gateway), threaded=True)
    print(
        f"demo listening on http://{args.host}:{server.server_port} (gateway {args.gateway})",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # serve_forever() returns, the socket is closed


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop)
    sys.exit(main())
