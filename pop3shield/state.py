"""State that several pop3shield processes or hosts must share to stay correct behind a balancer.

Two things are shared, behind one small interface (:class:`IState`), every call returning a
Deferred so that no implementation can block the reactor:

* **Login failures**, counted per client address, per user name and per (address, user) pair
  (issue 10, "Brute force"): :meth:`~IState.failed` records one and returns the penalty level,
  the largest of the three counts; :meth:`~IState.penalty` reads it without recording (so a
  caller can answer from it before a password is hashed); :meth:`~IState.succeeded` forgives
  the failures of that one pair only (they are taken off the address's and the user's counts
  too), so holding one valid account does not reset the penalty for guessing others. Counts are
  forgotten after ``failure_ttl`` seconds without a new failure. A valid login also marks the
  pair *known* for ``known_ttl`` seconds; :meth:`~IState.counts` returns the counts and that mark
  together (:class:`LoginHistory`), so every process puts the next login of a user from an
  address it logged in from before at the head of its hashing queue (:mod:`pop3shield.hashpool`).
* **Connections**, as sets of members under a key (:func:`address_key` before login,
  :func:`user_key` after it): :meth:`~IState.acquire` adds a member unless the set
  already has ``limit``, :meth:`~IState.release` removes it. Every member carries an expiry
  ``connection_ttl`` seconds ahead, renewed by its process while the connection lives, so the
  connections of a process that died stop counting within one TTL.

:class:`LocalState` keeps it in this process (the default). :class:`RedisState` keeps it in Redis
(``[state] redis = "redis://..."``): each operation is one Lua script (atomic, and time from
Redis' own clock so hosts need not agree), run by the ``redis`` package's blocking client in a
small thread pool of its own with a bounded queue and a per-command socket timeout (a command
that waited longer than that timeout for a thread fails without being sent, so behind a hung
Redis every answer comes within about twice the timeout).
:class:`Failover` applies ``[state] on_error``: ``fail-closed`` lets :class:`StateUnavailable`
through (new connections and logins get ``-ERR [SYS/TEMP]``), ``fail-open`` answers from a
:class:`LocalState` while Redis cannot be reached, with a log line when that starts and ends.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

__all__ = ["Failover", "IState", "LocalState", "LoginHistory", "RedisState", "StateUnavailable", "address_key",
           "build_state", "user_key"]

log = Logger(namespace="pop3shield.state")

#: a quiet period after which failures are forgotten (Dovecot's anvil forgets after a while too)
FAILURE_TTL = 15 * 60.0
CONNECTION_TTL = 60.0
#: how long a pair that logged in stays known (its logins hashed first)
KNOWN_TTL = 7 * 86400.0


@dataclass(frozen=True, slots=True)
class LoginHistory:
    """What the shared state says of a login attempt before its password is checked."""

    #: failures of the client's address, of the user name (from anywhere), of the (address, user) pair
    address: int = 0
    user: int = 0
    pair: int = 0
    #: the pair logged in lately: an order of work only (hashed first), never a reason to let anyone in
    known: bool = False

    @property
    def level(self) -> int:
        """The penalty level the attempt meets: the largest of the three counts."""
        return max(self.address, self.user, self.pair)

    @property
    def own_failures(self) -> bool:
        """Failures of this client's own address or pair (a name guessed from elsewhere is not its doing)."""
        return bool(self.address or self.pair)


class StateUnavailable(Exception):
    """The shared state could not be reached in time (Redis down, slow, or its queue full)."""


class IState(Interface):
    """Brute-force counts and connection sets shared by every pop3shield process."""

    def failed(address: str, user: str | None) -> defer.Deferred[int]:
        """Record a failed login; the penalty level after it (1 for a first failure)."""

    def penalty(address: str, user: str | None) -> defer.Deferred[int]:
        """The penalty level a login attempt would meet now (0: none)."""

    def counts(address: str, user: str | None) -> defer.Deferred[LoginHistory]:
        """The failure counts of the address, the user name and the pair (0 where there is none),
        and whether the pair is known (logged in within ``known_ttl``)."""

    def succeeded(address: str, user: str) -> defer.Deferred[None]:
        """A valid login: forget the failures of this (address, user) pair, and only those; mark it known."""

    def take(key: str, rate: float, burst: int) -> defer.Deferred[bool]:
        """Take a token from the bucket ``key`` (refilled at ``rate`` a second, ``burst`` at most); False if empty."""

    def acquire(key: str, member: str, limit: int) -> defer.Deferred[bool]:
        """Add ``member`` to the set ``key`` unless it already holds ``limit`` live members."""

    def release(key: str, member: str) -> defer.Deferred[None]:
        """Remove ``member`` from ``key`` (nothing happens if it is not there)."""

    def start() -> None:
        """Begin renewing this process's members (and whatever else runs in the background)."""

    def stop() -> defer.Deferred[None] | None:
        """Stop background work and release resources."""


