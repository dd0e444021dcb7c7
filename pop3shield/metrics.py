"""Prometheus metrics: what the server counts, and the optional HTTP endpoint that serves them.

Every :class:`Metrics` has a registry of its own (never prometheus_client's global one), so
tests and several factories in one process do not collide. The protocol calls a few hooks
(``connection_opened``, ``login``, ``command_line`` ...); the backends get the narrow
:class:`UpstreamMetrics` part (``observe_upstream``, ``upstream_error``); the rest is read at
scrape time from what already counts it: the event log's counters, the analysis pool, the
thread pools' queues, the log writers' drop counters.

Label values are always from fixed sets written here: a command keyword, a SASL mechanism or an
upstream error reason that is not in its set becomes ``other``, so no client can add label
values (cardinality) or put text of its own in the exposition (injection).

The endpoint is ``twisted.web`` with prometheus_client's ``MetricsResource`` on the configured
endpoint string (``[metrics] listen``, loopback by default), at ``/metrics``. It renders in the
reactor's thread pool, never on the reactor.
"""

from __future__ import annotations

import bisect
import collections
import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

__all__ = ["COMMAND_KEYWORDS", "LOGIN_MECHANISMS", "LOGIN_RESULTS", "UPSTREAM_ERRORS", "Metrics",
           "UpstreamMetrics", "metrics_site"]

#: the keywords of RFC 1939, RFC 2449 (CAPA), RFC 2595 (STLS) and RFC 5034 (AUTH); anything else is "other"
COMMAND_KEYWORDS = frozenset({
    "USER", "PASS", "APOP", "AUTH", "CAPA", "STLS", "QUIT", "STAT", "LIST", "RETR", "DELE", "NOOP",
    "RSET", "TOP", "UIDL",
})
#: what the session logs in with (``Authenticate.mechanism``)
LOGIN_MECHANISMS = frozenset({"USER", "APOP", "PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER"})
LOGIN_RESULTS = ("ok", "auth", "in-use", "unavailable")
#: which limit refused a connection
CONNECTION_REFUSALS = ("total", "address", "rate", "state")
#: why an upstream call failed, as the upstream backend reports it; anything else is "other"
UPSTREAM_ERRORS = frozenset({"connect", "timeout", "tls", "protocol", "auth", "closed"})

#: seconds: a login to an upstream POP3 server, a message fetched, an analysis waiting
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_QUEUE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: a keyword is at most 4 letters; the scanner keeps this many bytes of a line's start
_KEYWORD_BYTES = 5


class UpstreamMetrics:
    """What a backend that relays to an upstream server may report; passed to its builder."""

    def __init__(self, latency: _TallyHistogram, errors: Counter) -> None:
        self._latency = latency
        self._errors = errors

    def observe_upstream(self, seconds: float) -> None:
        """One upstream round trip (connect and login, or a command and its answer) took this long."""
        self._latency.observe(max(0.0, seconds))

    def upstream_error(self, reason: str) -> None:
        """An upstream call failed: ``connect``, ``timeout``, ``tls``, ``protocol``, ``auth``, ``closed``."""
        self._errors.labels(reason if reason in UPSTREAM_ERRORS else "other").inc()


