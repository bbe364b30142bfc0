"""``python -m gateway.viewer``: see ``gateway/viewer/cli.py``."""

from __future__ import annotations

from gateway.viewer.cli import main

if __name__ == "__main__":
    main()
