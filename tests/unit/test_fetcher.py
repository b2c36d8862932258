"""ShardedFetcher's planning, failover, retries, hedging and integrity handling against fake
shard clients (no sockets; tests/integration/test_client_failover.py runs real servers).

Run: .venv/bin/pytest -q tests/unit/test_fetcher.py
"""
import random
import threading
import time

import pytest

from membank.blocks import checksum
from membank.manifest import Manifest
from services.model_client.bank_client import BankError, BlockIntegrityError
from services.model_client.fetcher import FetchPolicy, ShardedFetcher

SHARDS = ["s0", "s1", "s2"]


def data(level, node):
    return bytes([(level * 13 + node) % 256]) * (4 * 3 * [4, 2][level - 1] * 8)


def make_manifest(shards=SHARDS, replication=2):
    sums = [[checksum(data(lv, n)) for n in range(4 ** lv)] for lv in (1, 2)]
    return Manifest(bank="b", version="v1", dtype="float32", d_model=8, mem_layers=[0],
                    branching=4, ranks=[4, 2], checksums=sums, shards=shards,
                    replication=replication, placement_level=1)


M = make_manifest()


class FakeCall:
    def __init__(self):
        self.cancelled = threading.Event()

    def cancel(self):
        self.cancelled.set()


class FakeShard:
    """A shard client whose behaviour is a list of modes, one per call (the last one repeats)."""

    def __init__(self, name, modes=("ok",)):
        self.name, self.modes, self.calls = name, list(modes), []

    def fetch(self, bank, version, blocks, manifest, *, timeout_s=None, on_call=None, out=None):
        mode = self.modes[min(len(self.calls), len(self.modes) - 1)]
        self.calls.append(list(blocks))
        self.outs = getattr(self, "outs", []) + [out]
        call = FakeCall()
        if on_call:
            on_call(call)
        for lv, n in blocks:
            assert self.name in manifest.owners(lv, n), "asked a shard that does not own it"
        if mode in ("hang", "hang-scribble"):  # answers only when cancelled or at its deadline
            cancelled = call.cancelled.wait(timeout_s)
            if mode == "hang-scribble":   # a receive still landing bytes after the cancel
                time.sleep(0.2)
                for dest in (out or {}).values():
                    dest.write(0, b"\xff" * len(dest))
            raise BankError("CANCELLED" if cancelled else "DEADLINE_EXCEEDED", "stopped")
        errors = {"unavailable": BankError("UNAVAILABLE", "down"),
                  "data_loss": BankError("DATA_LOSS", "corrupt on disk"),
                  "corrupt": BlockIntegrityError("fails its manifest checksum"),
                  "wrong_shard": BankError("FAILED_PRECONDITION", "not mine"),
                  "not_found": BankError("NOT_FOUND", "unknown version")}
        if mode in errors:
            raise errors[mode]
        got = {(lv, n): bytearray(data(lv, n)) for lv, n in blocks}
        for b, dest in (out or {}).items():     # a bank.Scatter, as the real clients get
            dest.write(0, got[b])
            got[b] = dest.result
        return got

    def get_manifest(self, bank, version="", *, timeout_s=None):
        self.manifest_calls = getattr(self, "manifest_calls", 0) + 1
        if self.modes[0] == "unavailable":
            raise BankError("UNAVAILABLE", "down")
        if self.modes[0] == "hang":         # a paused shard: nothing until the deadline
            threading.Event().wait(timeout_s)
            raise BankError("DEADLINE_EXCEEDED", "deadline")
        if self.modes[0] == "not_found":
            raise BankError("NOT_FOUND", "no such bank")
        return M

    def close(self):
        pass


def fetcher(modes: dict, **policy):
    shards = {s: FakeShard(s, modes.get(s, ("ok",))) for s in SHARDS}
    kw = dict(backoff_s=0.001, hedge_initial_s=5.0, deadline_s=5.0)
    f = ShardedFetcher({s: f"fake-{s}" for s in SHARDS}, FetchPolicy(**{**kw, **policy}),
                       client_factory=lambda addr: shards[addr.removeprefix("fake-")],
                       rng=random.Random(0))
    return f, shards


