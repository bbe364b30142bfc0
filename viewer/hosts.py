"""Which ``Host`` headers the viewer answers: its defence against DNS rebinding.

What it is for: a page on any web site can make a browser resolve its own
name to 127.0.0.1 and then read from (or post spans to) the viewer as if it
were same-origin. The one thing such a request cannot fake is the ``Host``
header, which carries the attacker's name: so the viewer answers only when
``Host`` names it (the address it binds, ``localhost``, a loopback address,
or a name given with ``--allowed-hosts``), with or without a port. Pure:
the header in, a verdict out.

Not for: answering the request (``app.py``) or any notion of users; the
viewer has no authentication, which is why it should bind loopback.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Final

#: Names every viewer answers to, whatever it binds.
ALWAYS_ALLOWED: Final = frozenset({"localhost"})
#: A wildcard bind address is not a name anyone reaches the viewer by.
_WILDCARDS: Final = frozenset({"0.0.0.0", "::", ""})


def normalize(name: str) -> str:
    """A host name as compared: lowercase (RFC 9110 §4.2.3: the host is
    case-insensitive), no IPv6 brackets, no trailing root dot."""
    name = name.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    return name[:-1] if name.endswith(".") else name


def allowed_names(bind_host: str, extra: Iterable[str] = ()) -> frozenset[str]:
    names = {normalize(bind_host), *ALWAYS_ALLOWED, *(normalize(n) for n in extra)}
    return frozenset(names - _WILDCARDS)


def host_name(header: str) -> str | None:
    """The uri-host of a ``Host`` header (RFC 9110 §7.2: ``uri-host [ ":"
    port ]``, an IPv6 literal in brackets per RFC 3986 §3.2.2), or None when
    it is not one."""
    header = header.strip()
    if header.startswith("["):
        end = header.find("]")
        if end < 0:
            return None
        name, rest = header[: end + 1], header[end + 1 :]
    else:
        name, _, port = header.partition(":")
        rest = ":" + port if _ else ""
    port = rest[1:]
    port_ok = not port or (len(port) <= 5 and port.isascii() and port.isdigit())
    if rest and not (rest[0] == ":" and port_ok):
        return None
    name = normalize(name)
    return name or None


def is_allowed(header: str | None, allowed: frozenset[str]) -> bool:
    """Whether a request with this ``Host`` header is for the viewer. A
    missing Host is refused (RFC 9112 §3.2: an HTTP/1.1 request must carry
    one; a browser always sends it)."""
    if header is None:
        return False
    name = host_name(header)
    if name is None:
        return False
    if name in allowed:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