class _Readings(Collector):
    """Values read at scrape time from the objects that already keep them."""

    def __init__(self) -> None:
        self.events: Any = None  # pop3shield.events.EventLog
        self.analyzer: Any = None  # pop3shield.analysis.Analyzer
        self.pools: list[tuple[str, Callable[[], Any]]] = []  # (name, returns a twisted ThreadPool)
        self.writers: list[tuple[str, Callable[[], Any]]] = []  # (log, returns a QueuedWriter or None)

    def collect(self) -> Iterable[Any]:
        events = CounterMetricFamily("pop3shield_security_events", "Security events by protection and action "
                                     "(counted before the event file's rate limit).",
                                     labels=["protection", "action"])
        if self.events is not None:
            for (protection, action), count in sorted(list(self.events.counters.items())):
                events.add_metric([protection, action], count)
        yield events
        depth = GaugeMetricFamily("pop3shield_analysis_queue_depth",
                                  "Arguments' analyses queued or running in the detector's pool.")
        refused = CounterMetricFamily("pop3shield_analysis_refused",
                                      "Analyses refused because the detector's queue was full (fail closed).")
        reasons = CounterMetricFamily("pop3shield_analysis_refusals",
                                      "Analyses refused for capacity, by reason: share (the source's share of "
                                      "the queue was full), full (the queue was full), wait (no worker within "
                                      "the wait).", labels=["reason"])
        if self.analyzer is not None:
            depth.add_metric([], self.analyzer.pending)
            refused.add_metric([], self.analyzer.refused)
            for reason, count in sorted(getattr(self.analyzer, "refused_by", {}).items()):
                reasons.add_metric([reason], count)
        yield depth
        yield refused
        yield reasons
        queued = GaugeMetricFamily("pop3shield_threadpool_queue_depth", "Work items waiting for a thread.",
                                   labels=["pool"])
        working = GaugeMetricFamily("pop3shield_threadpool_working", "Threads busy with a work item.",
                                    labels=["pool"])
        for name, get in self.pools:
            pool = get()
            if pool is None:
                continue
            queued.add_metric([name], _qsize(pool))
            busy = getattr(pool, "working", ())
            working.add_metric([name], busy if isinstance(busy, int) else len(busy))
        yield queued
        yield working
        dropped = CounterMetricFamily("pop3shield_log_dropped_lines",
                                      "Lines (or event records) a full writer queue dropped.", labels=["log"])
        failed = CounterMetricFamily("pop3shield_log_write_errors",
                                     "Lines (or event records) the writer thread could not write (an OSError, "
                                     "e.g. a full disk).", labels=["log"])
        for name, get in self.writers:
            writer = get()
            if writer is not None:
                dropped.add_metric([name], writer.dropped)
                failed.add_metric([name], writer.errors)
        yield dropped
        yield failed


def _qsize(pool: Any) -> int:
    if isinstance(getattr(pool, "queued", None), int):  # a pool that queues work itself (hashpool)
        return pool.queued
    q = getattr(pool, "q", None)  # twisted.python.threadpool.ThreadPool's queue of work
    try:
        return int(q.qsize()) if q is not None else 0
    except Exception:
        return 0