def address_key(address: str | None) -> str:
    """The set of an address's connections that are not logged in."""
    return f"addr:{address}"


def user_key(user: str, address: str | None) -> str:
    """The set of a user's sessions from one address (NUL-separated: user names may hold ':')."""
    return f"user:{user}\x00{address}"


def failure_keys(address: str, user: str | None) -> list[str]:
    """The counters a failure raises: the address, the user name, the pair (user names compared as sent)."""
    keys = [f"fail:addr:{address}"]
    if user is not None:
        keys += [f"fail:user:{user}", f"fail:pair:{address}\x00{user}"]
    return keys


def known_key(address: str, user: str) -> str:
    """The mark of a pair that logged in lately."""
    return f"known:{address}\x00{user}"


# --------------------------------------------------------------------------- in this process


@implementer(IState)
class LocalState:
    """The default: this process's dicts, bounded (least recently touched evicted in O(1))."""

    def __init__(self, clock: Callable[[], float], *, failure_ttl: float = FAILURE_TTL,
                 known_ttl: float = KNOWN_TTL, max_entries: int = 100_000) -> None:
        self.clock = clock
        self.failure_ttl = failure_ttl
        self.known_ttl = known_ttl
        self.max_entries = max_entries
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()
        #: known pairs: key -> when it last logged in (the least recent evicted first, in O(1))
        self._known: OrderedDict[str, float] = OrderedDict()
        self._sets: dict[str, set[str]] = {}
        #: token buckets: key -> (tokens, time); least recently used evicted in O(1) (a full bucket
        #: is what a forgotten one would be, so eviction only ever forgives)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _count(self, key: str, now: float) -> int:
        entry = self._failures.get(key)
        if entry is None:
            return 0
        if now - entry[1] > self.failure_ttl:
            del self._failures[key]
            return 0
        return entry[0]

    def _set(self, key: str, count: int, now: float) -> None:
        if count <= 0:
            self._failures.pop(key, None)
            return
        self._failures[key] = (count, now)
        self._failures.move_to_end(key)
        while len(self._failures) > self.max_entries:
            self._failures.popitem(last=False)

    def failed_now(self, address: str, user: str | None) -> int:
        now = self.clock()
        level = 0
        for key in failure_keys(address, user):
            count = self._count(key, now) + 1
            self._set(key, count, now)
            level = max(level, count)
        return level

    def penalty_now(self, address: str, user: str | None) -> int:
        now = self.clock()
        return max(self._count(key, now) for key in failure_keys(address, user))

    def counts_now(self, address: str, user: str | None) -> LoginHistory:
        now = self.clock()
        found = [self._count(key, now) for key in failure_keys(address, user)]
        if user is None:
            return LoginHistory(found[0])
        return LoginHistory(found[0], found[1], found[2], self._is_known(known_key(address, user), now))

    def _is_known(self, key: str, now: float) -> bool:
        seen = self._known.get(key)
        if seen is None:
            return False
        if now - seen > self.known_ttl:
            del self._known[key]
            return False
        return True

    def counts(self, address: str, user: str | None) -> defer.Deferred[LoginHistory]:
        return defer.succeed(self.counts_now(address, user))

    def succeeded_now(self, address: str, user: str) -> None:
        now = self.clock()
        known = known_key(address, user)
        self._known[known] = now
        self._known.move_to_end(known)
        while len(self._known) > self.max_entries:
            self._known.popitem(last=False)
        keys = failure_keys(address, user)
        forgiven = self._count(keys[2], now)
        if not forgiven:
            return
        self._failures.pop(keys[2], None)
        for key in keys[:2]:
            if key in self._failures:
                count, last = self._failures[key]
                self._set(key, count - forgiven, last)

    def failed(self, address: str, user: str | None) -> defer.Deferred[int]:
        return defer.succeed(self.failed_now(address, user))

    def penalty(self, address: str, user: str | None) -> defer.Deferred[int]:
        return defer.succeed(self.penalty_now(address, user))

    def succeeded(self, address: str, user: str) -> defer.Deferred[None]:
        self.succeeded_now(address, user)
        return defer.succeed(None)

    def take_now(self, key: str, rate: float, burst: int) -> bool:
        now = self.clock()
        tokens, last = self._buckets.pop(key, (float(burst), now))
        tokens = min(float(burst), tokens + max(0.0, now - last) * rate)
        taken = tokens >= 1.0
        if taken:
            tokens -= 1.0
        if tokens < burst:  # a full bucket need not be kept
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self.max_entries:
                self._buckets.popitem(last=False)
        return taken

    def take(self, key: str, rate: float, burst: int) -> defer.Deferred[bool]:
        return defer.succeed(self.take_now(key, rate, burst))

    def acquire(self, key: str, member: str, limit: int) -> defer.Deferred[bool]:
        members = self._sets.setdefault(key, set())
        if member in members:
            return defer.succeed(True)
        if len(members) >= limit:
            return defer.succeed(False)
        members.add(member)
        return defer.succeed(True)

    def release(self, key: str, member: str) -> defer.Deferred[None]:
        members = self._sets.get(key)
        if members is not None:
            members.discard(member)
            if not members:
                del self._sets[key]
        return defer.succeed(None)

    def count(self, key: str) -> int:
        return len(self._sets.get(key, ()))

    def start(self) -> None:
        pass

    def stop(self) -> None:
        return None


