"""End-to-end crash safety: SIGKILL the exchange in the middle of a battle, restart it on
the same data dir, and check nothing acknowledged was lost or doubled.

A few scripted traders send a seeded mix of orders, cancels, amends, rejected orders and
reconnects over the gateway, pipelined, while the leaderboard and performance timers
tick fast. When the clients have received a seeded number of ``order_ack``\\s the
exchange gets SIGKILL, whatever it is doing. After a restart:

- every ``order_ack`` any client received is in the journal exactly once;
- trades.csv has every trade once, ids 1..N without a gap, every fill a client saw;
- the restarted exchange's orders are exactly the live orders of the journal's replay,
  and its state hash equals the replay's at the recovered seq;
- it continues the seq and order id sequences;
- after a clean stop, ``replay.py`` reproduces trades.csv and performance.csv byte for
  byte and the exchange's final state hash.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import random
import signal
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.exceptions import WebSocketException

from tests.stack import Client, logged_in, running_exchange
from tests.test_recovery_support import final_hash, recovered_line, replay_hash, run_replay

TRADERS = ("alice", "bob", "carol", "dave")
POLICIES = ("interval", "batch", "every", "off")  # by seed: the default run has one of each
MID = 10_000
BATTLE_TIMEOUT_S = 30.0


@dataclass
class Seen:
    """What the clients were told before the crash."""

    acks: dict[int, tuple[str, str]] = field(default_factory=dict)  # order id -> trader, cid
    fills: dict[tuple[int, str], dict[str, Any]] = field(default_factory=dict)  # trade, side
    max_seq: int = 0


class Battle:
    """The scripted traders and the seeded kill."""

    def __init__(self, seed: int, gateway: str, proc: Any) -> None:
        self.rng = random.Random(seed)
        self.gateway = gateway
        self.proc = proc
        self.kill_after = self.rng.randint(20, 400)  # acks received before the SIGKILL
        self.killed = False
        self.seen = Seen()

    async def run(self) -> None:
        seeds = [self.rng.randrange(2**32) for _ in TRADERS]
        await asyncio.wait_for(asyncio.gather(*(
            self.trader(name, random.Random(seed)) for name, seed in zip(
                TRADERS, seeds, strict=True))), BATTLE_TIMEOUT_S)
        assert self.killed

    async def trader(self, name: str, rng: random.Random) -> None:
        live: list[str] = []
        counter = iter(range(10**9))
        try:
            while not self.killed:
                async with logged_in(self.gateway, name) as client:
                    for _ in range(rng.randint(3, 25)):  # then reconnect: a disconnect cancel
                        await self.round(client, name, rng, live, counter)
                live.clear()  # cancel-on-disconnect took them
        except (WebSocketException, OSError, asyncio.TimeoutError):
            # the kill cuts a session, or a reconnect in its handshake
            if not self.killed:
                raise

    async def round(self, client: Client, name: str, rng: random.Random, live: list[str],
                    counter: Any) -> None:
        """A few requests sent at once, then a ping; read everything up to its pong."""
        for _ in range(rng.randint(1, 6)):
            await client.send(self.action(name, rng, live, next(counter)))
        await client.send({"type": "ping"})
        while True:
            message = await client.recv()
            self.see(name, message, live)
            if message["type"] == "pong":
                return

    def action(self, name: str, rng: random.Random, live: list[str], n: int) -> dict[str, Any]:
        cid = f"{name}-{n}"
        side = rng.choice(("buy", "sell"))
        roll = rng.random()
        if roll < 0.15 and live:
            return {"type": "cancel_order", "client_order_id": rng.choice(live)}
        if roll < 0.25 and live:
            change = {"qty": rng.randint(1, 6)} if rng.random() < 0.5 else \
                {"price": MID + rng.randint(-4, 4)}
            return {"type": "amend_order", "client_order_id": rng.choice(live), **change}
        if roll < 0.28:
            return {"type": "cancel_all"}
        live.append(cid)
        if roll < 0.33:
            return {"type": "new_order", "client_order_id": cid, "side": side,
                    "order_type": "market", "qty": rng.randint(1, 3)}
        if roll < 0.37:  # outside the price band: rejected, and it spends a rate token
            return {"type": "new_order", "client_order_id": cid, "side": side,
                    "qty": 1, "price": MID * 2}
        if roll < 0.41:
            stop = MID + (6 if side == "buy" else -6)
            return {"type": "new_order", "client_order_id": cid, "side": side,
                    "order_type": "stop_limit", "stop_price": stop, "price": stop,
                    "qty": rng.randint(1, 3)}
        return {"type": "new_order", "client_order_id": cid, "side": side,
                "qty": rng.randint(1, 5), "price": MID + rng.randint(-4, 4),
                "tif": "ioc" if rng.random() < 0.1 else "gtc"}

    def see(self, name: str, message: dict[str, Any], live: list[str]) -> None:
        seen = self.seen
        seen.max_seq = max(seen.max_seq, message.get("seq") or 0)
        kind = message["type"]
        if kind == "order_ack":
            seen.acks[message["order_id"]] = (name, message["client_order_id"])
            if len(seen.acks) == self.kill_after and not self.killed:
                self.proc.send_signal(signal.SIGKILL)  # whatever the exchange is doing
                self.killed = True
        elif kind == "fill":
            seen.fills[message["trade_id"], message["side"]] = {**message, "trader": name}
            if message["leaves_qty"] == 0 and message["client_order_id"] in live:
                live.remove(message["client_order_id"])
        elif kind in ("order_canceled", "order_reject") and message["client_order_id"] in live:
            live.remove(message["client_order_id"])


def write_config(path: Path) -> Path:
    path.write_text(json.dumps({"server": {"leaderboard_interval_s": 0.02,
                                           "performance_interval_s": 0.05}}))
    return path


def live_orders_at(events: list[dict[str, Any]], seq: int) -> set[int]:
    """The order ids live after event ``seq``, from the replayed event stream."""
    live: set[int] = set()
    for event in events:
        if event["seq"] > seq:
            break
        kind = event["type"]
        if kind == "order_accepted":
            live.add(event["order_id"])
        elif kind == "order_canceled":
            live.discard(event["order_id"])
        elif kind == "trade":
            for side in ("buy", "sell"):
                if event[f"{side}_leaves_qty"] == 0:
                    live.discard(event[f"{side}_order_id"])
    return live


async def open_order_ids(gateway: str) -> set[int]:
    ids: set[int] = set()
    for name in TRADERS:
        async with logged_in(gateway, name) as client:
            await client.send({"type": "get_open_orders"})
            reply = await client.recv_type("open_orders")
            ids.update(order["order_id"] for order in reply["orders"])
    return ids


def check_trades(trades_csv: Path, seen: Seen) -> None:
    rows = list(csv.DictReader(io.StringIO(trades_csv.read_text())))
    ids = [int(row["trade_id"]) for row in rows]
    assert ids == list(range(1, len(ids) + 1)), "trade ids doubled or missing"
    by_id = {int(row["trade_id"]): row for row in rows}
    for (trade_id, side), fill in seen.fills.items():
        row = by_id.get(trade_id)
        assert row is not None, f"a client saw trade {trade_id} but trades.csv lacks it"
        assert row[f"{side}_trader"] == fill["trader"]
        assert int(row[f"{side}_order_id"]) == fill["order_id"]
        assert int(row["qty"]) == fill["qty"] and row["price"] == f"{fill['price'] / 100:.2f}"


async def crash_and_recover(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    data = tmp_path / "run"
    config = write_config(tmp_path / "config.json")
    flags = ["--config", str(config), "--journal-flush", POLICIES[seed % len(POLICIES)],
             "--snapshot-every", str(rng.choice([0, 25, 200]))]
    async with running_exchange(data, *flags) as exchange:
        battle = Battle(seed, exchange.uris["gateway"], exchange.proc)
        await battle.run()
        assert await exchange.proc.wait() == -signal.SIGKILL
    seen = battle.seen
    assert len(seen.acks) >= battle.kill_after

    async with running_exchange(data, *flags) as exchange:
        _, seq, recovered_hash = recovered_line(exchange.stderr_text)
        assert seq >= seen.max_seq  # every seq a client saw survived
        open_ids = await open_order_ids(exchange.uris["gateway"])
        async with logged_in(exchange.uris["gateway"], "zed") as zed:
            await zed.send({"type": "new_order", "client_order_id": "z1", "side": "buy",
                            "qty": 1, "price": MID - 50})
            ack = await zed.recv_type("order_ack")
        assert ack["order_id"] > max(seen.acks) and ack["seq"] > seq  # the sequences go on
    final = final_hash(exchange.stderr_text)

    out = tmp_path / "replayed"
    code, _, err = await run_replay("--data-dir", str(data), "--out-dir", str(out),
                                    "--events", str(tmp_path / "events.jsonl"))
    assert code == 0, err
    events = [orjson.loads(line) for line in (tmp_path / "events.jsonl").read_bytes().split(
        b"\n") if line]
    accepted = Counter(e["order_id"] for e in events if e["type"] == "order_accepted")
    owners = {e["order_id"]: (e["trader_id"], e["client_order_id"])
              for e in events if e["type"] == "order_accepted"}
    for order_id, owner in seen.acks.items():
        assert accepted[order_id] == 1 and owners[order_id] == owner, (order_id, owner)
    assert open_ids == live_orders_at(events, seq)
    check_trades(data / "trades.csv", seen)
    assert (out / "trades.csv").read_bytes() == (data / "trades.csv").read_bytes()
    assert (out / "performance.csv").read_bytes() == (data / "performance.csv").read_bytes()
    assert await replay_hash(data, "--until-seq", str(seq)) == recovered_hash
    assert await replay_hash(data) == final


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_sigkill_in_a_battle_loses_and_doubles_nothing(tmp_path: Path, seed: int) -> None:
    await crash_and_recover(tmp_path, seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 124))
async def test_sigkill_in_a_battle_many_seeds(tmp_path: Path, seed: int) -> None:
    await crash_and_recover(tmp_path, seed)
