"""``python -m backend``: see :mod:`backend.cli` for the flags and variables.

Only the entry point lives here, so importing ``backend.cli`` in tests runs
nothing.
"""

from __future__ import annotations

import sys

from backend.cli import main

try:
    sys.exit(main())
except KeyboardInterrupt:
    # Ctrl-C before the signal handlers are installed (during start-up) is
    # still a clean stop: no traceback. 130 = 128 + SIGINT, the shell convention.
    sys.exit(130)
