"""Gateway configuration: one frozen dataclass, read from flags, environment and defaults.

Precedence is flag > environment variable > default (ARCHITECTURE.md §2, as the OTel
BatchSpanProcessor does it). Every bad value raises :class:`ConfigError` with a
one-line message naming the variable or flag and what would be accepted; the
CLI turns it into ``gateway: error: …`` and exit code 2, never a traceback.

Not for: the ``OTEL_*`` variables (read by the OTel SDK itself, see
``telemetry.py``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from yarl import URL

from gateway.cors import parse_entry
from gateway.cpus import allowed_cpus

TrustMode = Literal["continue", "link", "restart"]
TRUST_MODES: tuple[TrustMode, ...] = ("continue", "link", "restart")
#: The gateway's own spans per proxied request: the SERVER span always; a
#: CLIENT span for the upstream call only when asked (README "A traced request").
SPAN_KINDS = ("server", "client")
LOG_LEVELS = ("debug", "info", "warning", "error")

#: No cross-origin page by default: only pages served from the gateway's own
#: origin get the snippet's headers through. ``make run`` and docker-compose.yml
#: name the demo's origin explicitly.
DEFAULT_ALLOWED_ORIGINS: tuple[str, ...] = ()

_T = TypeVar("_T")


class ConfigError(ValueError):
    """A configuration value a user gave is not usable; the message says why."""


@dataclass(frozen=True, slots=True)
class TimingRate:
    """Token bucket for timing reports per client: ``per_s`` refill, ``burst`` depth."""

    per_s: float = 20.0
    burst: int = 100


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Everything the gateway needs to know; see the table in README "Configuration"."""

    upstream: str = "http://127.0.0.1:4567"
    host: str = "127.0.0.1"
    port: int = 8080
    #: The CPUs the cgroup quota and affinity allow, not the host's cores.
    workers: int = field(default_factory=allowed_cpus)
    allowed_origins: tuple[str, ...] = DEFAULT_ALLOWED_ORIGINS
    trust_context: TrustMode = "continue"
    # The HMAC key for clock tokens. repr=False: it must never reach a log line.
    clock_key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    clock_key_generated: bool = True
    # Keys tokens and binds are still accepted under during a key rotation
    # (README, "Rotating the clock key"); never used to sign. repr=False too.
    clock_previous_keys: tuple[bytes, ...] = field(default=(), repr=False)
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    max_body_bytes: int = 10 * 1024 * 1024
    # How long a client may stay silent: idle between requests, mid-headers,
    # mid-body, or not reading our response (README "Operating it").
    client_timeout_s: float = 60.0
    # Bodies up to this size are read completely before the upstream call.
    buffer_body_bytes: int = 1024 * 1024
    # SIGTERM: how long in-flight requests may take to finish (spans are
    # flushed after that, within their own bound).
    shutdown_timeout_s: float = 10.0
    trusted_proxies: int = 0
    max_connections: int = 1024
    timing_rate: TimingRate = field(default_factory=TimingRate)
    log_level: str = "info"
    browser_service_name: str = "browser"
    #: Query keys whose values are redacted in exported URLs, on top of
    #: ``latency_common.redact.DEFAULT_SENSITIVE_QUERY_KEYS``.
    redact_query_params: tuple[str, ...] = ()
    #: Pass the browser's ``Host`` upstream instead of the upstream's own
    #: (README "Put it in front of your API"); off, as nginx's default.
    preserve_host: bool = False
    #: ``GATEWAY_SPANS``: ``("server",)`` (one span per request, the upstream
    #: call recorded on it) or ``("server", "client")`` (a separate CLIENT span).
    spans: tuple[str, ...] = ("server",)

    @property
    def client_span(self) -> bool:
        """Whether the upstream call gets its own CLIENT span."""
        return "client" in self.spans

    @property
    def upstream_url(self) -> URL:
        return URL(self.upstream)

    def replace(self, **changes: Any) -> GatewayConfig:
        """A copy with some fields changed, validated like the original."""
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new

    def validate(self) -> None:
        _check_upstream(self.upstream)
        _check_port("GATEWAY_PORT", self.port)
        if self.workers < 1:
            raise ConfigError(f"GATEWAY_WORKERS must be at least 1, got {self.workers}")
        if self.trust_context not in TRUST_MODES:
            raise ConfigError(
                f"GATEWAY_TRUST_CONTEXT must be one of {', '.join(TRUST_MODES)}, "
                f"got {self.trust_context!r}"
            )
        for origin in self.allowed_origins:
            _check_origin(origin)
        if len(self.clock_key) < 16:
            raise ConfigError("GATEWAY_CLOCK_KEY must be at least 16 bytes long")
        for number, key in enumerate(self.clock_previous_keys, 1):
            if len(key) < 16:
                # Never the key itself in the message: it is a secret.
                raise ConfigError(
                    f"GATEWAY_CLOCK_PREVIOUS_KEYS: key {number} must be at least 16 bytes long"
                )
        for name, value in (
            ("GATEWAY_CONNECT_TIMEOUT_S", self.connect_timeout_s),
            ("GATEWAY_READ_TIMEOUT_S", self.read_timeout_s),
            ("GATEWAY_CLIENT_TIMEOUT_S", self.client_timeout_s),
            ("GATEWAY_SHUTDOWN_TIMEOUT_S", self.shutdown_timeout_s),
        ):
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number of seconds, got {value}")
        if self.max_body_bytes < 0:
            raise ConfigError("GATEWAY_MAX_BODY_BYTES must not be negative")
        if self.buffer_body_bytes < 0:
            raise ConfigError("GATEWAY_BUFFER_BODY_BYTES must not be negative")
        if self.trusted_proxies < 0:
            raise ConfigError("GATEWAY_TRUSTED_PROXIES must not be negative")
        if self.max_connections < 1:
            raise ConfigError("GATEWAY_MAX_CONNECTIONS must be at least 1")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"GATEWAY_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}")
        if "server" not in self.spans or any(kind not in SPAN_KINDS for kind in self.spans):
            raise ConfigError(
                f"GATEWAY_SPANS must be 'server' or 'server,client', got {','.join(self.spans)!r}"
            )
        for param in self.redact_query_params:
            if not param or any(c in param for c in "&=#? ") or not param.isprintable():
                raise ConfigError(
                    f"GATEWAY_REDACT_QUERY_PARAMS must be comma-separated query keys "
                    f"(no '&', '=', '#', '?' or spaces), got {param!r}"
                )

    @classmethod
    def from_env(
        cls,
        flags: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> GatewayConfig:
        """Build from command-line flags (``None`` = not given) and the environment."""
        flags = flags or {}
        env = os.environ if environ is None else environ
        defaults = cls()

        def pick(attr: str, var: str, parse: Callable[[str, str], _T], default: _T) -> _T:
            given = flags.get(attr)
            if given is not None:
                return parse(f"--{attr.replace('_', '-')}", str(given))
            raw = env.get(var)
            if raw is not None and raw.strip() != "":
                return parse(var, raw.strip())
            return default

        key_text = pick("clock_key", "GATEWAY_CLOCK_KEY", _parse_str, "")
        config = cls(
            upstream=pick("upstream", "GATEWAY_UPSTREAM", _parse_str, defaults.upstream),
            host=pick("host", "GATEWAY_HOST", _parse_str, defaults.host),
            port=pick("port", "GATEWAY_PORT", _parse_int, defaults.port),
            workers=pick("workers", "GATEWAY_WORKERS", _parse_int, defaults.workers),
            allowed_origins=pick(
                "allowed_origins", "GATEWAY_ALLOWED_ORIGINS", _parse_list, DEFAULT_ALLOWED_ORIGINS
            ),
            trust_context=pick(
                "trust_context", "GATEWAY_TRUST_CONTEXT", _parse_trust, defaults.trust_context
            ),
            clock_key=key_text.encode() if key_text else defaults.clock_key,
            clock_key_generated=not key_text,
            # Environment only, like the key should be: a flag shows in `ps`.
            clock_previous_keys=tuple(
                item.encode()
                for item in _parse_list("", env.get("GATEWAY_CLOCK_PREVIOUS_KEYS", ""))
            ),
            connect_timeout_s=pick(
                "connect_timeout_s", "GATEWAY_CONNECT_TIMEOUT_S", _parse_float, 5.0
            ),
            read_timeout_s=pick("read_timeout_s", "GATEWAY_READ_TIMEOUT_S", _parse_float, 30.0),
            max_body_bytes=pick(
                "max_body_bytes", "GATEWAY_MAX_BODY_BYTES", _parse_size, defaults.max_body_bytes
            ),
            client_timeout_s=pick(
                "client_timeout_s",
                "GATEWAY_CLIENT_TIMEOUT_S",
                _parse_float,
                defaults.client_timeout_s,
            ),
            buffer_body_bytes=pick(
                "buffer_body_bytes",
                "GATEWAY_BUFFER_BODY_BYTES",
                _parse_size,
                defaults.buffer_body_bytes,
            ),
            shutdown_timeout_s=pick(
                "shutdown_timeout_s",
                "GATEWAY_SHUTDOWN_TIMEOUT_S",
                _parse_float,
                defaults.shutdown_timeout_s,
            ),
            trusted_proxies=pick("trusted_proxies", "GATEWAY_TRUSTED_PROXIES", _parse_int, 0),
            max_connections=pick(
                "max_connections", "GATEWAY_MAX_CONNECTIONS", _parse_int, defaults.max_connections
            ),
            timing_rate=pick("timing_rate", "GATEWAY_TIMING_RATE", _parse_rate, TimingRate()),
            log_level=pick("log_level", "GATEWAY_LOG_LEVEL", _parse_str, "info").lower(),
            browser_service_name=pick(
                "browser_service_name", "GATEWAY_BROWSER_SERVICE_NAME", _parse_str, "browser"
            ),
            redact_query_params=pick(
                "redact_query_params", "GATEWAY_REDACT_QUERY_PARAMS", _parse_list, ()
            ),
            preserve_host=pick("preserve_host", "GATEWAY_PRESERVE_HOST", _parse_bool, False),
            spans=tuple(
                dict.fromkeys(
                    kind.lower()
                    for kind in pick("spans", "GATEWAY_SPANS", _parse_list, defaults.spans)
                )
            ),
        )
        config.validate()
        return config


def _parse_str(name: str, raw: str) -> str:
    return raw


_BOOLS: dict[str, bool] = {
    **dict.fromkeys(("1", "true", "yes", "on"), True),
    **dict.fromkeys(("0", "false", "no", "off"), False),
}


def _parse_bool(name: str, raw: str) -> bool:
    value = _BOOLS.get(raw.strip().lower())
    if value is None:
        raise ConfigError(f"{name} must be one of 1, true, yes, on, 0, false, no, off, got {raw!r}")
    return value


def _parse_int(name: str, raw: str) -> int:
    try:
        return int(raw, 10)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None


def _parse_float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {raw!r}")
    return value


_SIZE_RE = re.compile(r"^\s*(\d+)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
}


def _parse_size(name: str, raw: str) -> int:
    match = _SIZE_RE.match(raw)
    if not match:
        raise ConfigError(f"{name} must be a size such as 10485760, 512KiB or 10MiB, got {raw!r}")
    unit = (match.group(2) or "b").lower()
    return int(match.group(1)) * _SIZE_UNITS[unit]


def _parse_list(name: str, raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _parse_trust(name: str, raw: str) -> TrustMode:
    value = raw.strip().lower()
    for mode in TRUST_MODES:
        if value == mode:
            return mode
    raise ConfigError(f"{name} must be one of {', '.join(TRUST_MODES)}, got {raw!r}")


_RATE_RE = re.compile(
    r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*s)?\s*(?:,\s*burst\s*(\d+))?\s*$", re.IGNORECASE
)


def _parse_rate(name: str, raw: str) -> TimingRate:
    match = _RATE_RE.match(raw)
    if not match:
        raise ConfigError(f"{name} must look like '20/s, burst 100', got {raw!r}")
    per_s = float(match.group(1))
    burst = int(match.group(2)) if match.group(2) else max(1, math.ceil(per_s * 5))
    if per_s <= 0 or burst < 1:
        raise ConfigError(f"{name} needs a positive rate and a burst of at least 1, got {raw!r}")
    return TimingRate(per_s=per_s, burst=burst)


def _check_port(name: str, port: int) -> None:
    if not 0 <= port <= 65535:
        raise ConfigError(f"{name} must be a port number from 0 to 65535, got {port}")


def _check_upstream(raw: str) -> None:
    try:
        url = URL(raw)
    except ValueError as exc:
        raise ConfigError(f"GATEWAY_UPSTREAM is not a URL: {raw!r} ({exc})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(f"GATEWAY_UPSTREAM must be http://host[:port] or https://…, got {raw!r}")
    if url.raw_path not in ("", "/") or url.raw_query_string or url.raw_fragment:
        raise ConfigError(
            f"GATEWAY_UPSTREAM must not have a path, query or fragment (the request's own "
            f"path is forwarded as is), got {raw!r}"
        )
    if url.user is not None or url.password is not None:
        raise ConfigError("GATEWAY_UPSTREAM must not carry credentials")
    _check_port("GATEWAY_UPSTREAM port", url.port or 0)


def _check_origin(origin: str) -> None:
    # An origin is scheme://host[:port] with nothing after it (RFC 6454 §6.1),
    # or a one-label wildcard pattern; "*" alone is refused on purpose: the
    # gateway grants CORS per named origin only.
    try:
        parse_entry(origin)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
