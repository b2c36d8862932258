"""The shard's shared per-client table (services/bank_server/peers.py): the same token-bucket
rule as security.RateLimiter, one bucket seen by every handle (process) that maps the file,
connection slots per worker, rows reused when a window fills, a dead worker's counts cleared."""
from __future__ import annotations

import random

import pytest

from services.bank_server.peers import (
    WINDOW,
    LocalSlots,
    PeerTable,
    SharedRateLimiter,
    SharedSlots,
)
from services.bank_server.security import RateLimiter
from services.bank_server.settings import BankServerSettings


@pytest.fixture
def table(tmp_path):
    t = PeerTable.create(tmp_path / "peers", rows=256)
    yield t
    t.close()


def test_shared_buckets_follow_the_rate_limiters_rule(table):
    rng = random.Random(0)
    local = RateLimiter(rate=5.0, burst=8.0)
    shared = SharedRateLimiter(table, "bytes", rate=5.0, burst=8.0)
    now = 100.0
    for _ in range(300):
        now += rng.choice([0.0, 0.01, 0.1, 0.5, 2.0])
        key, cost = rng.choice(["peer:a", "peer:b", "token:c"]), rng.choice([1, 3, 20])
        assert shared.take(key, cost, now=now) == pytest.approx(local.take(key, cost, now=now))


def test_every_handle_charges_one_bucket(table, tmp_path):
    other = PeerTable.open(tmp_path / "peers")           # as a worker process opens it
    a = SharedRateLimiter(table, "req", rate=0.001, burst=3)
    b = SharedRateLimiter(other, "req", rate=0.001, burst=3)
    waits = [lim.take("peer:x", now=10.0) for lim in (a, b, a, b)]
    assert waits[:3] == [0.0, 0.0, 0.0] and waits[3] > 0
    assert b.take("peer:y", now=10.0) == 0.0             # another client: its own bucket
    # the two buckets of a row are apart: bytes are not requests
    assert SharedRateLimiter(other, "bytes", rate=1, burst=3).take("peer:x", now=10.0) == 0.0
    other.close()


def test_slots_count_per_client_and_in_all_across_workers(table):
    w0 = SharedSlots(table, 0, max_connections=4, max_per_peer=2)
    w1 = SharedSlots(table, 1, max_connections=4, max_per_peer=2)
    assert w0.acquire("1.1.1.1") == "" and w1.acquire("1.1.1.1") == ""
    assert "from 1.1.1.1 (limit 2 per client)" in w0.acquire("1.1.1.1")
    assert w1.acquire("2.2.2.2") == "" and w0.acquire("3.3.3.3") == ""
    assert "(limit 4)" in w1.acquire("4.4.4.4")
    w0.release("1.1.1.1")
    assert w1.acquire("1.1.1.1") == ""
    # worker 1 dies holding three connections: the server clears its column
    table.clear_worker(1)
    assert int(table.totals.sum()) == 1
    assert w0.acquire("1.1.1.1") == "" and w0.acquire("5.5.5.5") == ""


def test_local_and_shared_slots_say_the_same(table):
    for slots in (LocalSlots(3, 1), SharedSlots(table, 0, 3, 1)):
        assert slots.acquire("h") == ""
        assert slots.acquire("h") == "too many data plane connections from h (limit 1 per client)"


def test_a_full_window_reuses_its_least_recent_row_without_connections(tmp_path):
    t = PeerTable.create(tmp_path / "small", rows=WINDOW)   # one window: every key shares it
    lim = SharedRateLimiter(t, "req", rate=0.001, burst=1)
    slots = SharedSlots(t, 0, max_connections=10**6, max_per_peer=1)
    assert slots.acquire("held") == ""                      # a row with a connection: kept
    for i in range(WINDOW - 1):
        assert lim.take(f"peer:{i}", now=float(i)) == 0.0
    assert lim.take("peer:new", now=60.0) == 0.0            # took peer:0's row (least recent)
    assert lim.take("peer:1", now=61.0) > 0                 # still known: its bucket is spent
    assert lim.take("peer:0", now=62.0) == 0.0              # forgotten: a full bucket again
    assert "per client" in slots.acquire("held")           # the held row survived it all
    t.close()


def test_open_refuses_what_is_not_a_table(tmp_path):
    (tmp_path / "junk").write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match="not a peer table"):
        PeerTable.open(tmp_path / "junk")
    PeerTable.create(tmp_path / "t").close()
    with pytest.raises(FileExistsError):
        PeerTable.create(tmp_path / "t")


def test_workers_need_the_data_plane():
    with pytest.raises(ValueError, match="set dataplane_port"):
        BankServerSettings(workers=2)
    assert BankServerSettings(workers=2, dataplane_port=0).workers == 2
    with pytest.raises(ValueError):
        BankServerSettings(workers=33, dataplane_port=0)


def test_windows_are_salted_per_table_and_a_full_window_fails_closed(tmp_path):
    """No client can compute another's window (the salt differs per table); a window whose
    every row holds connections refuses a newcomer on slots and limiters alike."""
    a = PeerTable.create(tmp_path / "a", rows=4096)
    b = PeerTable.create(tmp_path / "b", rows=4096)
    where_a = [a.row(f"peer:10.0.0.{i}", 1.0) // WINDOW for i in range(20)]
    where_b = [b.row(f"peer:10.0.0.{i}", 1.0) // WINDOW for i in range(20)]
    assert where_a != where_b
    a.close()
    b.close()
    t = PeerTable.create(tmp_path / "one", rows=WINDOW)
    slots = SharedSlots(t, 0, max_connections=10**6, max_per_peer=1)
    for i in range(WINDOW):
        assert slots.acquire(f"h{i}") == ""
    assert slots.acquire("late") == "too many data plane clients at once"
    assert SharedRateLimiter(t, "req", rate=2.0, burst=5).take("peer:late", now=1.0) > 0
    slots.release("h0")
    assert slots.acquire("late") == ""
    t.close()


def test_split_lru_keeps_the_largest_cacheable_block():
    from services.bank_server.workers import split_lru
    s = split_lru(BankServerSettings(workers=3, dataplane_port=0, lru_mb=400))
    assert (s.lru_mb, s.lru_max_item_mb) == (100, 100)         # a quarter of 400 fits a share
    s = split_lru(BankServerSettings(workers=7, dataplane_port=0, lru_mb=400))
    assert (s.lru_mb, s.lru_max_item_mb) == (50, 50)
    one = BankServerSettings(lru_mb=400)
    assert split_lru(one) is one
