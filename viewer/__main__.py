"""``python -m viewer``: see ``viewer/cli.py``."""

from __future__ import annotations

from viewer.cli import main

if __name__ == "__main__":
    main()
