"""Several worker processes on one set of listening sockets (``server.workers``).

With ``server.workers = N`` above 1, ``pop3shield run`` becomes a small supervisor:

* the parent opens every ``server.listen`` endpoint itself (so ``tcp:0`` is one port, ``systemd:``
  sockets are the ones systemd passed, a port below 1024 needs the capability only here) and
  never accepts on them: it spawns N workers (``python -m pop3shield.workers``) that inherit the
  sockets and adopt them (``reactor.adoptStreamPort``, with the TLS or PROXY wrapper the
  endpoint string asks for), so the kernel hands each new connection to whichever worker
  accepts first;
* every worker is a whole server (protections, backend, thread pool, event and log writers, on
  the same files, opened for append); it gets the parent's validated config through a pipe;
* with ``state.redis`` unset, the parent serves its own :class:`~pop3shield.state.LocalState` to
  the workers over AMP on a unix socket in a private directory (mode 0700):
  :class:`RemoteState` is the workers' :class:`~pop3shield.state.IState`, so the per-address
  connection limit, the per-user-and-address limit and the brute-force penalties hold across
  workers. The connections a worker held are released when it dies (its AMP connection
  ends). With ``state.redis`` set, the workers use Redis directly, as separate servers do;
* a worker that exits is restarted after a backoff (0.5 s, doubling up to 30 s, back to 0.5 s
  after a minute of life), with a log line each time; SIGTERM (and SIGINT) to the parent is
  passed on to every worker and the parent waits for them (SIGKILL after
  :data:`STOP_TIMEOUT`); SIGHUP is passed on too (each worker reopens its log and event file);
* READY=1 goes to systemd, and ``pop3shield: listening on ...`` to stdout, once every worker
  has its listeners;
* ``[metrics]``: the parent serves the endpoint; a scrape asks every worker for its exposition
  (over the same AMP connection) and serves all series with a ``worker`` label (``0``..``N-1``);
  ``pop3shield_workers`` and ``pop3shield_worker_restarts_total`` are the parent's own.

``server.max_connections`` and ``server.thread_pool_size`` are per worker, as are the log and
event rate limits (``rate_limit``, ``global_rate_limit``).
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.internet.endpoints import UNIXClientEndpoint, UNIXServerEndpoint, serverFromString
from twisted.logger import Logger
from twisted.protocols import amp
from zope.interface import implementer

from pop3shield.service import raise_backlog, uses_tls_section
from pop3shield.state import IState, LocalState, LoginHistory, StateUnavailable

__all__ = ["RemoteState", "Supervisor", "adopt_port", "run_supervisor"]

log = Logger(namespace="pop3shield.server")

#: seconds the parent waits for its workers after passing SIGTERM on, beyond their
#: ``server.shutdown_grace``, before SIGKILL
STOP_TIMEOUT = 20.0
#: restart backoff: first wait, longest wait, and the life after which it starts afresh
BACKOFF_FIRST, BACKOFF_MAX, BACKOFF_RESET = 0.5, 30.0, 60.0
#: the first descriptor number of the inherited listening sockets in a worker
FIRST_FD = 3


# --------------------------------------------------------------------------- the AMP protocol

# The state calls are AMP boxes without the Command layer (``callRemoteString`` and a responder
# that takes the raw box, the low-level API AMP offers "for simple messages for which the overhead
# of parsing is too great"): there are six of them in every session. Field names: k key, m member,
# l limit, a address, u user (absent: None), r rate, b burst, o the answer (b"1"/b"0", a level, or
# for counts three levels and the known mark, 1 or 0, separated by spaces).
ACQUIRE, RELEASE, FAILED, PENALTY, SUCCEEDED = b"acquire", b"release", b"failed", b"penalty", b"succeeded"
COUNTS, TAKE = b"counts", b"take"


def _text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


def _wire(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


class Ready(amp.Command):
    """Worker to parent: all my listeners are adopted."""

    arguments = [(b"index", amp.Integer()), (b"pid", amp.Integer())]
    response: list = []


class Scrape(amp.Command):
    """Parent to worker: your metrics exposition, zlib-compressed (AMP values are at most 64 KiB)."""

    arguments: list = []
    response = [(b"text", amp.String())]


class StateServer(amp.AMP):
    """The parent's side of one worker's connection: the shared LocalState, and the worker's members."""

    def __init__(self, supervisor: Supervisor) -> None:
        super().__init__()
        self.supervisor = supervisor
        self.shared = supervisor.state  # not self.state: AMP's receiver keeps its own there
        self.index: int | None = None
        #: (key, member) acquired through this connection: released if the worker dies
        self.held: set[tuple[str, str]] = set()

    def locateResponder(self, name: bytes) -> Any:
        raw = self._raw.get(name)
        return raw.__get__(self) if raw is not None else super().locateResponder(name)

    def _acquire(self, box: amp.AmpBox) -> amp.AmpBox:
        key, member = _text(box[b"k"]), _text(box[b"m"])
        ok = self.shared.acquire_now(key, member, int(box[b"l"]))
        if ok:
            self.held.add((key, member))
        return amp.AmpBox(o=b"1" if ok else b"0")

    def _release(self, box: amp.AmpBox) -> amp.AmpBox:
        key, member = _text(box[b"k"]), _text(box[b"m"])
        self.held.discard((key, member))
        self.shared.release_now(key, member)
        return amp.AmpBox()

    def _failed(self, box: amp.AmpBox) -> amp.AmpBox:
        user = box.get(b"u")
        level = self.shared.failed_now(_text(box[b"a"]), None if user is None else _text(user))
        return amp.AmpBox(o=b"%d" % level)

    def _penalty(self, box: amp.AmpBox) -> amp.AmpBox:
        user = box.get(b"u")
        level = self.shared.penalty_now(_text(box[b"a"]), None if user is None else _text(user))
        return amp.AmpBox(o=b"%d" % level)

    def _succeeded(self, box: amp.AmpBox) -> amp.AmpBox:
        self.shared.succeeded_now(_text(box[b"a"]), _text(box[b"u"]))
        return amp.AmpBox()

    def _counts(self, box: amp.AmpBox) -> amp.AmpBox:
        user = box.get(b"u")
        h = self.shared.counts_now(_text(box[b"a"]), None if user is None else _text(user))
        return amp.AmpBox(o=b"%d %d %d %d" % (h.address, h.user, h.pair, h.known))

    def _take(self, box: amp.AmpBox) -> amp.AmpBox:
        ok = self.shared.take_now(_text(box[b"k"]), float(box[b"r"]), int(box[b"b"]))
        return amp.AmpBox(o=b"1" if ok else b"0")

    _raw = {ACQUIRE: _acquire, RELEASE: _release, FAILED: _failed, PENALTY: _penalty, SUCCEEDED: _succeeded,
            COUNTS: _counts, TAKE: _take}

    @Ready.responder
    def ready(self, index: int, pid: int) -> dict[str, Any]:
        self.index = index
        self.supervisor.worker_ready(index, pid, self)
        return {}

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        for key, member in self.held:
            self.shared.release_now(key, member)
        self.held.clear()
        self.supervisor.channel_lost(self)


