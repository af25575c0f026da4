"""End to end: bot_battle_runner.py trading through a real exchange and relay."""

from __future__ import annotations

import contextlib
import csv
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.stack import (
    ROOT,
    ServerProcess,
    logged_in,
    run_to_exit,
    running_exchange,
    running_relay,
)

RUN_TIMEOUT_S = 60.0

# Written into a temporary module directory, imported through PYTHONPATH by the runner.
STRATEGIES = '''
from bot_strategies import Strategy


class Taker(Strategy):
    """Takes one lot from the market maker on every tick, alternating sides."""

    def __init__(self):
        self.ticks = 0

    def on_timer(self, ctx):
        self.ticks += 1
        if self.ticks % 2 and ctx.best_ask is not None:
            ctx.buy(1, ctx.best_ask, "ioc")
        elif ctx.best_bid is not None:
            ctx.sell(1, ctx.best_bid, "ioc")


class Boom(Strategy):
    def on_timer(self, ctx):
        raise RuntimeError("boom from strategy")
'''


@contextlib.asynccontextmanager
async def market(data_dir: Path) -> AsyncIterator[tuple[ServerProcess, str, str]]:
    """A running exchange and relay: (exchange process, gateway uri, feed uri)."""
    async with running_exchange(data_dir) as exchange, \
            running_relay(exchange.uris["events"]) as relay:
        yield exchange, exchange.uris["gateway"], relay.uris["feed"]


async def run_battle(config: Path, gateway: str, feed: str, *extra: str,
                     pythonpath: Path | None = None, cwd: Path) -> tuple[int, str, str]:
    return await run_to_exit(
        "bot_battle_runner.py", "--config", str(config), "--exchange-uri", gateway,
        "--market-data-uri", feed, "--progress-interval", "1", *extra,
        timeout=RUN_TIMEOUT_S, cwd=cwd, pythonpath=pythonpath)


def leaderboard(stdout: str) -> dict[str, dict[str, Any]]:
    """The runner's final table by trader: status, fills, position."""
    rows: dict[str, dict[str, Any]] = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 9 and parts[0].isdigit():
            rows[parts[1]] = {"strategy": parts[2], "status": parts[3],
                              "fills": int(parts[4]), "position": int(parts[5])}
    return rows


def trades(data_dir: Path) -> list[dict[str, str]]:
    with (data_dir / "trades.csv").open(newline="") as f:
        return list(csv.DictReader(f))


async def test_custom_strategies_trade_and_a_crashing_bot_is_isolated(tmp_path: Path) -> None:
    modules = tmp_path / "mods"
    modules.mkdir()
    (modules / "e2e_strats.py").write_text(STRATEGIES)
    config = tmp_path / "battle.json"
    config.write_text(json.dumps({"timer_interval_s": 0.1, "bots": [
        {"name": "mm", "class": "bot_strategies:MarketMaker",
         "params": {"size": 20, "levels": 2}},
        {"name": "taker", "class": "e2e_strats:Taker", "count": 2},
        {"name": "boom", "class": "e2e_strats:Boom"},
    ]}))
    data_dir = tmp_path / "data"
    async with market(data_dir) as (exchange, gateway, feed):
        code, out, err = await run_battle(config, gateway, feed, "--duration", "4",
                                          "--data-dir", str(data_dir),
                                          pythonpath=modules, cwd=tmp_path)
        assert exchange.proc.returncode is None, "the exchange must survive the battle"
        async with logged_in(gateway, "after-battle") as client:
            await client.send({"type": "ping"})
            assert (await client.recv_type("pong"))["type"] == "pong"
    assert code == 0, err
    board = leaderboard(out)
    assert set(board) == {"mm", "taker-1", "taker-2", "boom"}, out
    assert board["boom"]["status"] == "crashed"
    assert "Traceback" in err and "RuntimeError: boom from strategy" in err
    # Boom crashed on its first tick (0.1 s in); the takers traded on for ~4 s after it.
    for taker in ("taker-1", "taker-2"):
        assert board[taker]["status"] == "stopped"
        assert board[taker]["fills"] >= 5, out
    assert board["mm"]["fills"] >= 10
    assert sum(row["position"] for row in board.values()) == 0  # every lot has two sides
    rows = trades(data_dir)
    taker_rows = [r for r in rows if "taker-1" in (r["buy_trader"], r["sell_trader"])]
    assert len(taker_rows) == board["taker-1"]["fills"]
    assert not [r for r in rows if "boom" in (r["buy_trader"], r["sell_trader"])]
    assert "bots alive" in err  # progress lines
    report = data_dir / "report.html"
    assert f"report: {report}" in out
    assert "taker-1" in report.read_text(encoding="utf-8")


@pytest.mark.timeout(90)
async def test_shipped_battle_runs_across_worker_processes(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with market(data_dir) as (_, gateway, feed):
        code, out, err = await run_battle(ROOT / "bots_config.json", gateway, feed,
                                          "--duration", "5", "--workers", "2", "--seed", "7",
                                          cwd=tmp_path)
    assert code == 0, err
    board = leaderboard(out)
    shipped = json.loads((ROOT / "bots_config.json").read_text())
    n_bots = sum(bot.get("count", 1) for bot in shipped["bots"])
    assert len(board) == n_bots and all(r["status"] == "stopped" for r in board.values()), out
    assert sum(r["fills"] for r in board.values()) > 0
    # Bots alternate between the two workers; trades show both workers' bots trading.
    order = list(json.loads((ROOT / "bots_config.json").read_text())["bots"])
    ids = [b["name"] if b.get("count", 1) == 1 else f"{b['name']}-{i}"
           for b in order for i in range(1, b.get("count", 1) + 1)]
    workers = {trader: index % 2 for index, trader in enumerate(ids)}
    traded = {t for r in trades(data_dir) for t in (r["buy_trader"], r["sell_trader"])}
    assert {workers[t] for t in traded} == {0, 1}, traded
    assert "bot-worker-0" in err and "bot-worker-1" in err  # each worker logs its bots
    assert f"bots alive {n_bots}/{n_bots}" in err, err
