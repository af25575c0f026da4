"""End-to-end: the exchange as a process: CLI, bad configuration, clean shutdown with
final performance rows, and append-only telemetry across restarts."""

from __future__ import annotations

import csv
import json
import signal
from pathlib import Path

from tests.stack import logged_in, run_to_exit, running_exchange, stop_process

PERFORMANCE_HEADER = ["timestamp", "trader_id", "position", "cash", "realized_pnl",
                      "total_equity", "unrealized_pnl", "fees"]


async def exchange_to_exit(*args: str) -> tuple[int, str, str]:
    return await run_to_exit("exchange_server.py", *args, timeout=20)


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


async def test_help_lists_the_flags() -> None:
    code, out, _ = await exchange_to_exit("--help")
    assert code == 0
    for flag in ("--host", "--port", "--events-port", "--config", "--data-dir", "--accounts",
                 "--log-level"):
        assert flag in out


async def test_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    cases = {"risk.max_ordr_qty": {"risk": {"max_ordr_qty": 5}},
             "server.cancel_on_disconnect": {"server": {"cancel_on_disconnect": "yes"}},
             "instruments[0].tick_size": {"instruments": [{"tick_size": "abc"}]}}
    for key, data in cases.items():
        config = tmp_path / "config.json"
        config.write_text(json.dumps(data))
        code, out, err = await exchange_to_exit("--config", str(config), "--port", "0",
                                           "--events-port", "0", "--data-dir", str(tmp_path))
        assert code == 2, err
        assert key in err and "READY" not in out
    accounts = tmp_path / "accounts.json"
    accounts.write_text(json.dumps({"alice": 42}))
    code, _, err = await exchange_to_exit("--accounts", str(accounts), "--data-dir", str(tmp_path))
    assert code == 2 and "alice" in err


async def trade_once(uri: str, tag: str) -> None:
    async with logged_in(uri, "alice") as alice, logged_in(uri, "bob") as bob:
        await alice.send({"type": "new_order", "client_order_id": f"{tag}a", "side": "sell",
                          "qty": 3, "price": 10012})
        await alice.recv_type("order_ack")
        await bob.send({"type": "new_order", "client_order_id": f"{tag}b", "side": "buy",
                        "qty": 3, "price": 10012})
        await bob.recv_type("fill")


async def test_shutdown_writes_final_performance_and_a_restart_appends(
        tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"server": {"performance_interval_s": 3600}}))
    async with running_exchange(tmp_path, "--config", str(config)) as ex:
        await trade_once(ex.uris["gateway"], "r1")
        assert await stop_process(ex.proc, signal.SIGTERM) == 0
    rows = read_csv(tmp_path / "performance.csv")
    assert rows[0] == PERFORMANCE_HEADER
    by_trader = {row[1]: row[2:] for row in rows[1:]}
    assert len(rows) == 3
    assert by_trader["alice"] == ["-3", "1000300.36", "0.00", "1000000.00", "0.00", "0.00"]
    assert by_trader["bob"] == ["3", "999699.609964", "-0.030036", "999999.969964", "0.00",
                                "0.030036"]
    assert rows[1][0].endswith("Z") and len(rows[1][0]) == len("2026-11-23T23:59:01.123456Z")
    trades_before = read_csv(tmp_path / "trades.csv")
    assert len(trades_before) == 2

    async with running_exchange(tmp_path, "--config", str(config)) as ex:
        await trade_once(ex.uris["gateway"], "r2")
        assert await stop_process(ex.proc, signal.SIGINT) == 0
    trades = read_csv(tmp_path / "trades.csv")
    assert trades[:2] == trades_before  # nothing rewritten
    assert len(trades) == 3 and trades[2][1:5] == ["100.12", "3", "bob", "alice"]
    rows = read_csv(tmp_path / "performance.csv")
    assert rows.count(PERFORMANCE_HEADER) == 1 and len(rows) == 5