# --------------------------------------------------------------------------- in Redis

# KEYS: the failure counters; ARGV[1]: TTL in ms. Returns the largest count after the increment.
_FAILED = """
local level = 0
for i, key in ipairs(KEYS) do
  local n = redis.call('INCR', key)
  redis.call('PEXPIRE', key, ARGV[1])
  if n > level then level = n end
end
return level
"""
# KEYS: address, user, pair counters, the pair's known mark; ARGV[1]: how long it stays known, ms.
# The pair's failures come off the other two.
_SUCCEEDED = """
redis.call('SET', KEYS[4], '1', 'PX', ARGV[1])
local n = tonumber(redis.call('GET', KEYS[3]) or '0')
if n > 0 then
  for i = 1, 2 do
    if redis.call('DECRBY', KEYS[i], n) <= 0 then redis.call('DEL', KEYS[i]) end
  end
  redis.call('DEL', KEYS[3])
end
return n
"""
# KEYS[1]: the set (a sorted set, score = expiry in ms); ARGV: member, limit, TTL ms
_ACQUIRE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 1 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
# KEYS: sets; ARGV[1]: TTL ms, ARGV[2..]: the member in each set. Renews the members that still exist.
_RENEW = """
local t = redis.call('TIME')
local expiry = t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', expiry, ARGV[i + 1])
  redis.call('PEXPIRE', key, ARGV[1])
end
return #KEYS
"""


