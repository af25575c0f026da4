"""End-to-end: the internal event stream of the real exchange process, and
cancel-on-disconnect as seen on it."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import websockets
from websockets.exceptions import ConnectionClosed

from tests.stack import Client, connected, logged_in, running_exchange


def order(cid: str, side: str, qty: int, price: int, **extra: Any) -> dict:
    return {"type": "new_order", "client_order_id": cid, "side": side, "qty": qty,
            "price": price, **extra}


async def place(client: Client, message: dict) -> dict:
    await client.send(message)
    return await client.recv_type("order_ack")


class Replica:
    """Market state rebuilt from a snapshot plus the events after it."""

    def __init__(self, snapshot: dict) -> None:
        assert snapshot["type"] == "snapshot"
        self.seq = snapshot["seq"]
        self.books = {symbol: {side: [list(o) for o in orders] for side, orders in book.items()}
                      for symbol, book in snapshot["books"].items()}
        self.last_prices = dict(snapshot["last_prices"])
        self.market_open = dict(snapshot["market_open"])

    def apply(self, event: dict) -> None:
        assert event["seq"] == self.seq + 1, f"gap or repeat: {self.seq} then {event}"
        self.seq = event["seq"]
        if event["type"] == "book_changed":
            self._book_changed(event)
        elif event["type"] == "trade":
            self.last_prices[event["symbol"]] = event["price"]
        elif event["type"] == "market_status_changed":
            self.market_open[event["symbol"]] = event["is_open"]

    def _book_changed(self, event: dict) -> None:
        side = self.books[event["symbol"]]["bids" if event["side"] == "buy" else "asks"]
        if event["action"] == "add":
            better = (lambda p: p >= event["price"]) if event["side"] == "buy" \
                else (lambda p: p <= event["price"])
            index = sum(1 for o in side if better(o[1]))  # back of its level
            side.insert(index, [event["order_id"], event["price"], event["order_qty"]])
            return
        (entry,) = [o for o in side if o[0] == event["order_id"]]
        if event["order_qty"] == 0:
            side.remove(entry)
        else:
            entry[2] = event["order_qty"]

    def state(self) -> dict:
        return {"seq": self.seq, "books": self.books, "last_prices": self.last_prices,
                "market_open": self.market_open}


def snapshot_state(snapshot: dict) -> dict:
    return {k: snapshot[k] for k in ("seq", "books", "last_prices", "market_open")}


async def follow(consumer: Client, replica: Replica, until_seq: int) -> list[dict]:
    """Apply events to ``replica`` until it reaches ``until_seq``; returns them."""
    events = []
    while replica.seq < until_seq:
        event = await consumer.recv()
        replica.apply(event)
        events.append(event)
    return events


async def trade_some(alice: Client, bob: Client, tag: str) -> None:
    """Adds, a partial and full execution, an in-place amend, a requeue and a cancel."""
    await place(alice, order(f"{tag}a1", "sell", 5, 10010))
    await place(alice, order(f"{tag}a2", "sell", 2, 10010))
    await place(alice, order(f"{tag}a3", "buy", 4, 9990))
    await place(bob, order(f"{tag}b1", "buy", 6, 10010))  # a1 filled, a2 partly
    await alice.send({"type": "amend_order", "client_order_id": f"{tag}a3", "qty": 3})
    await alice.recv_type("order_amended")
    await place(bob, order(f"{tag}b2", "buy", 2, 9995))
    await bob.send({"type": "amend_order", "client_order_id": f"{tag}b2", "price": 9996})
    await bob.recv_type("order_amended")
    await place(bob, order(f"{tag}b3", "buy", 1, 9980))
    await bob.send({"type": "cancel_order", "client_order_id": f"{tag}b3"})
    await bob.recv_type("order_canceled")


async def test_snapshot_then_gapless_events_and_a_late_consumer_converges(
        tmp_path: Path) -> None:
    async with running_exchange(tmp_path) as ex, \
            connected(ex.uris["events"]) as early, \
            logged_in(ex.uris["gateway"], "alice") as alice, \
            logged_in(ex.uris["gateway"], "bob") as bob:
        first = await early.recv()
        early_replica = Replica(first)
        assert first["books"] == {"SIM": {"bids": [], "asks": []}}
        assert first["instruments"] == [{"symbol": "SIM", "tick_size": "0.01", "lot_size": 1}]
        await trade_some(alice, bob, "p1-")
        async with connected(ex.uris["events"]) as late:
            late_snapshot = await late.recv()
            late_replica = Replica(late_snapshot)
            assert late_snapshot["books"]["SIM"]["asks"], "phase 1 left orders resting"
            await trade_some(alice, bob, "p2-")
            async with connected(ex.uris["events"]) as final:
                end = await final.recv()
            assert end["seq"] > late_snapshot["seq"]
            await follow(late, late_replica, end["seq"])
        events = await follow(early, early_replica, end["seq"])
        assert late_replica.state() == snapshot_state(end)
        assert early_replica.state() == snapshot_state(end)
        kinds = {e["type"] for e in events}
        assert {"order_accepted", "trade", "book_changed", "position_changed",
                "order_amended", "order_canceled"} <= kinds
        trade = next(e for e in events if e["type"] == "trade")
        assert isinstance(trade["buy_fee"], int)  # integer money units on this stream


async def test_a_batched_consumer_gets_each_inputs_events_in_one_frame(
        tmp_path: Path) -> None:
    async with running_exchange(tmp_path) as ex, \
            connected(ex.uris["events"]) as plain, \
            connected(ex.uris["events"] + "/?batch=1") as batched, \
            logged_in(ex.uris["gateway"], "alice") as alice, \
            logged_in(ex.uris["gateway"], "bob") as bob:
        plain_replica, batched_replica = Replica(await plain.recv()), Replica(await batched.recv())
        await trade_some(alice, bob, "x-")
        async with connected(ex.uris["events"]) as final:
            end = await final.recv()
        events = await follow(plain, plain_replica, end["seq"])
        frames, batched_events = [], []
        while batched_replica.seq < end["seq"]:
            frame = await batched.recv()
            assert isinstance(frame, list) and frame, frame  # one input's events
            for event in frame:
                batched_replica.apply(event)
            frames.append(frame)
            batched_events.extend(frame)
        assert batched_events == events  # the same events, in the same order
        assert len(frames) < len(events)  # fewer frames: an input's events share one
        assert batched_replica.state() == snapshot_state(end)


async def test_leaderboard_is_a_sequenced_event(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"server": {"leaderboard_interval_s": 0.1}}))
    async with running_exchange(tmp_path, "--config", str(config)) as ex, \
            connected(ex.uris["events"]) as consumer, \
            logged_in(ex.uris["gateway"], "alice") as alice, \
            logged_in(ex.uris["gateway"], "bob") as bob:
        replica = Replica(await consumer.recv())
        await place(alice, order("a1", "sell", 2, 10000))
        await place(bob, order("b1", "buy", 2, 10000))

        def full_board(event: dict) -> bool:
            replica.apply(event)
            return event["type"] == "leaderboard" and len(event["rows"]) == 2

        board = await consumer.recv_until(full_board)
        rows = {row["trader_id"]: row for row in board["rows"]}
        assert rows["alice"] == {"trader_id": "alice", "position": -2, "cash": 1000200.0,
                                 "realized_pnl": 0.0, "equity": 1000000.0}
        assert rows["bob"]["position"] == 2 and rows["bob"]["equity"] == 999999.98
        assert board["rows"][0]["trader_id"] == "alice"  # best equity first


async def test_resting_orders_are_canceled_when_the_trader_disconnects(
        tmp_path: Path) -> None:
    async with running_exchange(tmp_path) as ex, \
            connected(ex.uris["events"]) as consumer:
        replica = Replica(await consumer.recv())
        async with logged_in(ex.uris["gateway"], "alice") as alice:
            ids = {(await place(alice, order(f"a{i}", "buy", 1, 9990 + i)))["order_id"]
                   for i in range(3)}
        canceled = set()
        while canceled != ids:
            event = await consumer.recv()
            replica.apply(event)
            if event["type"] == "order_canceled":
                assert (event["trader_id"], event["reason"]) == ("alice", "disconnect")
                canceled.add(event["order_id"])
        async with connected(ex.uris["events"]) as again:
            fresh = await again.recv()
        await follow(consumer, replica, fresh["seq"])
        assert fresh["books"]["SIM"] == {"bids": [], "asks": []}
        assert replica.state() == snapshot_state(fresh)


async def test_a_crashed_client_is_canceled_too(tmp_path: Path) -> None:
    async with running_exchange(tmp_path) as ex, \
            connected(ex.uris["events"]) as consumer:
        await consumer.recv_type("snapshot")
        async with logged_in(ex.uris["gateway"], "alice") as alice:
            ack = await place(alice, order("a1", "sell", 1, 10010))
            alice.ws.transport.abort()  # no close handshake
        canceled = await consumer.recv_type("order_canceled")
        assert (canceled["order_id"], canceled["reason"]) == (ack["order_id"], "disconnect")


async def test_orders_live_while_the_trader_has_another_session(tmp_path: Path) -> None:
    async with running_exchange(tmp_path) as ex, \
            logged_in(ex.uris["gateway"], "alice") as keeper:
        async with logged_in(ex.uris["gateway"], "alice") as leaving:
            await place(leaving, order("a1", "buy", 1, 9990))
        await keeper.recv_type("order_ack")  # the order's ack reached both sessions
        await place(keeper, order("a2", "buy", 1, 9991))
        await keeper.send({"type": "get_open_orders"})
        orders = (await keeper.recv_type("open_orders"))["orders"]
        assert [o["client_order_id"] for o in orders] == ["a1", "a2"]


async def test_cancel_on_disconnect_can_be_turned_off(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"server": {"cancel_on_disconnect": False}}))
    async with running_exchange(tmp_path, "--config", str(config)) as ex:
        async with logged_in(ex.uris["gateway"], "alice") as alice:
            await place(alice, order("a1", "buy", 1, 9990))
        async with logged_in(ex.uris["gateway"], "bob") as bob:
            await place(bob, order("b1", "sell", 1, 9990))  # trades with alice's order
            fill = await bob.recv_type("fill")
            assert fill["qty"] == 1 and fill["liquidity"] == "taker"


async def test_a_consumer_that_does_not_read_is_closed_as_too_slow(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"risk": {"rate_limit_per_sec": 1e6,
                                           "rate_limit_burst": 1_000_000}}))
    async with running_exchange(tmp_path, "--config", str(config),
                                "--consumer-buffer", "65536") as ex:
        host, port = ex.uris["events"].removeprefix("ws://").rsplit(":", 1)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # little kernel slack
        sock.connect((host, int(port)))
        sock.setblocking(False)
        async with websockets.connect(ex.uris["events"], sock=sock, compression=None,
                                      max_queue=4) as ws, \
                logged_in(ex.uris["gateway"], "alice") as alice:
            pong = asyncio.create_task(alice.recv_type("pong", timeout=60))  # alice reads
            # ~4 events of ~200 bytes per pair, never read: far past the 64 KiB allowed
            for i in range(6000):
                await alice.send(order(f"a{i}", "buy", 1, 9990))
                await alice.send({"type": "cancel_order", "client_order_id": f"a{i}"})
            await alice.send({"type": "ping"})
            await pong
            closed = await asyncio.wait_for(drain_until_closed(ws), 30)
        assert (closed.code, closed.reason) == (1008, "too slow")
        async with connected(ex.uris["events"]) as again:  # a fresh start is offered
            assert (await again.recv())["type"] == "snapshot"


async def drain_until_closed(ws: Any) -> Any:
    try:
        while True:
            await ws.recv()
    except ConnectionClosed as exc:
        return exc.rcvd
