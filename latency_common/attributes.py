"""The ``latency.*`` span attributes: one list for the code that writes them
(the gateway) and the code that reads them (the viewer, the Collector
config's sampling policy, the README's queries).

The ``latency.`` and ``gateway.`` namespaces are ours; ``browser.*`` and ``app.*`` belong to
others (HTTP semantic conventions leave custom namespaces to the user).
"""

from __future__ import annotations

from typing import Final

PREFIX: Final = "latency."

STATUS: Final = "latency.status"
REASON: Final = "latency.reason"
TRUST: Final = "latency.trust"
UPLINK_MS: Final = "latency.uplink_ms"
UPLINK_ERROR_MS: Final = "latency.uplink_error_ms"
UPLINK_UPPER_BOUND_MS: Final = "latency.uplink_upper_bound_ms"
RTT_MS: Final = "latency.rtt_ms"
PRE_REQUEST_MS: Final = "latency.pre_request_ms"
CLOCK_OFFSET_BUCKET: Final = "latency.clock_offset_bucket"
SYNC_DELAY_MS: Final = "latency.sync_delay_ms"
SYNC_AGE_MS: Final = "latency.sync_age_ms"
GATEWAY_MS: Final = "latency.gateway_ms"
UPSTREAM_MS: Final = "latency.upstream_ms"
#: On the gateway's SERVER span: the upstream it forwards to (semconv's
#: server.address/server.port there name the host the client addressed).
UPSTREAM_ADDRESS: Final = "gateway.upstream.address"
UPSTREAM_PORT: Final = "gateway.upstream.port"
#: On browser spans built from beacons: where the figures came from.
SOURCE: Final = "latency.source"