# KEYS[1]: the bucket (a hash: tokens, ms); ARGV: rate per second, burst. 1 if a token was taken.
_TAKE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local v = redis.call('HMGET', KEYS[1], 'tokens', 'ms')
local tokens, last = tonumber(v[1]) or burst, tonumber(v[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - last) * rate / 1000)
local taken = 0
if tokens >= 1 then tokens = tokens - 1; taken = 1 end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ms', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return taken
"""


@implementer(IState)
class RedisState:
    """The shared state in Redis, every command bounded in time and never on the reactor."""

    def __init__(self, url: str, reactor: Any, *, timeout: float = 0.5, threads: int = 2, max_queue: int = 256,
                 prefix: str = "pop3shield:", failure_ttl: float = FAILURE_TTL,
                 connection_ttl: float = CONNECTION_TTL, known_ttl: float = KNOWN_TTL) -> None:
        import redis  # the blocking client, used from the thread pool below only

        self.url = url
        self.reactor = reactor
        self.timeout = timeout
        self.max_queue = max_queue
        self.prefix = prefix
        self.failure_ttl_ms = int(failure_ttl * 1000)
        self.known_ttl_ms = int(known_ttl * 1000)
        self.connection_ttl = connection_ttl
        self.client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                           retry_on_timeout=False, max_connections=threads + 1,
                                           health_check_interval=0)
        self._errors = (redis.RedisError, OSError)
        self._scripts = {name: self.client.register_script(text) for name, text in
                         (("failed", _FAILED), ("succeeded", _SUCCEEDED), ("acquire", _ACQUIRE),
                          ("renew", _RENEW), ("take", _TAKE))}
        self.pool = ThreadPool(minthreads=1, maxthreads=threads, name="pop3shield-state")
        self.pending = 0
        #: (key, member) of the live connections of this process, renewed every third of the TTL
        self._held: dict[tuple[str, str], None] = {}
        self._renewal: task.LoopingCall | None = None

    def describe(self) -> str:
        """The URL without a password, for log lines."""
        parts = urlsplit(self.url)
        host = parts.hostname or "?"
        return f"{parts.scheme}://{host}:{parts.port or 6379}{parts.path}"

    def _call(self, function: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        if self.pending >= self.max_queue:
            return defer.fail(StateUnavailable(f"{self.pending} Redis commands queued"))
        self.pending += 1

        def done(result: Any) -> Any:
            self.pending -= 1
            return result

        queued = time.monotonic()

        def blocking() -> Any:
            # behind a hung Redis the queue drains fast: a command that already waited its time fails unsent
            if time.monotonic() - queued > self.timeout:
                raise StateUnavailable(f"Redis {self.describe()}: waited {self.timeout:g} s for a thread")
            try:
                return function(*args)
            except self._errors as exc:
                raise StateUnavailable(f"Redis {self.describe()}: {type(exc).__name__}: {exc}") from None

        d = deferToThreadPool(self.reactor, self.pool, blocking)
        d.addBoth(done)
        return d

    def _keys(self, names: list[str]) -> list[str]:
        return [self.prefix + name for name in names]

    # the blocking operations, one round trip each (run in the pool; the tests call them directly)

    def failed_blocking(self, address: str, user: str | None) -> int:
        keys = self._keys(failure_keys(address, user))
        return int(self._scripts["failed"](keys=keys, args=[self.failure_ttl_ms]))

    def penalty_blocking(self, address: str, user: str | None) -> int:
        return max(int(v or 0) for v in self.client.mget(self._keys(failure_keys(address, user))))

    def counts_blocking(self, address: str, user: str | None) -> LoginHistory:
        if user is None:
            return LoginHistory(int(self.client.get(self._keys(failure_keys(address, None))[0]) or 0))
        found = self.client.mget(self._keys(failure_keys(address, user) + [known_key(address, user)]))
        a, u, p = (int(v or 0) for v in found[:3])
        return LoginHistory(a, u, p, found[3] is not None)

    def counts(self, address: str, user: str | None) -> defer.Deferred[LoginHistory]:
        return self._call(self.counts_blocking, address, user)

    def succeeded_blocking(self, address: str, user: str) -> None:
        self._scripts["succeeded"](keys=self._keys(failure_keys(address, user) + [known_key(address, user)]),
                                   args=[self.known_ttl_ms])

    def acquire_blocking(self, key: str, member: str, limit: int) -> bool:
        ttl = int(self.connection_ttl * 1000)
        return bool(self._scripts["acquire"](keys=[self.prefix + "conn:" + key], args=[member, limit, ttl]))

    def take_blocking(self, key: str, rate: float, burst: int) -> bool:
        return bool(self._scripts["take"](keys=[self.prefix + "rate:" + key], args=[repr(float(rate)), burst]))

    def take(self, key: str, rate: float, burst: int) -> defer.Deferred[bool]:
        return self._call(self.take_blocking, key, rate, burst)

    def failed(self, address: str, user: str | None) -> defer.Deferred[int]:
        return self._call(self.failed_blocking, address, user)

    def penalty(self, address: str, user: str | None) -> defer.Deferred[int]:
        return self._call(self.penalty_blocking, address, user)

    def succeeded(self, address: str, user: str) -> defer.Deferred[None]:
        return self._call(self.succeeded_blocking, address, user)

    def acquire(self, key: str, member: str, limit: int) -> defer.Deferred[bool]:
        d = self._call(self.acquire_blocking, key, member, limit)

        def held(ok: bool) -> bool:
            if ok:
                self._held[(self.prefix + "conn:" + key, member)] = None
            return ok
        d.addCallback(held)
        return d

    def release(self, key: str, member: str) -> defer.Deferred[None]:
        full = self.prefix + "conn:" + key
        if (full, member) not in self._held:
            return defer.succeed(None)  # never held here (refused, or acquired elsewhere)
        del self._held[(full, member)]
        d = self._call(self.client.zrem, full, member)
        d.addCallback(lambda _: None)
        return d

    def ping(self) -> defer.Deferred[Any]:
        return self._call(self.client.ping)

    def renew(self) -> defer.Deferred[Any]:
        held = list(self._held)
        ttl = int(self.connection_ttl * 1000)
        calls = []
        for start in range(0, len(held), 500):
            batch = held[start:start + 500]
            calls.append(self._call(lambda b=batch: self._scripts["renew"](
                keys=[k for k, _ in b], args=[ttl, *(m for _, m in b)])))
        d = defer.gatherResults(calls, consumeErrors=True)
        d.addErrback(lambda f: log.warn("shared state: renewing connections failed: {error}",
                                        error=f.value.subFailure.getErrorMessage()
                                        if hasattr(f.value, "subFailure") else f.getErrorMessage()))
        return d

    def start(self) -> None:
        self.pool.start()
        self._renewal = task.LoopingCall(self.renew)
        self._renewal.clock = self.reactor
        self._renewal.start(self.connection_ttl / 3, now=False)

    def stop(self) -> None:
        if self._renewal is not None and self._renewal.running:
            self._renewal.stop()
        self.pool.stop()
        self.client.close()
        return None


# --------------------------------------------------------------------------- when Redis is away


@implementer(IState)
class Failover:
    """``[state] on_error``: let StateUnavailable through (fail-closed) or fall back (fail-open)."""

    def __init__(self, primary: RedisState, reactor: Any, *, fail_open: bool, probe_interval: float = 2.0) -> None:
        self.primary = primary
        self.reactor = reactor
        self.fail_open = fail_open
        self.fallback = LocalState(reactor.seconds)
        self.probe_interval = probe_interval
        self.degraded = False
        self._probe: Any = None

    def _run(self, name: str, *args: Any) -> defer.Deferred[Any]:
        if self.degraded:
            return getattr(self.fallback, name)(*args)
        d = getattr(self.primary, name)(*args)
        if self.fail_open:
            d.addErrback(self._fall_back, name, args)
        return d

    def _fall_back(self, failure: Any, name: str, args: tuple[Any, ...]) -> defer.Deferred[Any]:
        failure.trap(StateUnavailable)
        if not self.degraded:
            self.degraded = True
            log.error("shared state unavailable ({error}): fail-open, using this process's own state until it is back",
                      error=failure.getErrorMessage())
            self._schedule_probe()
        return getattr(self.fallback, name)(*args)

    def _schedule_probe(self) -> None:
        self._probe = self.reactor.callLater(self.probe_interval, self._check)

    def _check(self) -> None:
        self._probe = None
        d = self.primary.ping()

        def back(_: Any) -> None:
            self.degraded = False
            log.warn("shared state reachable again ({url}): fail-open ended", url=self.primary.describe())

        def still(_: Any) -> None:
            self._schedule_probe()
        d.addCallbacks(back, still)

    def failed(self, address: str, user: str | None) -> defer.Deferred[int]:
        return self._run("failed", address, user)

    def penalty(self, address: str, user: str | None) -> defer.Deferred[int]:
        return self._run("penalty", address, user)

    def counts(self, address: str, user: str | None) -> defer.Deferred[LoginHistory]:
        return self._run("counts", address, user)

    def succeeded(self, address: str, user: str) -> defer.Deferred[None]:
        return self._run("succeeded", address, user)

    def take(self, key: str, rate: float, burst: int) -> defer.Deferred[bool]:
        return self._run("take", key, rate, burst)

    def acquire(self, key: str, member: str, limit: int) -> defer.Deferred[bool]:
        return self._run("acquire", key, member, limit)

    def release(self, key: str, member: str) -> defer.Deferred[None]:
        # where it was acquired is not tracked: release both; an error only leaves a member to expire
        self.fallback.release(key, member)
        d = self.primary.release(key, member)
        d.addErrback(lambda f: f.trap(StateUnavailable) and None)
        return d

    def start(self) -> None:
        log.info("shared state in Redis {url} (on_error={mode}, timeout {timeout:g} s)", url=self.primary.describe(),
                 mode="fail-open" if self.fail_open else "fail-closed", timeout=self.primary.timeout)
        self.primary.start()

    def stop(self) -> None:
        if self._probe is not None and self._probe.active():
            self._probe.cancel()
        self.primary.stop()
        return None


def build_state(config: Any, reactor: Any) -> IState:
    """The configured state: in this process, or Redis with its on_error behaviour."""
    state = config.state
    if not state.redis:
        return LocalState(reactor.seconds)
    redis_state = RedisState(state.redis, reactor, timeout=state.timeout, max_queue=state.max_queue,
                             prefix=state.prefix, connection_ttl=state.connection_ttl)
    return Failover(redis_state, reactor, fail_open=state.on_error == "fail-open")