PATH = M.path_blocks([2, 3])                       # [(1, 2), (2, 11)]
PRIMARY, SECONDARY = M.owners(2, 11)


def test_a_path_is_one_rpc_to_its_primary():
    f, shards = fetcher({})
    with f:
        got = f.fetch("b", "v1", PATH, M)
        assert {k: bytes(v) for k, v in got.items()} == {b: data(*b) for b in PATH}
        assert shards[PRIMARY].calls == [PATH]
        assert sum(len(s.calls) for s in shards.values()) == 1
        assert f.stats()["rpcs"] == 1 and f.stats()["bytes"] == sum(len(data(*b)) for b in PATH)


def test_blocks_of_many_paths_are_grouped_one_rpc_per_shard():
    f, shards = fetcher({})
    blocks = [(2, n) for n in range(16)]                       # every placement group
    with f:
        groups = f.plan(M, blocks)
        assert len(groups) <= len(SHARDS)
        assert sorted(b for g in groups for b in g.blocks) == blocks
        for g in groups:     # every replica of a group owns every block of it
            assert g.replicas and all(set(g.replicas) <= set(M.owners(*b)) for b in g.blocks)
        assert len(f.fetch("b", "v1", blocks, M)) == 16
        assert sum(len(s.calls) for s in shards.values()) == len(groups)


def test_a_group_whose_shards_all_fail_is_split_over_the_other_owners():
    blocks = [(2, n) for n in range(16)]
    f, shards = fetcher({})
    covering = f.plan(M, blocks)[0].replicas             # here one shard owns all 16 blocks
    for s in covering:
        shards[s].modes = ["unavailable"]
    with f:
        got = f.fetch("b", "v1", blocks, M)
        assert {k: bytes(v) for k, v in got.items()} == {b: data(*b) for b in blocks}
        assert f.stats()["failovers"] >= 1
        assert all(len(shards[s].calls) == 1 for s in covering)   # asked once, then avoided


def test_unavailable_primary_fails_over_and_is_tried_last_afterwards():
    f, shards = fetcher({PRIMARY: ["unavailable"]})
    with f:
        assert len(f.fetch("b", "v1", PATH, M)) == 2
        st = f.stats()
        assert (st["failovers"] == 1 and st["errors"] == {"UNAVAILABLE": 1}
                and st["down"] == [PRIMARY])
        assert shards[SECONDARY].calls == [PATH]
        f.fetch("b", "v1", PATH, M)                   # the down shard is not asked first now
        assert len(shards[PRIMARY].calls) == 1 and len(shards[SECONDARY].calls) == 2


@pytest.mark.parametrize("mode", ["corrupt", "data_loss"])
def test_bad_block_is_refetched_from_the_other_replica(mode):
    f, shards = fetcher({PRIMARY: [mode]})
    with f:
        got = f.fetch("b", "v1", PATH, M)
        assert {k: bytes(v) for k, v in got.items()} == {b: data(*b) for b in PATH}
        assert f.stats()["integrity_errors"] == 1 and len(shards[SECONDARY].calls) == 1


def test_bad_block_on_every_replica_raises_and_is_never_returned():
    f, shards = fetcher({PRIMARY: ["corrupt"], SECONDARY: ["data_loss"]})
    with f, pytest.raises(BlockIntegrityError):
        f.fetch("b", "v1", PATH, M)
    # a replica that sent a bad block is not asked again in later rounds
    assert len(shards[PRIMARY].calls) == 1 and len(shards[SECONDARY].calls) == 1


