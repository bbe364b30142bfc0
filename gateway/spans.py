"""The gateway's own SERVER and CLIENT spans: the SDK's span, minus its per-call cost.

What it is for: :func:`gateway_tracer` gives ``app.py`` the tracer it starts
its spans with. When ``latency_common.telemetry`` built the provider (it
owns the span processor, the span limits and knows no other processor sits
on the provider), that is a :class:`LightTracer`: its spans collect
attributes in a plain dict and, at ``end()``, become one
``opentelemetry.sdk.trace.ReadableSpan`` handed to that processor, already
encoded for OTLP (:class:`latency_common.otlp_encode.EncodedSpan`, so the
export thread only posts bytes). The OTel SDK ``Span`` with the gateway's
~20 attributes costs 17 µs on a quiet core (70 µs on the loaded bench
machine; a lock and ``BoundedAttributes`` validation per ``set_attribute``)
plus ~8 µs to encode on the export thread; this one ~8 µs plus ~5 µs to
encode, because every attribute the gateway sets is already a plain str,
int, float or bool (README, "The gateway's own spans").

What the SDK's ``Tracer.start_span`` / ``Span`` do (opentelemetry-sdk 1.45.1)
is kept, and tests/test_spans.py compares the exported protobuf of both over
generated attributes, samplers and parents: the sampler is asked once with
the same arguments and its attributes and trace state are used; a
non-recording decision gives a ``NonRecordingSpan`` whose context (sampled
flag clear) is still injected upstream; the id generator, resource, instrumentation scope,
links (filtered and bounded as the SDK does), status rules, times and the span
limits (a value that is not a plain str/int/float/bool, a full attribute
table or a value length limit switch the span to the SDK's own
``BoundedAttributes``, so eviction and truncation are the SDK's).

No lock: a span is only touched by the thread that started it (the event
loop), where the SDK's span locks on every call in case it is not.

Not for: spans of a provider the embedder passed in (``create_app(
tracer_provider=…)``, or a ``Telemetry`` without a processor): those keep the
SDK's ``Tracer``, whatever processors the provider has. Events, exceptions,
links added later and ``start_as_current_span`` behave as the SDK's, for
whoever embeds the gateway; the gateway itself uses none of them.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from time import time_ns
from typing import Final

from opentelemetry import context as context_api
from opentelemetry import trace as trace_api
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.trace import Event, SpanLimits, SpanProcessor
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TracerProvider,
)
from opentelemetry.util import types

from latency_common.otlp_encode import EncodedSpan
from latency_common.telemetry import Telemetry

log = logging.getLogger("gateway.spans")

#: Attribute values stored as they are (the SDK's ``_clean_attribute_value``
#: returns them unchanged when no length limit applies). Exact types: a
#: subclass (an ``IntEnum``, a ``str`` subclass) takes the SDK's path.
_PLAIN: Final = frozenset((str, bool, int, float))

_UNSET: Final = Status(StatusCode.UNSET)
_DROP: Final = Decision.DROP
_RECORD_AND_SAMPLE: Final = Decision.RECORD_AND_SAMPLE
#: (sampled, random trace id) → the new span's trace flags (W3C Trace
#: Context Level 2, trace-flags, "Random Trace ID Flag": the bit follows the
#: trace id, so a child keeps its parent's; the SDK sets it the same way).
_FLAGS: Final = {
    (sampled, random): TraceFlags(
        (TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
        | (TraceFlags.RANDOM_TRACE_ID if random else 0)
    )
    for sampled in (False, True)
    for random in (False, True)
}


class LightTracer(trace_api.Tracer):
    """Starts :class:`LightSpan` s for one instrumentation scope.

    ``sdk_tracer`` is what the provider's ``get_tracer`` returned: its
    public ``sampler``, ``id_generator``, ``resource`` (updated after a fork)
    and ``instrumentation_info`` are read from it, so both tracers agree."""

    def __init__(
        self,
        sdk_tracer: SdkTracer,
        processor: SpanProcessor,
        limits: SpanLimits,
        scope: InstrumentationScope,
    ) -> None:
        self.sdk_tracer = sdk_tracer
        self.sampler = sdk_tracer.sampler
        self.id_generator = sdk_tracer.id_generator
        self.processor = processor
        self.limits = limits
        self.scope = scope
        self.max_attributes = limits.max_span_attributes
        # With a value length limit every value is truncated as the SDK does.
        self.bounded = limits.max_span_attribute_length is not None

    def start_span(
        self,
        name: str,
        context: context_api.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace_api.Span:
        # Tracer.start_span of opentelemetry-sdk 1.45.1, step for step.
        links = links or ()
        parent: SpanContext | None = trace_api.get_current_span(context).get_span_context()
        if parent is None or not parent.is_valid:
            parent = None
            trace_id = self.id_generator.generate_trace_id()
            random_trace_id = self.id_generator.is_trace_id_random()
        else:
            trace_id = parent.trace_id
            random_trace_id = parent.trace_flags.random_trace_id
        result = self.sampler.should_sample(context, trace_id, name, kind, attributes, links)
        decision = result.decision
        flags = _FLAGS[decision is _RECORD_AND_SAMPLE, bool(random_trace_id)]
        span_context = SpanContext(
            trace_id,
            self.id_generator.generate_span_id(),
            is_remote=False,
            trace_flags=flags,
            trace_state=result.trace_state,
        )
        if decision is _DROP:
            return NonRecordingSpan(span_context)
        return LightSpan(
            self, name, span_context, parent, kind, result.attributes, links, start_time
        )

    # The API types this with its own (private) decorator's class.
    @contextmanager
    def start_as_current_span(  # type: ignore[override]
        self,
        name: str,
        context: context_api.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[trace_api.Span]:
        span = self.start_span(name, context, kind, attributes, links, start_time)
        with trace_api.use_span(
            span,
            end_on_exit=end_on_exit,
            record_exception=record_exception,
            set_status_on_exception=set_status_on_exception,
        ) as current:
            yield current

    def bounded_links(self, links: Sequence[Link]) -> BoundedList[Link]:
        """``Span._new_links``: valid links only, each link's attributes and
        the list bounded by the limits."""
        valid = [self.bounded_link(link) for link in links if link and _valid_link(link)]
        return BoundedList.from_seq(self.limits.max_links, valid)

    def bounded_link(self, link: Link) -> Link:
        """The link with its attributes bounded by the limits, as the SDK stores it."""
        limits = self.limits
        attributes = BoundedAttributes(
            limits.max_link_attributes,
            link.attributes,
            max_value_len=limits.max_attribute_length,
            immutable=True,
        )
        return Link(link.context, attributes)


def _all_plain(attributes: Mapping[str, types.AnyValue]) -> bool:
    """Every key a non-empty str and every value a plain str/int/float/bool."""
    plain = _PLAIN
    for key, value in attributes.items():
        if type(key) is not str or not key or type(value) not in plain:
            return False
    return True


def _valid_link(link: Link) -> bool:
    """The SDK's ``_is_valid_link``: a valid context, or one carrying
    attributes or a trace state."""
    linked = link.context
    return bool(linked and (linked.is_valid or link.attributes or linked.trace_state))


class LightSpan(trace_api.Span):
    """A recording span whose attributes live in a plain dict until the
    SDK's rules would change something (see the module docstring)."""

    __slots__ = (
        "_attributes",
        "_context",
        "_end_time",
        "_events",
        "_kind",
        "_links",
        "_name",
        "_parent",
        "_start_time",
        "_status",
        "_tracer",
    )

    def __init__(
        self,
        tracer: LightTracer,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: Mapping[str, types.AnyValue],
        links: Sequence[Link],
        start_time: int | None,
    ) -> None:
        self._tracer = tracer
        self._name = name
        self._context = context
        self._parent = parent
        self._kind = kind
        self._status = _UNSET
        self._end_time: int | None = None
        self._events: BoundedList[Event] | None = None
        self._links: Sequence[Link] = tracer.bounded_links(links) if links else ()
        self._start_time = start_time if start_time is not None else time_ns()
        limit = tracer.max_attributes
        self._attributes: dict[str, types.AnyValue] | BoundedAttributes = dict(attributes)
        if (
            tracer.bounded
            or (limit is not None and len(attributes) > limit)
            or not _all_plain(attributes)
        ):
            self._bounded()

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        if self._end_time is not None:
            log.warning("Setting attribute on ended span.")
            return
        table = self._attributes
        if type(table) is dict and type(key) is str and key and type(value) in _PLAIN:
            if key in table:
                # As BoundedAttributes: a key set again moves to the end.
                del table[key]
            else:
                limit = self._tracer.max_attributes
                if limit is not None and len(table) >= limit:
                    table = self._bounded()
                    table[key] = value
                    return
            table[key] = value
            return
        self._bounded()[key] = value

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        if self._end_time is not None:
            log.warning("Setting attribute on ended span.")
            return
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def _bounded(self) -> BoundedAttributes:
        """The SDK's attribute table from now on, built from what was set so
        far (cleaned, truncated and, past the limit, evicted as the SDK's
        own table would have done)."""
        table = self._attributes
        if type(table) is dict:
            table = self._attributes = BoundedAttributes(
                self._tracer.max_attributes,
                table,
                immutable=False,
                max_value_len=self._tracer.limits.max_span_attribute_length,
            )
        assert isinstance(table, BoundedAttributes)
        return table

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        # Span.set_status of opentelemetry-sdk 1.45.1: OK is final, UNSET ignored.
        if self._end_time is not None:
            log.warning("Tried calling %s on an ended span.", "set_status")
            return
        if self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, Status):
            if status.status_code is StatusCode.UNSET:
                return
            if description is not None:
                log.warning(
                    "Description %s ignored. Use either `Status` or `(StatusCode, Description)`",
                    description,
                )
            self._status = status
        elif isinstance(status, StatusCode):
            if status is StatusCode.UNSET:
                return
            self._status = Status(status, description)

    def add_event(
        self, name: str, attributes: types.Attributes = None, timestamp: int | None = None
    ) -> None:
        if self._end_time is not None:
            log.warning("Tried calling %s on an ended span.", "_add_event")
            return
        limits = self._tracer.limits
        if self._events is None:
            self._events = BoundedList(limits.max_events)
        bounded = BoundedAttributes(
            limits.max_event_attributes,
            attributes,
            max_value_len=limits.max_attribute_length,
            immutable=True,
        )
        self._events.append(Event(name=name, attributes=bounded, timestamp=timestamp))

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        # Span.add_link of opentelemetry-sdk 1.45.1: an invalid link is
        # ignored before the ended-span check.
        link = Link(context, attributes)
        if not _valid_link(link):
            return
        if self._end_time is not None:
            log.warning("Tried calling %s on an ended span.", "_add_link")
            return
        links = self._links
        if not isinstance(links, BoundedList):
            links = self._links = BoundedList(self._tracer.limits.max_links)
        links.append(self._tracer.bounded_link(link))

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        module = type(exception).__module__
        qualname = type(exception).__qualname__
        recorded: dict[str, types.AnyValue] = {
            "exception.type": f"{module}.{qualname}"
            if module and module != "builtins"
            else qualname,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            recorded.update(attributes)
        self.add_event("exception", recorded, timestamp)

    def update_name(self, name: str) -> None:
        if self._end_time is not None:
            log.warning("Tried calling %s on an ended span.", "update_name")
            return
        self._name = name

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            log.warning("Calling end() on an ended span.")
            return
        self._end_time = end_time = end_time if end_time is not None else time_ns()
        tracer = self._tracer
        # No on_start call: telemetry's processors (the SDK's batch and
        # simple processors) do nothing there. Attributes cannot change any
        # more: set_attribute refuses an ended span.
        tracer.processor.on_end(
            EncodedSpan(
                name=self._name,
                context=self._context,
                parent=self._parent,
                resource=tracer.sdk_tracer.resource,
                attributes=self._attributes,
                events=self._events if self._events is not None else (),
                links=self._links,
                kind=self._kind,
                status=self._status,
                start_time=self._start_time,
                end_time=end_time,
                instrumentation_info=tracer.sdk_tracer.instrumentation_info,
                instrumentation_scope=tracer.scope,
            )
        )


def gateway_tracer(
    provider: TracerProvider,
    telemetry: Telemetry | None,
    name: str,
    version: str,
) -> trace_api.Tracer:
    """The tracer for the gateway's spans: a :class:`LightTracer` when
    ``telemetry`` built the provider with a processor, else the provider's
    own (the SDK's, or the no-op tracer under ``OTEL_SDK_DISABLED``)."""
    tracer = provider.get_tracer(name, version)
    if telemetry is None or telemetry.processor is None or type(tracer) is not SdkTracer:
        return tracer
    limits = telemetry.span_limits if telemetry.span_limits is not None else SpanLimits()
    return LightTracer(tracer, telemetry.processor, limits, InstrumentationScope(name, version))


__all__ = ["LightSpan", "LightTracer", "gateway_tracer"]
