"""RedisState's scripts against a real Redis (own config and data dir, loopback, stopped by PID).

The blocking operations are called directly here, the same ones the thread pool runs; the
thread pool, the timeouts and fail-closed/fail-open are exercised end to end in
tests/interop/test_haproxy.py. The checks mirror tests/test_state.py, so both implementations
answer alike.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pop3shield.state import LoginHistory
from tests.support.redis import RedisServer


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory):
    server = RedisServer()
    server.start(tmp_path_factory.mktemp("redis"))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def state(redis_url: str, request: pytest.FixtureRequest):
    from pop3shield.state import RedisState

    state = RedisState(redis_url, reactor=None, prefix=f"t-{request.node.name}:", connection_ttl=3.0)
    yield state
    state.client.close()


def test_levels_are_the_largest_of_address_user_and_pair(state) -> None:
    assert [state.failed_blocking("192.0.2.1", "bob") for _ in range(3)] == [1, 2, 3]
    assert state.failed_blocking("192.0.2.1", "carol") == 4
    assert state.failed_blocking("198.51.100.1", "bob") == 4
    assert state.penalty_blocking("198.51.100.2", "dave") == 0
    assert state.penalty_blocking("198.51.100.2", "bob") == 4
    assert state.failed_blocking("198.51.100.3", None) == 1


def test_valid_login_forgives_its_own_pair_only(state) -> None:
    for _ in range(3):
        state.failed_blocking("192.0.2.1", "bob")
    for _ in range(2):
        state.failed_blocking("192.0.2.1", "alice")
    state.succeeded_blocking("192.0.2.1", "alice")
    assert state.penalty_blocking("192.0.2.1", "alice") == 3
    assert state.penalty_blocking("192.0.2.1", "bob") == 3
    assert state.failed_blocking("192.0.2.1", "bob") == 4
    state.succeeded_blocking("192.0.2.1", "bob")
    assert state.penalty_blocking("192.0.2.1", "bob") == 0
    # no failure counter left behind; what remains is the two pairs' known marks, which expire
    assert sorted(state.client.keys(state.prefix + "*")) == [
        (state.prefix + "known:192.0.2.1\x00alice").encode(), (state.prefix + "known:192.0.2.1\x00bob").encode()]


def test_failure_counters_carry_the_quiet_period_as_ttl(state) -> None:
    state.failed_blocking("192.0.2.1", "bob")
    ttls = [state.client.pttl(key) for key in state._keys(["fail:addr:192.0.2.1", "fail:user:bob",
                                                           "fail:pair:192.0.2.1\x00bob"])]
    assert all(15 * 60 * 1000 - 5000 < ttl <= 15 * 60 * 1000 for ttl in ttls), ttls


def test_connection_sets_limit_and_expire(state) -> None:
    import time

    assert [state.acquire_blocking("addr:x", m, 2) for m in ("a", "b", "c")] == [True, True, False]
    assert state.acquire_blocking("addr:x", "a", 2) is True
    state.client.zrem(state.prefix + "conn:addr:x", "a")
    assert state.acquire_blocking("addr:x", "c", 2) is True
    time.sleep(3.2)  # connection_ttl = 3 s, nobody renewed: the members no longer count
    assert state.acquire_blocking("addr:x", "d", 1) is True
    assert state.client.zcard(state.prefix + "conn:addr:x") == 1


def test_the_url_is_logged_without_its_password(redis_url: str) -> None:
    from pop3shield.state import RedisState

    state = RedisState(redis_url.replace("redis://", "redis://:hunter2@"), reactor=None)
    assert "hunter2" not in state.describe() and state.describe() == redis_url
    state.client.close()


def test_the_token_bucket_is_shared_and_refills(state) -> None:
    """The new-connection rate per address (issue 10) in Redis: one bucket for every process."""
    import time

    assert [state.take_blocking("addr:192.0.2.1", 4.0, 2) for _ in range(3)] == [True, True, False]
    assert state.take_blocking("addr:192.0.2.2", 4.0, 2)  # another address, another bucket
    time.sleep(0.4)  # 4 a second: at least one token back
    assert state.take_blocking("addr:192.0.2.1", 4.0, 2)


def test_failure_counts_of_address_user_and_pair(state) -> None:
    state.failed_blocking("192.0.2.1", "bob")
    state.failed_blocking("192.0.2.1", "carol")
    assert state.counts_blocking("192.0.2.1", "bob") == LoginHistory(2, 1, 1, known=False)
    assert state.counts_blocking("192.0.2.9", "bob") == LoginHistory(0, 1, 0)
    assert state.counts_blocking("192.0.2.1", None) == LoginHistory(2, 0, 0)


def test_a_valid_login_marks_its_pair_known_for_every_process(state) -> None:
    """What a worker or host learns at a login orders the next one's hashing on any other (hashpool)."""
    state.failed_blocking("192.0.2.1", "bob")
    state.succeeded_blocking("192.0.2.1", "bob")
    assert state.counts_blocking("192.0.2.1", "bob") == LoginHistory(0, 0, 0, known=True)
    assert not state.counts_blocking("192.0.2.2", "bob").known and not state.counts_blocking("192.0.2.1", "ann").known
    ttl = state.client.pttl(state.prefix + "known:192.0.2.1\x00bob")
    assert 0 < ttl <= state.known_ttl_ms