def test_retries_with_backoff_then_succeeds():
    m1 = make_manifest(replication=1)
    (owner,) = m1.owners(2, 11)
    f, shards = fetcher({owner: ["unavailable", "unavailable", "ok"]}, max_rounds=3)
    with f:
        assert len(f.fetch("b", "v1", PATH, m1)) == 2
        assert f.stats()["retries"] == 2 and len(shards[owner].calls) == 3


def test_gives_up_after_max_rounds():
    f, shards = fetcher({PRIMARY: ["unavailable"], SECONDARY: ["unavailable"]}, max_rounds=2)
    with f, pytest.raises(BankError) as e:
        f.fetch("b", "v1", PATH, M)
    assert e.value.code == "UNAVAILABLE"
    assert len(shards[PRIMARY].calls) == 2 and len(shards[SECONDARY].calls) == 2


def test_not_found_is_raised_at_once():
    f, shards = fetcher({PRIMARY: ["not_found"]})
    with f, pytest.raises(BankError) as e:
        f.fetch("b", "v1", PATH, M)
    assert e.value.code == "NOT_FOUND"
    assert not shards[SECONDARY].calls


def test_wrong_shard_fails_over_and_flags_the_manifest():
    f, shards = fetcher({PRIMARY: ["wrong_shard"]})
    with f:
        assert len(f.fetch("b", "v1", PATH, M)) == 2
        assert f.placement_mismatch and f.stats()["wrong_shard"] == 1


def test_slow_primary_is_hedged_and_the_loser_cancelled():
    f, shards = fetcher({PRIMARY: ["hang"]}, hedge_initial_s=0.01)
    with f:
        got = f.fetch("b", "v1", PATH, M)
        assert {k: bytes(v) for k, v in got.items()} == {b: data(*b) for b in PATH}
        st = f.stats()
        assert (st["hedges"], st["hedge_wins"], st["cancelled"]) == (1, 1, 1)
        assert shards[SECONDARY].calls == [PATH]
        # the outrun primary is tried last for down_s: the next fetch asks the secondary first
        # and needs no hedge (a stalled shard costs one hedge delay, not one per prompt)
        f.fetch("b", "v1", PATH, M)
        st = f.stats()
        assert (st["hedges"], st["slow_marks"], st["down"]) == (1, 1, [PRIMARY])
        assert shards[SECONDARY].calls == [PATH, PATH] and len(shards[PRIMARY].calls) == 1


def test_out_is_filled_by_one_attempt_and_a_winning_hedge_is_copied_in_after_the_loser_stopped():
    # the primary receives into the caller's buffers and stalls; the hedge gets its own; when
    # the hedge wins, the primary is cancelled AND waited for (it still writes 0.2 s after the
    # cancel) before the hedge's bytes are copied in: nothing lands in `out` after the answer
    f, shards = fetcher({PRIMARY: ["hang-scribble"]}, hedge_initial_s=0.01)
    out = {b: bytearray(len(data(*b))) for b in PATH}
    with f:
        got = f.fetch("b", "v1", PATH, M, out=out)
        assert all(got[b] is out[b] for b in PATH)
        assert shards[PRIMARY].outs[0] is not None and shards[SECONDARY].outs == [None]
        time.sleep(0.3)
        assert {b: bytes(v) for b, v in out.items()} == {b: data(*b) for b in PATH}
        # no hedge needed: the one attempt receives into `out` itself
        out2 = {b: bytearray(len(data(*b))) for b in PATH}
        got = f.fetch("b", "v1", PATH, M, out=out2)
        assert all(got[b] is out2[b] and bytes(out2[b]) == data(*b) for b in PATH)
        assert shards[SECONDARY].outs[-1] is not None


def test_a_failed_fetch_into_out_returns_only_after_every_writer_stopped():
    f, shards = fetcher({PRIMARY: ["hang-scribble"], SECONDARY: ["hang"]}, hedge_initial_s=0.01,
                        deadline_s=0.3, attempt_timeout_s=0.3)
    out = {b: bytearray(len(data(*b))) for b in PATH}
    with f, pytest.raises(BankError):
        f.fetch("b", "v1", PATH, M, out=out)
    scribbled = {b: bytes(v) for b, v in out.items()}
    assert all(v == b"\xff" * len(v) for v in scribbled.values())   # done before the raise
    time.sleep(0.3)
    assert {b: bytes(v) for b, v in out.items()} == scribbled