class Metrics:
    """All of pop3shield's metrics, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        disable_created_metrics()  # no *_created series next to every counter (process-wide setting)
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.connections_open = Gauge("pop3shield_connections_open", "Client connections open now.", registry=r)
        self.connections = Counter("pop3shield_connections", "Client connections, by whether a connection "
                                   "limit refused them.", ["result"], registry=r)
        self.logins = Counter("pop3shield_logins", "Login attempts that reached the backend, by mechanism and "
                              "result.", ["mechanism", "result"], registry=r)
        # counted on the reactor several times per command: plain integers, read at scrape time
        self.commands = _Tally("pop3shield_commands", "Command lines received, by keyword (other: anything "
                               "not a POP3 keyword).", ("command",))
        r.register(self.commands)
        self.sent = _Tally("pop3shield_sent_bytes", "Bytes sent to clients.", ())
        self.received = _Tally("pop3shield_received_bytes", "Bytes received from clients.", ())
        self._sent_counts, self._received_counts = self.sent.counts, self.received.counts
        self._sent_counts[()] = self._received_counts[()] = 0  # a total is exposed from the start
        r.register(self.sent)
        r.register(self.received)
        self.verdicts = _Tally("pop3shield_detector_verdicts", "Malicious-code detector verdicts per argument: "
                               "tier 0 clean, malicious or undecided (sent to tier 1); tier 1 clean, "
                               "malicious or refused (no capacity, or the analysis failed).",
                               ("tier", "verdict"))
        r.register(self.verdicts)
        self.analysis_wait = Histogram("pop3shield_analysis_queue_seconds", "Time an analysis waited in the "
                                       "detector's queue for a thread.", buckets=_QUEUE_BUCKETS, registry=r)
        # observed on the reactor for every relayed command: plain integers, read at scrape time
        self.upstream_latency = _TallyHistogram("pop3shield_upstream_seconds", "Upstream POP3 round trips.",
                                                _LATENCY_BUCKETS)
        r.register(self.upstream_latency)
        self.upstream_errors = Counter("pop3shield_upstream_errors", "Failed upstream calls, by reason.",
                                       ["reason"], registry=r)
        self.refusals = Counter("pop3shield_connections_refused", "Client connections refused, by limit: total "
                                "(max_connections), address (connections of one address before login), rate (new "
                                "connections a second of one address), state (the shared state unreachable).",
                                ["reason"], registry=r)
        self.evictions = Counter("pop3shield_connections_evicted", "Connections not logged in closed to make "
                                 "room for a new one at max_connections (the oldest, of the address with the "
                                 "most such connections).", registry=r)
        for result in ("accepted", "refused"):
            self.connections.labels(result)
        for reason in CONNECTION_REFUSALS:
            self.refusals.labels(reason)
        self.upstream = UpstreamMetrics(self.upstream_latency, self.upstream_errors)
        #: keyword as sent -> its label key, worked out once each
        self._command_counters: dict[bytes, tuple[str]] = {}
        self.readings = _Readings()
        r.register(self.readings)

    # ------------------------------------------------------------------ what is read at scrape time

    def watch(self, *, events: Any = None, analyzer: Any = None,
              pools: Sequence[tuple[str, Callable[[], Any]]] = (),
              writers: Sequence[tuple[str, Callable[[], Any]]] = ()) -> None:
        """Objects whose own counters the scrape reads (the event log, the analysis pool, ...)."""
        if events is not None:
            self.readings.events = events
        if analyzer is not None:
            self.readings.analyzer = analyzer
        self.readings.pools.extend(pools)
        self.readings.writers.extend(writers)

    # ------------------------------------------------------------------ hooks the protocol calls

    def connection_opened(self, accepted: bool) -> None:
        self.connections.labels("accepted" if accepted else "refused").inc()
        if accepted:
            self.connections_open.inc()

    def connection_refused(self, reason: str) -> None:
        """A connection limit said no: ``total``, ``address``, ``rate``, ``state``."""
        self.refusals.labels(reason if reason in CONNECTION_REFUSALS else "total").inc()

    def connection_evicted(self) -> None:
        """``max_connections`` was reached and the oldest connection waiting to log in made room."""
        self.evictions.inc()

    def connection_closed(self) -> None:
        self.connections_open.dec()

    def login(self, mechanism: str, result: str) -> None:
        mechanism = mechanism if mechanism in LOGIN_MECHANISMS else "other"
        self.logins.labels(mechanism, result if result in LOGIN_RESULTS else "unavailable").inc()

    def command(self, keyword: bytes) -> None:
        """One command line, by its first word (bytes from the client: only known keywords count)."""
        self.commands.add(self._command_key(keyword))

    def commands_seen(self, keywords: Sequence[bytes]) -> None:
        """The command lines of one read, by their first words: one increment per keyword."""
        add = self.commands.add
        if len(keywords) == 1:
            add(self._command_key(keywords[0]))
            return
        for keyword, count in collections.Counter(keywords).items():
            add(self._command_key(keyword), count)

    def _command_key(self, keyword: bytes) -> tuple[str]:
        key = self._command_counters.get(keyword)
        if key is None:
            try:
                word = keyword.decode("ascii").upper()
            except UnicodeDecodeError:
                word = ""
            key = (word if word in COMMAND_KEYWORDS else "other",)
            if len(self._command_counters) < 256:  # keywords as sent (any case): bounded
                self._command_counters[keyword] = key
        return key

    def sent_bytes(self, count: int) -> None:
        self._sent_counts[()] += count

    def received_bytes(self, count: int) -> None:
        self._received_counts[()] += count

    def quick_verdict(self, verdict: Any) -> None:
        """Tier 0's answer for one argument: None means undecided (it goes to tier 1)."""
        self.verdicts.add(("0", _verdict_name(verdict, "undecided")))

    def deep_verdicts(self, verdicts: Sequence[Any]) -> None:
        """Tier 1's answers: None means refused (the queue was full, or the analysis failed)."""
        for verdict in verdicts:
            self.verdicts.add(("1", _verdict_name(verdict, "refused")))

    def counting_quick_check(self, check: Callable[[bytes, str], Any] | None) -> Callable[[bytes, str], Any] | None:
        """``check`` (the detector's tier 0) with each verdict counted (on the reactor: it runs
        for every argument of every command, so it is a dict increment, not a locked counter)."""
        if check is None:
            return None
        counts = self.verdicts.counts
        undecided, clean, malicious = ("0", "undecided"), ("0", "clean"), ("0", "malicious")

        @functools.wraps(check)
        def quick_check(argument: bytes, field: str) -> Any:
            verdict = check(argument, field)
            if verdict is None:
                key = undecided
            elif getattr(verdict, "malicious", False):
                key = malicious
            else:
                key = clean
            counts[key] = counts.get(key, 0) + 1
            return verdict

        return quick_check

    def analysis_waited(self, seconds: float) -> None:
        """Called from the detector's pool thread when an analysis starts (thread-safe)."""
        self.analysis_wait.observe(max(0.0, seconds))


