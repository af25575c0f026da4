"""Recovery of an in-process exchange from its data dir: exact state, CSV reconciliation,
snapshots, and the refusals (changed configuration, damaged or edited files).

Each test drives a real ``Exchange`` over a real journal, "crashes" it (closes its files
after the last commit, with no shutdown work) and recovers a second one from the same
directory, as a restarted process would.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import pytest

from exchange_server import CommitQueue, Exchange, FlushPolicy, HeldGroup
from journal import (
    PREALLOC_CHUNK,
    JournalError,
    JournalReader,
    JournalWriter,
    journal_dir,
    list_segments,
    list_snapshots,
    read_segment,
    read_snapshot,
    write_snapshot,
)
from models import (
    AmendOrder,
    CancelAll,
    CancelOrder,
    CancelReason,
    NewOrder,
    OrderRejected,
    RejectCode,
    SetMarketOpen,
    Side,
    TimeInForce,
)
from replay import recover
from tests.test_recovery_support import (
    config,
    crash,
    kill,
    limit,
    replay_hash,
    run_replay,
    start,
)

BUY, SELL = Side.BUY, Side.SELL
# a small bucket, so the script runs into the rate limit and rejections spend tokens
RATE_LIMITED = {"risk": {"rate_limit_per_sec": 1.0, "rate_limit_burst": 8}}
SYNC_TIMEOUT_S = 10.0


async def settle(exchange: Exchange) -> None:
    """End the event-loop turn now (what ``call_soon`` would do) and wait for the group
    commit it starts, so the test runs the real write/fsync/release path."""
    commits = exchange.commits
    assert commits is not None
    commits.flush()
    await asyncio.wait_for(commits.settled(), SYNC_TIMEOUT_S)


def rejects(exchange: Exchange, command: NewOrder) -> list[RejectCode]:
    """Submit a new order; the codes of any rejection (read from the engine's events)."""
    exchange.submit(command)
    return [e.code for e in exchange.engine._events if isinstance(e, OrderRejected)]


async def scripted_session(exchange: Exchange) -> None:
    """Every kind of input: trades, an amend, cancels, rejections that spend rate tokens,
    a market closed and reopened, a disconnect cancel, leaderboard and performance ticks."""
    submit = exchange.submit
    submit(limit("alice", "a1", SELL, 5, 10010))
    submit(limit("alice", "a2", SELL, 3, 10012))
    submit(limit("carol", "c1", BUY, 2, 9990))
    await settle(exchange)
    submit(limit("bob", "b1", BUY, 6, 10012))  # two trades
    exchange.publish_leaderboard()
    exchange.write_performance()
    assert rejects(exchange, limit("bob", "b-far", BUY, 1, 20000)) == \
        [RejectCode.RISK_PRICE_BAND]  # rejected, but it took a token
    submit(AmendOrder("alice", None, "a2", None, 1))
    submit(CancelOrder("alice", None, "nope"))  # rejected: unknown
    await settle(exchange)
    submit(SetMarketOpen(False))
    assert rejects(exchange, limit("carol", "c2", BUY, 1, 9991)) == [RejectCode.MARKET_CLOSED]
    submit(SetMarketOpen(True))
    submit(CancelAll("carol", reason=CancelReason.DISCONNECT))
    codes = [rejects(exchange, limit("bob", f"b{i}", BUY, 1, 9980 + i)) for i in range(8)]
    assert [RejectCode.RATE_LIMITED] in codes  # the bucket ran dry
    exchange.publish_leaderboard()
    submit(limit("carol", "c3", SELL, 4, 9985, TimeInForce.IOC))  # sells into bob's bids
    exchange.write_performance()
    await settle(exchange)
    submit(CancelOrder("bob", None, "b1"))


def standing(exchange: Exchange) -> tuple:
    engine = exchange.engine
    return (engine.state_tuple(), engine.state_hash(), exchange.seq, exchange.clock.last,
            engine.next_order_id, engine.next_trade_id, dict(exchange._fill_prices))


@pytest.mark.parametrize("flush", list(FlushPolicy))
@pytest.mark.parametrize("snapshot_every", [0, 4])
async def test_a_restart_restores_the_exact_state(tmp_path: Path, flush: FlushPolicy,
                                                  snapshot_every: int) -> None:
    cfg = config(**RATE_LIMITED)
    exchange = start(tmp_path, cfg, flush, snapshot_every)
    await scripted_session(exchange)
    before = standing(exchange)
    # bob's bucket is (nearly) dry: less than one message left
    assert exchange.engine.next_trade_id > 3 and exchange.engine.traders["bob"].rate_tokens < 10**9
    crash(exchange)
    if snapshot_every:
        assert list_snapshots(journal_dir(tmp_path)), "the script should have snapshotted"
    again = start(tmp_path, cfg, flush, snapshot_every)
    assert standing(again) == before
    # it goes on where it stopped: the next input gets the next seq and order id
    again.submit(limit("dave", "d1", BUY, 1, 9950))
    assert again.seq == before[2] + 2  # order_accepted, book_changed
    assert again.engine.orders[before[4]].client_order_id == "d1"
    crash(again)


@pytest.mark.parametrize("snapshot_every", [0, 4])
async def test_a_kill_leaves_zeros_after_the_last_record_and_a_restart_goes_on_after_it(
        tmp_path: Path, snapshot_every: int, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(**RATE_LIMITED)
    exchange = start(tmp_path, cfg, FlushPolicy.BATCH, snapshot_every)
    await scripted_session(exchange)
    before = standing(exchange)
    kill(exchange)
    directory = journal_dir(tmp_path)
    segments = [path for _, path in list_segments(directory)]
    assert len(segments) == (3 if snapshot_every else 1)  # snapshots at #9 and #24
    # only the live segment carries zeros; the ones snapshots closed were trimmed
    assert segments[-1].stat().st_size == PREALLOC_CHUNK
    for path in segments[:-1]:
        assert path.stat().st_size == read_segment(path, False, 1).valid_end
    with caplog.at_level(logging.WARNING):
        again = start(tmp_path, cfg, FlushPolicy.BATCH, snapshot_every)
    assert "torn" not in caplog.text  # zeros are the clean end, not a torn write
    assert standing(again) == before
    again.submit(limit("dave", "d1", BUY, 1, 9950))
    await settle(again)
    after = standing(again)
    assert again.commits is not None
    inputs = again.commits.journal.next_number - 1
    kill(again)
    # the new input went after the last record, not after the zeros: all read back
    reader = JournalReader(directory)
    assert [e.number for e in reader.entries(after=inputs - 1)] == [inputs]
    assert reader.torn is None and reader.last_number == inputs
    assert await replay_hash(tmp_path) == after[1]


@pytest.mark.parametrize("flush", list(FlushPolicy))
async def test_no_output_leaves_before_its_inputs_are_in_the_journal(
        tmp_path: Path, flush: FlushPolicy, monkeypatch: pytest.MonkeyPatch) -> None:
    durable = {"written": 0, "synced": 0}
    released: list[int] = []
    real_write, real_sync = JournalWriter.write, JournalWriter.sync
    real_release = CommitQueue.release

    def write(self: JournalWriter) -> int:
        count = real_write(self)
        durable["written"] = self.written_number
        return count

    def sync(self: JournalWriter) -> None:
        through = self.written_number  # what this fsync covers, read before it runs
        real_sync(self)
        durable["synced"] = max(durable["synced"], through)

    def release(self: CommitQueue, group: HeldGroup) -> None:
        # off and interval release on the write (a killed process loses nothing);
        # interval's fsync follows within its period (see the test below)
        needed = "written" if flush in (FlushPolicy.OFF, FlushPolicy.INTERVAL) else "synced"
        assert group.through <= durable[needed], (group.through, durable)
        if group.trades or group.performance or group.messages:
            released.append(group.through)
        real_release(self, group)

    monkeypatch.setattr(JournalWriter, "write", write)
    monkeypatch.setattr(JournalWriter, "sync", sync)
    monkeypatch.setattr(CommitQueue, "release", release)
    exchange = start(tmp_path, config(**RATE_LIMITED), flush, snapshot_every=5)
    trades_csv = tmp_path / "trades.csv"
    header_only = trades_csv.read_bytes()
    exchange.submit(limit("alice", "a1", SELL, 5, 10010))
    exchange.submit(limit("bob", "b1", BUY, 5, 10010))
    if flush is not FlushPolicy.EVERY:
        assert trades_csv.read_bytes() == header_only  # held until the commit
    await scripted_session(exchange)
    await settle(exchange)
    crash(exchange)
    assert released == sorted(released) and len(released) >= 3
    assert trades_csv.read_bytes().count(b"\n") == exchange.engine.next_trade_id  # + header


async def test_interval_fsyncs_what_it_released_within_its_period(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced = asyncio.get_running_loop().create_future()
    real_sync = JournalWriter.sync

    def sync(self: JournalWriter) -> None:
        through = self.written_number
        real_sync(self)
        if through >= 2 and not synced.done():
            synced.get_loop().call_soon_threadsafe(synced.set_result, through)

    monkeypatch.setattr(JournalWriter, "sync", sync)
    exchange = start(tmp_path, config(**RATE_LIMITED), FlushPolicy.INTERVAL)
    assert exchange.commits is not None
    trades_csv = tmp_path / "trades.csv"
    header_only = trades_csv.read_bytes()
    exchange.submit(limit("alice", "a1", SELL, 5, 10010))
    exchange.submit(limit("bob", "b1", BUY, 5, 10010))
    await settle(exchange)
    # released on the write, before any fsync; the fsync follows with no further input
    assert trades_csv.read_bytes() != header_only
    assert await asyncio.wait_for(synced, 5.0) >= 2
    syncs = exchange.commits.syncs
    await settle(exchange)
    assert exchange.commits.syncs == syncs  # nothing new written: no more fsyncs
    crash(exchange)


async def test_a_crash_between_journal_and_csv_write_is_reconciled(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(**RATE_LIMITED)
    exchange = start(tmp_path, cfg)
    await scripted_session(exchange)
    crash(exchange)
    trades_csv, performance_csv = tmp_path / "trades.csv", tmp_path / "performance.csv"
    trades, performance = trades_csv.read_bytes(), performance_csv.read_bytes()
    assert trades.count(b"\n") >= 4 and performance.count(b"\n") >= 4
    # the process died after the journal write: two trade rows missing, one of them
    # torn, and the last performance rows never written
    rows = trades.splitlines(keepends=True)
    trades_csv.write_bytes(b"".join(rows[:-2]) + rows[-2][:17])
    performance_csv.write_bytes(b"".join(performance.splitlines(keepends=True)[:-2]))
    with caplog.at_level(logging.INFO):
        crash(start(tmp_path, cfg))
    assert trades_csv.read_bytes() == trades
    assert performance_csv.read_bytes() == performance
    assert "dropping a torn last row (17 bytes)" in caplog.text
    assert "appended 2 rows" in caplog.text
    code, _, err = await run_replay("--data-dir", str(tmp_path), "--out-dir",
                                    str(tmp_path / "replayed"))
    assert code == 0, err
    assert (tmp_path / "replayed" / "trades.csv").read_bytes() == trades
    assert (tmp_path / "replayed" / "performance.csv").read_bytes() == performance


async def test_csv_rows_the_journal_does_not_reproduce_are_refused(tmp_path: Path) -> None:
    cfg = config()
    exchange = start(tmp_path, cfg)
    exchange.submit(limit("alice", "a1", SELL, 5, 10010))
    exchange.submit(limit("bob", "b1", BUY, 5, 10010))
    crash(exchange)
    trades_csv = tmp_path / "trades.csv"
    trades = trades_csv.read_bytes()
    trades_csv.write_bytes(trades + trades.splitlines(keepends=True)[-1])  # a duplicate
    with pytest.raises(JournalError, match=r"trades\.csv: the row at byte offset"):
        recover(tmp_path, cfg)
    trades_csv.write_bytes(trades[:20])  # shorter than the journal's starting point
    with pytest.raises(JournalError, match="truncated or replaced"):
        recover(tmp_path, cfg)


async def test_a_changed_engine_configuration_is_refused(tmp_path: Path) -> None:
    crash(start(tmp_path, config()))
    with pytest.raises(JournalError, match=r"different configuration.*risk"):
        recover(tmp_path, config(risk={"max_order_qty": 5}))
    # the server section only paces timers, whose ticks are journaled: it may change
    crash(start(tmp_path, config(server={"leaderboard_interval_s": 0.1})))


async def test_a_snapshot_from_other_engine_code_is_replaced_by_a_full_replay(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(**RATE_LIMITED)
    exchange = start(tmp_path, cfg, snapshot_every=6)
    await scripted_session(exchange)
    before = standing(exchange)
    crash(exchange)
    directory = journal_dir(tmp_path)
    number, path = list_snapshots(directory)[-1]
    state = read_snapshot(path)
    write_snapshot(directory, number, {**state, "fingerprint": "other code"})
    with caplog.at_level(logging.WARNING):
        again = start(tmp_path, cfg)
    assert "replaying the journal from its start" in caplog.text
    assert standing(again) == before
    crash(again)
    # and if that replay does not reproduce the snapshot, the behaviour changed: refuse
    write_snapshot(directory, number, {**state, "fingerprint": "other code",
                                       "state_hash": "0" * 64})
    with pytest.raises(JournalError, match="behaviour changed"):
        recover(tmp_path, cfg)


async def test_a_damaged_newest_snapshot_falls_back_to_the_one_before(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(**RATE_LIMITED)
    exchange = start(tmp_path, cfg, snapshot_every=5)
    await scripted_session(exchange)
    before = standing(exchange)
    crash(exchange)
    snapshots = list_snapshots(journal_dir(tmp_path))
    assert len(snapshots) == 2
    newest = snapshots[-1][1]
    newest.write_bytes(newest.read_bytes()[:-10])
    with caplog.at_level(logging.INFO):
        again = start(tmp_path, cfg)
    assert "skipping snapshot" in caplog.text and "damaged snapshot" in caplog.text
    assert standing(again) == before
    crash(again)


async def test_a_segment_the_crash_left_without_a_header_is_removed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config()
    exchange = start(tmp_path, cfg)
    exchange.submit(limit("alice", "a1", SELL, 5, 10010))
    before = standing(exchange)
    crash(exchange)
    directory = journal_dir(tmp_path)
    (directory / "wal-000000000002.log").write_bytes(b"OMSW")  # died while creating it
    with caplog.at_level(logging.WARNING):
        again = start(tmp_path, cfg)
    assert "without a header" in caplog.text
    assert standing(again) == before
    again.submit(limit("bob", "b1", BUY, 5, 10010))
    after = standing(again)
    crash(again)
    assert [first for first, _ in list_segments(directory)] == [1]
    assert await replay_hash(tmp_path) == after[1]


async def test_a_group_never_grows_past_its_bound(tmp_path: Path) -> None:
    exchange = start(tmp_path, config(), FlushPolicy.BATCH)
    commits = exchange.commits
    assert commits is not None
    commits.max_group = 3
    exchange.submit(limit("alice", "a0", SELL, 1, 10010))
    commits.flush()
    assert len(commits.held) == 1  # its fsync is on the helper thread
    for i in range(1, 4):
        exchange.submit(limit("alice", f"a{i}", SELL, 1, 10010 + i))
    commits.flush()  # four inputs unsynced, past the bound: committed at once, not queued
    assert not commits.held and commits.durable == 4 and commits.journal.pending == 0
    assert [e.number for e in JournalReader(journal_dir(tmp_path)).entries()] == [1, 2, 3, 4]
    crash(exchange)


class GatedSync:
    """``JournalWriter.sync`` that holds each fsync until the test opens its gate, and
    records what each covered and whether two ever ran at once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real = JournalWriter.sync
        self.gate = threading.Event()
        self.started = threading.Semaphore(0)
        self.covered: list[int] = []
        self.running = 0
        self.overlapped = False
        monkeypatch.setattr(JournalWriter, "sync",
                            lambda journal: self.sync(journal))  # type: ignore[misc]

    def sync(self, journal: JournalWriter) -> None:
        self.running += 1
        self.overlapped |= self.running > 1
        through = journal.written_number  # what this fsync covers, read before it runs
        self.started.release()
        try:
            assert self.gate.wait(SYNC_TIMEOUT_S), "the test never opened the gate"
            self.real(journal)
        finally:
            self.running -= 1
        self.covered.append(through)

    async def wait_started(self) -> None:
        assert await asyncio.to_thread(self.started.acquire, True, SYNC_TIMEOUT_S)


async def test_batch_syncs_what_arrived_during_an_fsync_right_after_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gated = GatedSync(monkeypatch)
    exchange = start(tmp_path, config(), FlushPolicy.BATCH)
    commits = exchange.commits
    assert commits is not None
    trades_csv = tmp_path / "trades.csv"
    header_only = trades_csv.read_bytes()
    exchange.submit(limit("alice", "a1", SELL, 5, 10010))
    commits.flush()
    await gated.wait_started()  # input 1's fsync is running on the helper thread
    exchange.submit(limit("bob", "b1", BUY, 5, 10010))  # a trade: a trades.csv row
    commits.flush()  # written now; its fsync has to wait for the running one
    assert commits.held[-1].through == 2 and trades_csv.read_bytes() == header_only
    gated.gate.set()
    await asyncio.wait_for(commits.settled(), SYNC_TIMEOUT_S)
    # the second fsync followed the first without the loop asking again
    assert gated.covered == [1, 2] and commits.durable == 2 and not gated.overlapped
    assert trades_csv.read_bytes().count(b"\n") == 2  # header and the trade
    crash(exchange)


async def test_a_snapshot_waits_out_the_running_fsync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gated = GatedSync(monkeypatch)
    exchange = start(tmp_path, config(), FlushPolicy.BATCH)
    commits = exchange.commits
    assert commits is not None
    exchange.submit(limit("alice", "a1", SELL, 5, 10010))
    commits.flush()
    await gated.wait_started()
    exchange.submit(limit("bob", "b1", BUY, 2, 10010))
    # the snapshot switches segments: it must not close the one being synced, nor sync
    # alongside it; the gate opens a little later, from another thread
    opener = threading.Timer(0.05, gated.gate.set)
    opener.start()
    exchange.snapshot_now()
    opener.join()
    assert not gated.overlapped and gated.covered[0] == 1 and gated.covered[-1] == 2
    assert not commits.held and commits.durable == 2
    assert [first for first, _ in list_segments(journal_dir(tmp_path))] == [1, 3]
    exchange.submit(limit("carol", "c1", BUY, 1, 9990))
    commits.flush()
    await asyncio.wait_for(commits.settled(), SYNC_TIMEOUT_S)
    assert gated.covered[-1] == 3  # the flusher goes on in the new segment
    crash(exchange)
    assert [e.number for e in JournalReader(journal_dir(tmp_path)).entries()] == [1, 2, 3]


async def test_a_failed_fsync_releases_nothing_and_stops(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exchange = start(tmp_path, config(), FlushPolicy.BATCH)
    commits = exchange.commits
    assert commits is not None
    fatal: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
    commits.on_fatal = fatal.set_result

    def sync(self: JournalWriter) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(JournalWriter, "sync", sync)
    trades_csv = tmp_path / "trades.csv"
    header_only = trades_csv.read_bytes()
    exchange.submit(limit("alice", "a1", SELL, 5, 10010))
    exchange.submit(limit("bob", "b1", BUY, 5, 10010))
    commits.flush()
    exc = await asyncio.wait_for(fatal, SYNC_TIMEOUT_S)
    assert isinstance(exc, OSError) and exc.errno == 5
    assert commits.held and trades_csv.read_bytes() == header_only
    commits.closed = True  # as the process would be: exit without committing
    exchange.telemetry.close()
    commits.journal.close()
