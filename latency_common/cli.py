"""Command-line helpers every entry point shares.

What it is for: the project's rules for configuration, written once: a flag
wins over its environment variable, the variable over the default
(:func:`resolve`), and a bad value is one line on stderr and exit code 2,
never a traceback or a usage dump (:class:`OneLineParser`); plus
:func:`url_host` for printing listen addresses.

Not for: what any program's settings mean (each program's own config).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """argparse, but every error is ``<prog>: error: <message> (see --help)``
    on one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def resolve(
    flag_value: str | None, flag_name: str, environ: Mapping[str, str], var: str
) -> tuple[str, str] | None:
    """The raw value and where it came from, flag > environment; None when
    neither gave one (an empty or blank variable counts as not given). The
    source is named in error messages so a user knows what to fix."""
    if flag_value is not None:
        return flag_value, flag_name
    raw = environ.get(var)
    if raw is not None and raw.strip():
        return raw.strip(), var
    return None


def url_host(host: str) -> str:
    """A host as it goes into a URL: IPv6 literals in brackets (RFC 3986 §3.2.2)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