class _Tally(Collector):
    """A labelled counter kept as plain integers and read at scrape time.

    For counts made on the reactor thread only, many times per command: an increment is a dict
    update (prometheus_client's ``Counter.inc`` takes a lock). The exposition is the one a
    ``Counter`` of the same name, help and labels gives, series in the order first counted.
    """

    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = list(labels)
        self.counts: dict[tuple[str, ...], int] = {}

    def add(self, key: tuple[str, ...], amount: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + amount

    def collect(self) -> Iterable[Any]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for key, count in list(self.counts.items()):  # a copy: the reactor may count meanwhile
            family.add_metric(list(key), count)
        yield family


class _TallyHistogram(Collector):
    """A histogram kept as plain numbers and read at scrape time, for observations made on the
    reactor thread only (prometheus_client's ``Histogram.observe`` takes two locks); the
    exposition is the one a ``Histogram`` of the same name, help and buckets gives."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = [float(b) for b in buckets]
        self.counts = [0] * (len(self.bounds) + 1)  # per bucket (not cumulative); the last is +Inf
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.sum += amount
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1

    def collect(self) -> Iterable[Any]:
        counts, total = list(self.counts), self.sum  # a copy: the reactor may observe meanwhile
        cumulative, buckets = 0, []
        for bound, count in zip([*self.bounds, math.inf], counts):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        family = HistogramMetricFamily(self.name, self.documentation, labels=[])
        family.add_metric([], buckets, total)
        yield family


def _verdict_name(verdict: Any, none: str) -> str:
    if verdict is None:
        return none
    return "malicious" if getattr(verdict, "malicious", False) else "clean"


class CommandScanner:
    """Finds the keyword of each command line in the bytes a client sends, in bounded memory.

    The sans-I/O session does the real parsing; this only needs the first word of each line,
    so it keeps at most :data:`_KEYWORD_BYTES` bytes of the line being received. Lines received
    while the session is in a SASL exchange are not commands and are not counted.
    """

    __slots__ = ("_head", "_started", "_sasl")

    def __init__(self) -> None:
        self._head = b""
        self._started = False  # a line has begun
        self._sasl = False  # ... while the session was in a SASL exchange

    def feed(self, data: bytes, in_sasl: bool, count: Callable[[bytes], None]) -> None:
        """Call ``count`` with the first word of each line that ends in ``data``, in order."""
        for keyword in self.keywords(data, in_sasl):
            count(keyword)

    def keywords(self, data: bytes, in_sasl: bool) -> list[bytes]:
        """The first word of each command line that ends in ``data``, in order."""
        size = len(data)
        if not self._started and data.find(b"\n") == size - 1 >= 0:  # the usual read: one whole line
            return [] if in_sasl else [data[:min(_KEYWORD_BYTES, size - 1)].partition(b" ")[0].rstrip(b"\r")]
        start = 0
        found: list[bytes] = []
        if self._started:  # the end of the line the last read began
            end = data.find(b"\n")
            room = _KEYWORD_BYTES - len(self._head)
            if room > 0:
                self._head += data[:min(size if end < 0 else end, room)]
            if end < 0:
                return found
            if not self._sasl:
                found.append(self._head.partition(b" ")[0].rstrip(b"\r"))
            self._head, self._started = b"", False
            start = end + 1
        last = data.rfind(b"\n", start)
        if last >= 0:  # the lines begun and ended here, all begun in the state the session is in now
            if not in_sasl:
                found += [line[:_KEYWORD_BYTES].partition(b" ")[0].rstrip(b"\r")
                          for line in data[start:last].split(b"\n")]
            start = last + 1
        if start < size:  # a line begins: keep its first bytes
            self._started, self._sasl = True, in_sasl
            self._head = data[start:start + _KEYWORD_BYTES]
        return found


def metrics_site(metrics: Metrics) -> Any:
    """The twisted.web site: ``/metrics`` is prometheus_client's MetricsResource, the rest 404."""
    from prometheus_client.twisted import MetricsResource
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    root = Resource()
    root.putChild(b"metrics", MetricsResource(metrics.registry))
    site = Site(root)
    site.noisy = False
    site.log = lambda request: None  # no access log line per scrape
    return site