def test_out_of_the_wrong_size_is_refused_before_any_rpc():
    f, shards = fetcher({})
    with f, pytest.raises(ValueError, match="writable and"):
        f.fetch("b", "v1", PATH, M, out={PATH[0]: bytearray(1)})
    assert all(not s.calls for s in shards.values())


def test_no_hedge_when_disabled_and_the_deadline_holds():
    f, shards = fetcher({PRIMARY: ["hang"], SECONDARY: ["hang"]}, hedge=False,
                        deadline_s=0.3, attempt_timeout_s=0.3)
    with f, pytest.raises(BankError) as e:
        f.fetch("b", "v1", PATH, M)
    assert e.value.code == "DEADLINE_EXCEEDED"
    assert f.stats()["hedges"] == 0


def test_hedge_delay_follows_observed_latency():
    f, _ = fetcher({}, hedge_initial_s=0.5, hedge_min_samples=4, hedge_min_s=0.0)
    nbytes = sum(M.block_nbytes(lv) for lv, _ in PATH)
    assert f._hedge_delay(nbytes) == 0.5                   # no samples yet
    for s in (0.01, 0.02, 0.03, 0.04):
        f.latency.add(nbytes, s)
    assert f._hedge_delay(nbytes) == 0.04                  # p95 of what was seen
    assert f._hedge_delay(nbytes * 64) == 0.5              # another size bucket
    f.close()


def test_a_stalled_shard_costs_a_manifest_read_the_hedge_delay_not_its_timeout():
    f, shards = fetcher({"s0": ["hang"]}, hedge_initial_s=0.05, attempt_timeout_s=3.0)
    with f:
        t0 = time.monotonic()
        assert f.get_manifest("b") == M
        assert time.monotonic() - t0 < 1.0            # not the 3 s of the stalled call
        assert f.stats()["manifest_hedges"] == 1 and shards["s1"].manifest_calls == 1
        assert f.get_manifest("b") == M and shards["s0"].manifest_calls == 1   # s0 tried last
    f, _ = fetcher({"s0": ["hang"]}, hedge=False, attempt_timeout_s=0.3)
    with f:                                           # without hedging: after its timeout
        t0 = time.monotonic()
        assert f.get_manifest("b") == M
        assert time.monotonic() - t0 >= 0.3


def test_manifest_errors_that_another_shard_would_repeat_are_raised_at_once():
    f, shards = fetcher({s: ["not_found"] for s in SHARDS})
    with f, pytest.raises(BankError) as e:
        f.get_manifest("b")
    assert e.value.code == "NOT_FOUND"
    assert sum(getattr(s, "manifest_calls", 0) for s in shards.values()) == 1
    f, _ = fetcher({s: ["hang"] for s in SHARDS}, hedge_initial_s=0.01, deadline_s=0.3,
                   attempt_timeout_s=0.2)
    with f, pytest.raises(BankError) as e:           # every shard stalled: the deadline
        f.get_manifest("b")
    assert e.value.code == "DEADLINE_EXCEEDED"


def test_manifest_from_the_first_shard_that_answers_and_missing_targets():
    f, shards = fetcher({"s0": ["unavailable"]})
    with f:
        assert f.get_manifest("b") == M
    with ShardedFetcher({"s0": "fake"}, client_factory=lambda a: FakeShard("s0")) as only_s0:
        unreachable = next(b for b in M.blocks() if "s0" not in M.owners(*b))
        with pytest.raises(BankError) as e:
            only_s0.fetch("b", "v1", [unreachable], M)
        assert e.value.code == "UNAVAILABLE" and "no address" in e.value.message