class SharedLocalState(LocalState):
    """The parent's LocalState with synchronous connection-set calls for the AMP responders."""

    def acquire_now(self, key: str, member: str, limit: int) -> bool:
        members = self._sets.setdefault(key, set())
        if member in members:
            return True
        if len(members) >= limit:
            if not members:
                del self._sets[key]
            return False
        members.add(member)
        return True

    def release_now(self, key: str, member: str) -> None:
        members = self._sets.get(key)
        if members is not None:
            members.discard(member)
            if not members:
                del self._sets[key]


# --------------------------------------------------------------------------- the worker's side

class WorkerChannel(amp.AMP):
    """The worker's connection to the parent: it answers scrapes; losing it ends the worker."""

    def __init__(self, metrics: Callable[[], bytes] | None = None, lost: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.metrics = metrics
        self.lost = lost

    @Scrape.responder
    def scrape(self) -> dict[str, Any]:
        text = self.metrics() if self.metrics is not None else b""
        return {"text": zlib.compress(text, 6)}

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        if self.lost is not None:
            self.lost()


@implementer(IState)
class RemoteState:
    """:class:`~pop3shield.state.IState` of a worker: every call a round trip to the parent's state.

    A call that cannot reach the parent fails with StateUnavailable (connections and logins get
    ``-ERR [SYS/TEMP]``, as with an unreachable Redis under ``fail-closed``).
    """

    def __init__(self, channel: WorkerChannel) -> None:
        self.channel = channel

    def _call(self, command: bytes, answer: bool = True, **fields: bytes) -> defer.Deferred[Any]:
        if self.channel.transport is None or not self.channel.transport.connected:
            return defer.fail(StateUnavailable("supervisor unreachable: the connection is gone"))
        try:
            d = self.channel.callRemoteString(command, requiresAnswer=answer, **fields)
        except Exception as exc:  # the connection is already gone
            return defer.fail(StateUnavailable(f"supervisor unreachable: {exc}"))
        if d is None:  # without an answer: sent, and ahead of every later call on the stream
            return defer.succeed(amp.AmpBox())

        def unavailable(failure: Any) -> None:
            raise StateUnavailable(f"supervisor unreachable: {failure.getErrorMessage()}")
        d.addErrback(unavailable)
        return d

    @staticmethod
    def _who(address: str, user: str | None) -> dict[str, bytes]:
        return {"a": _wire(address)} if user is None else {"a": _wire(address), "u": _wire(user)}

    def failed(self, address: str, user: str | None) -> defer.Deferred[int]:
        return self._call(FAILED, **self._who(address, user)).addCallback(lambda box: int(box[b"o"]))

    def penalty(self, address: str, user: str | None) -> defer.Deferred[int]:
        return self._call(PENALTY, **self._who(address, user)).addCallback(lambda box: int(box[b"o"]))

    def counts(self, address: str, user: str | None) -> defer.Deferred[LoginHistory]:
        def parse(box: amp.AmpBox) -> LoginHistory:
            a, u, p, known = (int(n) for n in box[b"o"].split())
            return LoginHistory(a, u, p, bool(known))
        return self._call(COUNTS, **self._who(address, user)).addCallback(parse)

    def succeeded(self, address: str, user: str) -> defer.Deferred[None]:
        return self._call(SUCCEEDED, answer=False, **self._who(address, user)).addCallback(lambda _: None)

    def take(self, key: str, rate: float, burst: int) -> defer.Deferred[bool]:
        return self._call(TAKE, k=_wire(key), r=repr(float(rate)).encode(), b=b"%d" % burst).addCallback(
            lambda box: box[b"o"] == b"1")

    def acquire(self, key: str, member: str, limit: int) -> defer.Deferred[bool]:
        return self._call(ACQUIRE, k=_wire(key), m=_wire(member), l=b"%d" % limit).addCallback(
            lambda box: box[b"o"] == b"1")

    def release(self, key: str, member: str) -> defer.Deferred[None]:
        d = self._call(RELEASE, answer=False, k=_wire(key), m=_wire(member)).addCallback(lambda _: None)
        d.addErrback(lambda f: f.trap(StateUnavailable) and None)  # the parent releases a dead worker's
        return d

    def start(self) -> None:
        pass

    def stop(self) -> None:
        return None


def adopt_port(reactor: Any, description: str, fd: int, family: int, factory: Any) -> Any:
    """Listen on an inherited socket with the wrappers the endpoint string asks for (TLS, PROXY)."""
    kind = description.split(":", 1)[0].strip().lower()
    if kind in ("ssl", "haproxy"):
        from twisted.internet.endpoints import SSL4ServerEndpoint, _WrapperServerEndpoint
        from twisted.protocols.tls import TLSMemoryBIOFactory

        endpoint = serverFromString(reactor, description)
        wrappers = []
        while isinstance(endpoint, _WrapperServerEndpoint):
            wrappers.append(endpoint._wrapperFactory)
            endpoint = endpoint._wrappedEndpoint
        for wrap in reversed(wrappers):
            factory = wrap(factory)
        if isinstance(endpoint, SSL4ServerEndpoint):
            factory = TLSMemoryBIOFactory(endpoint._sslContextFactory, False, factory)
    return reactor.adoptStreamPort(fd, family, factory)


@dataclass(frozen=True)
class WorkerPlan:
    """What a worker is told through its stdin (pickled): its config, index, sockets, the parent."""

    config: Any
    index: int
    #: (endpoint string, descriptor in the worker, address family) per ``server.listen`` entry
    listeners: tuple[tuple[str, int, int], ...]
    state_socket: str
    #: the shared state comes from the parent (no ``state.redis``)
    parent_state: bool


def _die_with_parent() -> None:
    """Linux: SIGTERM when the parent dies (a SIGKILLed supervisor leaves no orphan workers)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def worker_main() -> int:
    """``python -m pop3shield.workers``: one worker, its plan read from stdin."""
    _die_with_parent()
    plan: WorkerPlan = pickle.loads(sys.stdin.buffer.read())
    os.close(0)
    os.open(os.devnull, os.O_RDONLY)  # fd 0 again, so no later open gets it
    from twisted.internet import reactor

    from pop3shield.logsetup import begin_logging
    from pop3shield.service import make_service

    config = plan.config
    begin_logging(config.logging.path, config.logging.format, config.logging.level)
    holder: dict[str, Any] = {}

    def lost() -> None:
        if not holder.get("stopping") and reactor.running:
            log.error("worker {index}: the supervisor went away; stopping", index=plan.index)
            reactor.stop()

    def scrape() -> bytes:
        from prometheus_client import generate_latest

        top = holder.get("top")
        return generate_latest(top.metrics.registry) if top is not None else b""

    def connected(channel: WorkerChannel) -> None:
        state = RemoteState(channel) if plan.parent_state else None
        top = holder["top"] = make_service(config, reactor, state=state, adopted=plan.listeners)
        top.startService()  # installs the SIGTERM (grace) and SIGHUP (reload) handlers of pop3shield.lifecycle
        if hasattr(signal, "SIGINT"):
            # Ctrl-C reaches the whole process group: the supervisor turns it into one SIGTERM for
            # each worker, so the worker's own SIGINT must not count as a second (grace-ending) one
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        waits = [listener.listening for listener in top.listeners if listener.listening is not None]
        d = defer.gatherResults(waits, consumeErrors=True)
        d.addCallback(lambda _: channel.callRemote(Ready, index=plan.index, pid=os.getpid()))
        d.addErrback(lambda failure: log.failure("worker {index} did not start", failure, index=plan.index))

    def stopping() -> defer.Deferred[Any] | None:
        holder["stopping"] = True
        top = holder.get("top")
        return top.stopService() if top is not None else None

    def start() -> None:
        endpoint = UNIXClientEndpoint(reactor, plan.state_socket, timeout=10)
        factory = protocol.Factory.forProtocol(lambda: WorkerChannel(scrape, lost))
        factory.noisy = False
        d = endpoint.connect(factory)
        d.addCallback(connected)

        def failed(failure: Any) -> None:
            log.failure("worker {index} cannot reach the supervisor", failure, index=plan.index)
            reactor.pop3shield_exit_code = 1
            reactor.stop()
        d.addErrback(failed)

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", stopping)
    reactor.run()
    return int(getattr(reactor, "pop3shield_exit_code", 0))


# --------------------------------------------------------------------------- the parent

class _Refuse(protocol.Factory):
    """The parent's listeners never accept (it stops reading them at once); just in case."""

    noisy = False

    def buildProtocol(self, addr: Any) -> None:
        return None


class _WorkerProcess(protocol.ProcessProtocol):
    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.started = time.monotonic()
        self.ended: defer.Deferred[None] = defer.Deferred()

    def processEnded(self, reason: Any) -> None:
        self.supervisor.worker_ended(self, reason.value)
        self.ended.callback(None)


class Supervisor(service.Service):
    """The parent of ``server.workers`` processes (see the module's text)."""

    def __init__(self, config: Any, reactor: Any, announce: Callable[[str], None] | None = None,
                 python: str = sys.executable) -> None:
        self.config = config
        self.reactor = reactor
        self.count = config.server.workers
        self.announce = announce
        self.python = python
        self.state = SharedLocalState(reactor.seconds)
        self.ports: list[Any] = []
        self.listeners: list[tuple[str, int, int]] = []
        self.addresses: list[str] = []
        self.procs: dict[int, _WorkerProcess] = {}
        self.channels: dict[int, StateServer] = {}
        self.pids: dict[int, int] = {}
        self.backoff: dict[int, float] = {}
        self.restarts = 0
        self.stopping = False
        self.ready_once = False
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.directory = tempfile.mkdtemp(prefix="pop3shield-workers-")
        os.chmod(self.directory, 0o700)
        self.state_socket = os.path.join(self.directory, "state")
        self.state_port: Any = None
        self.metrics_port: Any = None
        self.pending: dict[int, Any] = {}

    # -- start

    @defer.inlineCallbacks
    def _start(self) -> Any:
        description = ""
        try:
            for description in self.config.server.listen:
                plain = description
                if self.config.tls.certificate is not None and uses_tls_section(description):
                    plain = "tcp:" + description.split(":", 1)[1]  # the worker adds [tls]'s TLS on top
                port = yield serverFromString(self.reactor, plain).listen(_Refuse())
                port.stopReading()
                raise_backlog(port, description)
                self.ports.append(port)
                sock = socket.socket(fileno=os.dup(port.fileno()))
                family = sock.family
                sock.detach()
                self.listeners.append((description, port.fileno(), family))
                address = port.getHost()
                self.addresses.append(f"{getattr(address, 'host', address)}:{getattr(address, 'port', '')}"
                                      .rstrip(":"))
            description = ""
            factory = protocol.Factory.forProtocol(lambda: StateServer(self))
            factory.noisy = False
            self.state_port = yield UNIXServerEndpoint(self.reactor, self.state_socket, mode=0o600).listen(factory)
            if self.config.metrics.enabled:
                description = self.config.metrics.listen
                self.metrics_port = yield serverFromString(self.reactor, self.config.metrics.listen).listen(
                    self._metrics_site())
                log.info("metrics on http://{address}/metrics (all workers, label worker)",
                         address=_address_text(self.metrics_port.getHost()))
        except Exception as exc:  # the same line as a single process says (ListenService._failed)
            if isinstance(exc, IndexError) and description.lower().startswith("systemd:"):
                exc = RuntimeError("systemd passed no such socket (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES)")
            message = f"cannot listen on {description!r}: {exc}" if description else f"cannot start: {exc}"
            log.critical(message)
            print(f"pop3shield: {message}", file=sys.stderr, flush=True)
            self.reactor.pop3shield_exit_code = 1
            self.reactor.stop()
            return
        log.info("supervisor (pid {pid}) starting {count} workers", pid=os.getpid(), count=self.count)
        for index in range(self.count):
            self.spawn(index)

    def startService(self) -> None:
        super().startService()
        self.reactor.callWhenRunning(self._start)

    def spawn(self, index: int) -> None:
        self.pending.pop(index, None)
        if self.stopping:
            return
        listeners = tuple((description, FIRST_FD + k, family)
                          for k, (description, _, family) in enumerate(self.listeners))
        plan = WorkerPlan(self.config, index, listeners, self.state_socket, parent_state=not self.config.state.redis)
        child_fds: dict[int, Any] = {0: "w", 1: 1, 2: 2}
        for k, (_, fd, _) in enumerate(self.listeners):
            child_fds[FIRST_FD + k] = fd
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")}
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the same code as the parent's
        env["PYTHONPATH"] = os.pathsep.join([here, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
        process = _WorkerProcess(self, index)
        transport = self.reactor.spawnProcess(process, self.python, [self.python, "-m", "pop3shield.workers"],
                                              env=env, childFDs=child_fds)
        transport.writeToChild(0, pickle.dumps(plan))
        transport.closeChildFD(0)
        self.procs[index] = process
        self.pids[index] = transport.pid
        log.info("worker {index} started (pid {pid})", index=index, pid=transport.pid)

    def worker_ready(self, index: int, pid: int, channel: StateServer) -> None:
        self.channels[index] = channel
        log.debug("worker {index} (pid {pid}) listening", index=index, pid=pid)
        if not self.ready_once and len(self.channels) == self.count:
            self.ready_once = True
            from pop3shield.sdnotify import notify

            for address, (description, _, _) in zip(self.addresses, self.listeners):
                log.info("listening on {address} ({description}) with {count} workers", address=address,
                         description=description, count=self.count)
                if self.announce is not None:
                    self.announce(address)
            notify("READY=1")
            self.ready.callback(None)

    def channel_lost(self, channel: StateServer) -> None:
        if channel.index is not None and self.channels.get(channel.index) is channel:
            del self.channels[channel.index]

    def worker_ended(self, process: _WorkerProcess, reason: Any) -> None:
        index = process.index
        if self.procs.get(index) is process:
            del self.procs[index]
        pid = self.pids.pop(index, None)
        if self.stopping:
            log.debug("worker {index} (pid {pid}) stopped", index=index, pid=pid)
            return
        lived = time.monotonic() - process.started
        wait = BACKOFF_FIRST if lived > BACKOFF_RESET else self.backoff.get(index, BACKOFF_FIRST)
        self.backoff[index] = min(BACKOFF_MAX, wait * 2)
        self.restarts += 1
        how = (f"signal {reason.signal}" if getattr(reason, "signal", None) else
               f"exit code {getattr(reason, 'exitCode', '?')}")
        log.error("worker {index} (pid {pid}) ended ({how}) after {lived:.1f} s; restarting in {wait:g} s",
                  index=index, pid=pid, how=how, lived=lived, wait=wait)
        self.pending[index] = self.reactor.callLater(wait, self.spawn, index)

    # -- stop

    def signal_workers(self, signum: int) -> None:
        for process in list(self.procs.values()):
            try:
                process.transport.signalProcess(signum)
            except Exception:  # it has just ended
                pass

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        self.stopping = True
        for call in self.pending.values():
            if call.active():
                call.cancel()
        self.pending.clear()
        waits = [process.ended for process in self.procs.values()]
        self.signal_workers(signal.SIGTERM)
        if waits:
            timer = self.reactor.callLater(self.config.server.shutdown_grace + STOP_TIMEOUT,
                                           self.signal_workers, signal.SIGKILL)
            yield defer.DeferredList(waits)
            if timer.active():
                timer.cancel()
        for port in [*self.ports, self.state_port, self.metrics_port]:
            if port is not None:
                yield defer.maybeDeferred(port.stopListening)
        try:
            os.rmdir(self.directory)
        except OSError:
            pass
        from pop3shield.sdnotify import notify

        notify("STOPPING=1")

    # -- metrics

    def _metrics_site(self) -> Any:
        from prometheus_client import CollectorRegistry
        from prometheus_client.twisted import MetricsResource
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        registry = CollectorRegistry()
        registry.register(_WorkersCollector(self))
        root = Resource()
        root.putChild(b"metrics", MetricsResource(registry))
        site = Site(root)
        site.noisy = False
        site.log = lambda request: None
        return site

    def scrape(self) -> defer.Deferred[list[tuple[int, bytes]]]:
        """Every ready worker's exposition (a worker that does not answer is left out)."""
        indexes = sorted(self.channels)
        calls = [self.channels[i].callRemote(Scrape) for i in indexes]
        d = defer.DeferredList(calls, consumeErrors=True)
        d.addCallback(lambda results: [(i, zlib.decompress(r["text"])) for i, (ok, r) in zip(indexes, results) if ok])
        return d


class _WorkersCollector:
    """The workers' series with a ``worker`` label, and the supervisor's own two (runs in a thread)."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
        from prometheus_client.parser import text_string_to_metric_families
        from twisted.internet.threads import blockingCallFromThread

        supervisor = self.supervisor
        texts = blockingCallFromThread(supervisor.reactor, supervisor.scrape)
        merged: dict[str, Metric] = {}
        for index, text in texts:
            for family in text_string_to_metric_families(text.decode("utf-8")):
                target = merged.get(family.name)
                if target is None:
                    target = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                for sample in family.samples:
                    target.add_sample(sample.name, {**sample.labels, "worker": str(index)}, sample.value,
                                      sample.timestamp)
        yield from merged.values()
        yield GaugeMetricFamily("pop3shield_workers", "Worker processes ready now.", value=len(supervisor.channels))
        yield CounterMetricFamily("pop3shield_worker_restarts", "Workers restarted after they ended.",
                                  value=supervisor.restarts)


def _address_text(address: Any) -> str:
    return f"{getattr(address, 'host', address)}:{getattr(address, 'port', '')}".rstrip(":")


def run_supervisor(config: Any, announce: Callable[[str], None] | None = None) -> int:
    """``pop3shield run`` with ``server.workers`` above 1: the parent, until SIGTERM/SIGINT."""
    from twisted.internet import reactor

    supervisor = Supervisor(config, reactor, announce)
    if hasattr(signal, "SIGHUP"):
        def hangup(signum: int, frame: Any) -> None:
            from pop3shield.logsetup import reopen_log

            reactor.callFromThread(reopen_log)  # the supervisor's own log file (logrotate)
            reactor.callFromThread(supervisor.signal_workers, signal.SIGHUP)
        signal.signal(signal.SIGHUP, hangup)
    reactor.callWhenRunning(supervisor.startService)
    reactor.addSystemEventTrigger("before", "shutdown", supervisor.stopService)
    reactor.run()
    return int(getattr(reactor, "pop3shield_exit_code", 0))


if __name__ == "__main__":
    sys.exit(worker_main())
