"""``replay.py``: rebuilding a run's CSVs from its journal, and the state at any seq."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from journal import journal_dir, list_segments, read_segment
from models import RejectCode, Side
from tests.stack import logged_in, running_exchange, stop_process
from tests.test_exchange_process import trade_once
from tests.test_recovery import rejects
from tests.test_recovery_support import (
    config,
    crash,
    final_hash,
    limit,
    replay_hash,
    run_replay,
    start,
)

BUY, SELL = Side.BUY, Side.SELL


async def churn(uri: str, tag: str) -> None:
    """Resting orders, partial fills, an amend and a cancel: rows in both CSVs."""
    async with logged_in(uri, "alice") as alice, logged_in(uri, "bob") as bob:
        for i in range(6):
            await alice.send({"type": "new_order", "client_order_id": f"{tag}a{i}",
                              "side": "sell", "qty": 2 + i, "price": 10010 + i})
            await alice.recv_type("order_ack")
        await alice.send({"type": "amend_order", "client_order_id": f"{tag}a5", "qty": 3})
        await alice.recv_type("order_amended")
        await bob.send({"type": "new_order", "client_order_id": f"{tag}b", "side": "buy",
                        "qty": 9, "price": 10013})
        await bob.recv_until(lambda m: m.get("type") == "fill" and m["leaves_qty"] == 0)
        await alice.send({"type": "cancel_order", "client_order_id": f"{tag}a4"})
        await alice.recv_type("order_canceled")


async def test_replay_rebuilds_a_live_runs_csvs_byte_for_byte(tmp_path: Path) -> None:
    data, out = tmp_path / "run", tmp_path / "out"
    settings = tmp_path / "config.json"
    settings.write_text(json.dumps({"server": {"performance_interval_s": 0.05,
                                               "leaderboard_interval_s": 0.05}}))
    flags = ("--config", str(settings), "--snapshot-every", "10")
    for tag in ("r1", "r2"):  # two runs: the second continues the first's journal
        async with running_exchange(data, *flags) as exchange:
            await churn(exchange.uris["gateway"], tag)
            await trade_once(exchange.uris["gateway"], tag)
            assert await stop_process(exchange.proc, signal.SIGTERM) == 0
    final = final_hash(exchange.stderr_text)
    assert len(list_segments(journal_dir(data))) > 2  # snapshots rotated the segments
    code, stdout, err = await run_replay("--data-dir", str(data), "--out-dir", str(out))
    assert code == 0, err
    live_trades = (data / "trades.csv").read_bytes()
    assert live_trades.count(b"\n") == 1 + 2 * 4  # header, 3 + 1 trades per run
    assert (out / "trades.csv").read_bytes() == live_trades
    live_performance = (data / "performance.csv").read_bytes()
    assert live_performance.count(b"\n") >= 5  # at least each shutdown's two rows
    assert (out / "performance.csv").read_bytes() == live_performance
    assert f"state_hash: {final}" in stdout


def lines_starting(text: str, first: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.split()[:1] == [first]]


async def test_until_seq_prints_the_book_and_positions_there(tmp_path: Path) -> None:
    exchange = start(tmp_path, config())
    exchange.submit(limit("alice", "a1", SELL, 5, 10010))
    exchange.submit(limit("alice", "a2", SELL, 3, 10012))
    exchange.submit(limit("bob", "b1", BUY, 2, 9990))
    before_trade = exchange.seq, exchange.engine.state_hash()
    exchange.submit(limit("bob", "b2", BUY, 4, 10010))  # takes 4 of a1
    after_trade = exchange.seq
    # rejected: no event, but they spend rate tokens, so they belong to this point
    assert rejects(exchange, limit("bob", "far", BUY, 1, 30000)) == [RejectCode.RISK_PRICE_BAND]
    at_end = exchange.engine.state_hash()
    exchange.submit(limit("carol", "c1", BUY, 1, 9980))
    crash(exchange)

    code, out, err = await run_replay("--data-dir", str(tmp_path), "--until-seq",
                                      str(after_trade))
    assert code == 0, err
    assert "book SIM" in out and f"state_hash: {at_end}" in out
    book = out[out.index("book SIM"):out.index("positions")]
    assert [line.split() for line in book.splitlines()[2:] if line.strip()] == [
        ["2", "99.90", "100.10", "1"], ["100.12", "3"]]  # bid qty, bid | ask, ask qty
    alice, = lines_starting(out, "alice")
    bob, = lines_starting(out, "bob")
    # trader symbol position avg_price cash realized unrealized equity fees orders status
    assert alice[:5] == ["alice", "SIM", "-4", "100.10", "1000400.40"]
    assert alice[-2:] == ["2", "ok"]
    assert bob[:5] == ["bob", "SIM", "4", "100.10", "999599.60"] and bob[-2:] == ["1", "ok"]
    assert not lines_starting(out, "carol")  # her order came after

    # a seq inside the trade's events: an input is applied whole or not at all
    assert await replay_hash(tmp_path, "--until-seq", str(before_trade[0] + 1)) == at_end
    assert await replay_hash(tmp_path, "--until-seq", str(before_trade[0])) == before_trade[1]


async def test_replay_refuses_what_it_cannot_do_cleanly(tmp_path: Path) -> None:
    code, _, err = await run_replay("--data-dir", str(tmp_path / "nothing"))
    assert code == 2 and "no journal segments" in err
    exchange = start(tmp_path, config())
    exchange.submit(limit("alice", "a1", SELL, 5, 10010))
    exchange.submit(limit("bob", "b1", BUY, 5, 10010))
    crash(exchange)
    code, _, err = await run_replay("--data-dir", str(tmp_path), "--out-dir", str(tmp_path))
    assert code == 2 and "must not be the --data-dir" in err
    out = tmp_path / "out"
    out.mkdir()
    (out / "performance.csv").write_text("mine\n")
    code, _, err = await run_replay("--data-dir", str(tmp_path), "--out-dir", str(out))
    assert code == 2 and "already exists" in err
    assert not (out / "trades.csv").exists() and (out / "performance.csv").read_text() == "mine\n"


async def test_replay_stops_at_a_corrupt_record_naming_it(tmp_path: Path) -> None:
    exchange = start(tmp_path, config(), snapshot_every=2)  # replay reads covered segments too
    for i in range(5):
        exchange.submit(limit("alice", f"a{i}", SELL, 1, 10010 + i))
        exchange.commits.flush()  # type: ignore[union-attr]
    crash(exchange)
    path = list_segments(journal_dir(tmp_path))[0][1]
    offset, _ = read_segment(path, last=False, first_hint=1).records[1]
    data = bytearray(path.read_bytes())
    data[offset + 9] ^= 0x01
    path.write_bytes(bytes(data))
    code, out, err = await run_replay("--data-dir", str(tmp_path), "--out-dir",
                                      str(tmp_path / "out"))
    assert code == 2 and "state_hash" not in out
    assert str(path) in err and f"byte offset {offset}" in err and "input #2" in err
