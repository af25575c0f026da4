"""A fake exchange event stream for testing the market-data relay, and client-side
mirrors to check what the feed says.

The fake is honest by construction: it runs a real ``engine.Engine`` and encodes its
events with ``models.event_to_dict``, exactly as API_SPEC.md says the exchange does
(a ``snapshot`` on connect, then every sequenced event). The tests at the bottom check
the fake itself against the relay's replica, so the other tests can trust it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from typing import Any

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from config import MONEY_SCALE, ExchangeConfig, InstrumentConfig, MarginConfig, RiskConfig
from engine import Engine
from market_data_server import BookReplica
from models import (
    REJECT_EVENTS,
    AmendOrder,
    CancelOrder,
    Command,
    NewOrder,
    OrderType,
    Side,
    TimeInForce,
    event_to_dict,
)
from tests.stack import Client

SYMBOLS = ("SIM", "ALT")
MIDS = {"SIM": 10_000, "ALT": 5_000}
TRADERS = ("alice", "bob", "carol", "dave", "erin")
START_TS = 1_700_000_000_000_000


def fake_config() -> ExchangeConfig:
    # generous limits: the flows here test the feed, not the risk checks
    return ExchangeConfig(
        instruments=[InstrumentConfig(symbol=s, reference_price=MIDS[s]) for s in SYMBOLS],
        risk=RiskConfig(max_order_qty=10_000, max_position=10**9, max_open_orders=100_000,
                        rate_limit_per_sec=1e9, rate_limit_burst=10**9),
        margin=MarginConfig(enabled=False))


class FakeExchange:
    """The exchange's internal event stream (API_SPEC.md), driven by a real engine."""

    def __init__(self, config: ExchangeConfig | None = None) -> None:
        self.config = config or fake_config()
        self.engine = Engine(self.config)
        self.seq = 0
        self.ts = START_TS
        self.connections: set[ServerConnection] = set()
        self.connects = 0
        self.sent: list[dict[str, Any]] = []  # every event streamed, for expectations
        self.server: Server | None = None
        self.port = 0
        self._next_client_id = 0

    @property
    def uri(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> str:
        self.server = await serve(self._handle, "127.0.0.1", port, compression=None)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.uri

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    async def _handle(self, ws: ServerConnection) -> None:
        data = orjson.dumps(self.snapshot())
        # registered before the first await, so no event can slip between the snapshot
        # and the live stream
        self.connections.add(ws)
        self.connects += 1
        try:
            await ws.send(data, text=True)
            await ws.wait_closed()
        finally:
            self.connections.discard(ws)

    def snapshot(self) -> dict[str, Any]:
        engine = self.engine
        books = {}
        for symbol, book in engine.books.items():
            books[symbol] = {
                side: [[o.order_id, o.price, o.leaves_qty] for o in book.iter_orders(which)]
                for side, which in (("bids", Side.BUY), ("asks", Side.SELL))}
        return {"type": "snapshot", "seq": self.seq, "ts": self.ts,
                "instruments": [{"symbol": i.symbol, "tick_size": i.tick_size,
                                 "lot_size": i.lot_size} for i in self.config.instruments],
                "books": books, "market_open": dict(engine.market_open),
                "last_prices": dict(engine.last_prices)}

    async def _broadcast(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        data = orjson.dumps(message)
        for ws in list(self.connections):
            with contextlib.suppress(ConnectionClosed):
                await ws.send(data, text=True)

    async def process(self, command: Command) -> None:
        """Run one command through the engine and stream its sequenced events."""
        self.ts += 1_000
        for event in self.engine.process(command, self.ts):
            if isinstance(event, REJECT_EVENTS):
                continue  # rejections change nothing and are not sequenced
            self.seq += 1
            await self._broadcast(event_to_dict(event, self.seq))

    async def leaderboard(self) -> int:
        """Publish a leaderboard (money in currency, as the exchange does); its seq."""
        rows = [{**row, "cash": row["cash"] / MONEY_SCALE,
                 "realized_pnl": row["realized_pnl"] / MONEY_SCALE,
                 "equity": row["equity"] / MONEY_SCALE}
                for row in self.engine.leaderboard()]
        self.seq += 1
        await self._broadcast({"type": "leaderboard", "seq": self.seq, "ts": self.ts,
                               "rows": rows})
        return self.seq

    def lose_one_event(self) -> None:
        """Burn a seq without sending it: the next event arrives after a gap."""
        self.seq += 1

    # ------------------------------------------------------------ order flow

    def client_order_id(self) -> str:
        self._next_client_id += 1
        return f"c{self._next_client_id}"

    def limit(self, trader: str, symbol: str, side: Side, price: int, qty: int,
              tif: TimeInForce = TimeInForce.GTC) -> NewOrder:
        return NewOrder(trader, self.client_order_id(), symbol, side, OrderType.LIMIT, qty,
                        price, tif=tif)

    def random_command(self, rng: random.Random) -> Command:
        """Passive limits near the mid, cancels, amends and crossing orders."""
        roll = rng.random()
        if roll < 0.35:
            victim = self._recent_live_order(rng)
            if victim is not None:
                if roll < 0.25:
                    return CancelOrder(victim.trader_id, victim.order_id)
                if rng.random() < 0.5:
                    return AmendOrder(victim.trader_id, victim.order_id,
                                      qty=max(1, victim.qty - rng.randint(0, victim.qty)))
                return AmendOrder(victim.trader_id, victim.order_id,
                                  price=victim.price + rng.randint(-3, 3))  # type: ignore[operator]
        symbol = rng.choice(SYMBOLS)
        side = rng.choice((Side.BUY, Side.SELL))
        offset = rng.randint(-6, 0) if roll > 0.85 else rng.randint(1, 25)  # <= 0 crosses
        price = MIDS[symbol] - offset if side is Side.BUY else MIDS[symbol] + offset
        tif = TimeInForce.IOC if roll > 0.97 else TimeInForce.GTC
        return self.limit(rng.choice(TRADERS), symbol, side, price, rng.randint(1, 30), tif)

    def _recent_live_order(self, rng: random.Random) -> Any:
        top = self.engine.next_order_id - 1
        for _ in range(5 if top >= 1 else 0):
            order = self.engine.orders.get(rng.randint(max(1, top - 300), top))
            if order is not None and order.price is not None:
                return order
        return None

    async def random_flow(self, rng: random.Random, commands: int) -> None:
        for _ in range(commands):
            await self.process(self.random_command(rng))
            # let this process's own feed clients read as the stream goes, like real ones
            await asyncio.sleep(0)

    # ------------------------------------------------------------ truth

    def depth(self, symbol: str, depth: int | None) -> dict[str, list[list[int]]]:
        book = self.engine.books[symbol]
        return {"bids": [list(level) for level in book.depth(Side.BUY, depth)],
                "asks": [list(level) for level in book.depth(Side.SELL, depth)]}

    def l3(self, symbol: str) -> dict[str, list[list[int]]]:
        book = self.engine.books[symbol]
        return {side: [[o.order_id, o.price, o.leaves_qty] for o in book.iter_orders(which)]
                for side, which in (("bids", Side.BUY), ("asks", Side.SELL))}


@contextlib.asynccontextmanager
async def running_fake(port: int = 0) -> AsyncIterator[FakeExchange]:
    fake = FakeExchange()
    await fake.start(port)
    try:
        yield fake
    finally:
        await fake.stop()


# ================================================================ client-side mirrors


def messages_of(frame: Any) -> list[dict[str, Any]]:
    """The messages in one decoded frame (a batch frame is a JSON array)."""
    return frame if isinstance(frame, list) else [frame]


class BookMirror:
    """What a feed client rebuilds from book_snapshot + book_update, checked strictly."""

    def __init__(self) -> None:
        self.books: dict[str, dict[str, dict[int, int]]] = {}
        self.seqs: dict[str, int] = {}
        self.snapshots: dict[str, int] = {}

    def apply(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "book_snapshot":
            symbol = msg["symbol"]
            self.books[symbol] = {side: {p: q for p, q in msg[side]} for side in ("bids", "asks")}
            self.seqs[symbol] = msg["seq"]
            self.snapshots[symbol] = self.snapshots.get(symbol, 0) + 1
        elif kind == "book_update":
            symbol = msg["symbol"]
            assert symbol in self.books, f"book_update before any book_snapshot: {msg}"
            assert msg["seq"] > self.seqs[symbol], f"seq went backwards: {msg}"
            self.seqs[symbol] = msg["seq"]
            for side in ("bids", "asks"):
                levels = self.books[symbol][side]
                for price, qty in msg[side]:
                    assert type(price) is int and type(qty) is int, msg
                    if qty:
                        levels[price] = qty
                    else:
                        assert price in levels, f"removes a level it never had: {msg}"
                        del levels[price]

    def view(self, symbol: str) -> dict[str, list[list[int]]]:
        book = self.books[symbol]
        return {"bids": [[p, q] for p, q in sorted(book["bids"].items(), reverse=True)],
                "asks": [[p, q] for p, q in sorted(book["asks"].items())]}


class OrdersMirror:
    """What a client rebuilds from orders_snapshot + order_event (L3)."""

    def __init__(self) -> None:
        # symbol -> side -> order_id -> [price, qty]; dicts keep time priority
        self.books: dict[str, dict[str, dict[int, list[int]]]] = {}

    def apply(self, msg: dict[str, Any]) -> None:
        if msg.get("type") == "orders_snapshot":
            self.books[msg["symbol"]] = {
                side: {oid: [price, qty] for oid, price, qty in msg[side]}
                for side in ("bids", "asks")}
        elif msg.get("type") == "order_event":
            assert not any("trader" in key for key in msg), f"order_event leaks a trader: {msg}"
            orders = self.books[msg["symbol"]]["bids" if msg["side"] == "buy" else "asks"]
            oid = msg["order_id"]
            if msg["event"] == "add":
                assert oid not in orders, msg
                orders[oid] = [msg["price"], msg["qty"]]
            elif msg["qty"]:
                orders[oid][1] = msg["qty"]
            else:
                del orders[oid]

    def view(self, symbol: str) -> dict[str, list[list[int]]]:
        out = {}
        for side, reverse in (("bids", True), ("asks", False)):
            orders = self.books[symbol][side]
            prices = sorted({price for price, _ in orders.values()}, reverse=reverse)
            out[side] = [[oid, price, qty] for price in prices
                         for oid, (p, qty) in orders.items() if p == price]
        return out


async def collect_until(client: Client, predicate: Any, timeout: float = 10.0
                        ) -> list[dict[str, Any]]:
    """Every message received up to and including the first one matching ``predicate``."""
    seen: list[dict[str, Any]] = []

    async def scan() -> list[dict[str, Any]]:
        while True:
            # ws.recv() directly: it returns queued frames without a loop iteration
            # each, so a reader running beside a busy producer keeps up
            for msg in messages_of(orjson.loads(await client.ws.recv())):
                seen.append(msg)
                if predicate(msg):
                    return seen
    return await asyncio.wait_for(scan(), timeout)


def is_leaderboard(seq: int) -> Any:
    return lambda m: m.get("type") == "leaderboard" and m["seq"] == seq


# ================================================================ the fake's own tests


async def test_fake_snapshot_plus_events_rebuild_the_engine_book() -> None:
    """The fake's stream obeys API_SPEC: a replica built from a snapshot taken half way
    and fed the later book_changed events matches the engine, at L2 and L3."""
    fake = FakeExchange()
    rng = random.Random(7)
    sent: list[dict[str, Any]] = []

    async def record(message: dict[str, Any]) -> None:
        sent.append(message)
    fake._broadcast = record  # type: ignore[method-assign]

    await fake.random_flow(rng, 300)
    snapshot = fake.snapshot()
    replicas = {s: BookReplica.from_snapshot(s, snapshot["books"][s]) for s in SYMBOLS}
    sent.clear()
    await fake.random_flow(rng, 600)
    seqs = [m["seq"] for m in sent]
    assert seqs == list(range(snapshot["seq"] + 1, fake.seq + 1)), "gapless after snapshot"
    kinds = {m["type"] for m in sent}
    assert {"book_changed", "trade", "order_accepted", "order_canceled"} <= kinds
    for msg in sent:
        if msg["type"] == "book_changed":
            replicas[msg["symbol"]].apply(msg)
    for symbol, replica in replicas.items():
        assert [replica.bids.top(10**6), replica.asks.top(10**6)] == list(
            fake.depth(symbol, None).values())
        assert {"bids": replica.bids.orders(), "asks": replica.asks.orders()} == fake.l3(symbol)
