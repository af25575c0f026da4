"""End to end with the real exchange: orders through the gateway, the relay following the
exchange's event stream, feed clients over real WebSockets; restarts of either side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from tests.stack import (
    Client,
    connected,
    logged_in,
    running_exchange,
    running_relay,
    stop_process,
)
from tests.test_market_data_fake import BookMirror, OrdersMirror, collect_until

ONLINE = {"type": "status", "exchange": "online"}
OFFLINE = {"type": "status", "exchange": "offline"}


def order(cid: str, side: str, qty: int, price: int) -> dict[str, Any]:
    return {"type": "new_order", "client_order_id": cid, "symbol": "SIM", "side": side,
            "qty": qty, "price": price}


async def place(trader: Client, cid: str, side: str, qty: int, price: int) -> dict[str, Any]:
    await trader.send(order(cid, side, qty, price))
    return await trader.recv_type("order_ack")


async def exchange_l3(events_uri: str) -> dict[str, list[list[int]]]:
    """The exchange's own L3 book of SIM, from a fresh event-stream snapshot."""
    async with connected(events_uri) as consumer:
        snapshot = await consumer.recv()
    assert snapshot["type"] == "snapshot"
    return snapshot["books"]["SIM"]


def l2(l3: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
    out = {}
    for side in ("bids", "asks"):
        totals: dict[int, int] = {}
        for _order_id, price, qty in l3[side]:
            totals[price] = totals.get(price, 0) + qty
        out[side] = [[p, q] for p, q in sorted(totals.items(), reverse=side == "bids")]
    return out


def seq_after(seq: int) -> Any:
    return lambda m: m.get("seq", 0) > seq and m.get("type") == "book_update"


async def test_gateway_orders_reach_the_feed_and_snapshot_plus_updates_match(
        tmp_path: Path) -> None:
    async with running_exchange(tmp_path) as exchange, \
            running_relay(exchange.uris["events"]) as relay:
        feed, gateway = relay.uris["feed"], exchange.uris["gateway"]
        async with connected(feed) as watcher, logged_in(gateway, "alice") as alice, \
                logged_in(gateway, "bob") as bob:
            seen = await collect_until(watcher, lambda m: m == ONLINE)
            await watcher.send({"type": "subscribe", "channels": ["book", "trades", "orders"],
                                "depth": 1000})
            await place(alice, "a1", "buy", 10, 9990)
            await place(alice, "a2", "buy", 5, 9995)
            await place(alice, "a3", "sell", 7, 10010)
            await place(alice, "a4", "sell", 3, 10005)
            await place(bob, "b1", "sell", 8, 9990)  # takes 5 @ 9995, then 3 @ 9990
            await alice.send({"type": "cancel_order", "client_order_id": "a4"})
            await alice.recv_type("order_canceled")
            await alice.send({"type": "amend_order", "client_order_id": "a3", "qty": 4})
            await alice.recv_type("order_amended")
            marker = await place(bob, "b2", "buy", 1, 9000)
            seen += await collect_until(watcher, seq_after(marker["seq"]))
            # checked while alice and bob are still in: logging out cancels their orders
            truth = await exchange_l3(exchange.uris["events"])
            async with connected(feed) as late:  # a fresh subscriber's snapshot agrees
                fresh = await late.recv_type("book_snapshot")
        books, orders = BookMirror(), OrdersMirror()
        start = next(i for i, m in enumerate(seen) if m["type"] == "subscribed")
        for msg in seen[start:]:
            books.apply(msg)
            orders.apply(msg)
        trades = [(m["price"], m["qty"], m["aggressor"], m["buy_trader"], m["sell_trader"])
                  for m in seen[start:] if m["type"] == "trade"]
        assert trades == [(9995, 5, "sell", "alice", "bob"), (9990, 3, "sell", "alice", "bob")]
        expected = {"bids": [[9990, 7], [9000, 1]], "asks": [[10010, 4]]}
        assert books.view("SIM") == expected
        assert l2(truth) == expected
        assert orders.view("SIM") == truth
        assert {"bids": fresh["bids"], "asks": fresh["asks"]} == expected


async def test_relay_restart_subscriber_reconnects_to_a_fresh_snapshot(tmp_path: Path) -> None:
    async with running_exchange(tmp_path) as exchange, \
            logged_in(exchange.uris["gateway"], "carol") as carol:
        events = exchange.uris["events"]
        await place(carol, "c1", "buy", 4, 9950)
        async with running_relay(events) as relay:
            feed = relay.uris["feed"]
            async with connected(feed) as client:
                await client.recv_until(lambda m: m == ONLINE)
                ack = await place(carol, "c2", "sell", 6, 10050)
                await client.recv_until(seq_after(ack["seq"]))
                assert await stop_process(relay.proc) == 0
                with pytest.raises(ConnectionClosed) as closed:
                    await client.recv_until(lambda m: False)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        await place(carol, "c3", "buy", 2, 9960)  # while no relay runs
        port = feed.rsplit(":", 1)[1]
        async with running_relay(events, "--port", port) as again:
            assert again.uris["feed"] == feed
            async with connected(feed) as client:
                snapshot = await client.recv_type("book_snapshot", timeout=15)
        assert {"bids": snapshot["bids"], "asks": snapshot["asks"]} == {
            "bids": [[9960, 2], [9950, 4]], "asks": [[10050, 6]]}


async def test_exchange_restart_sends_offline_then_resyncs(tmp_path: Path) -> None:
    async with running_exchange(tmp_path) as first:
        events = first.uris["events"]
        async with running_relay(events) as relay, connected(relay.uris["feed"]) as client, \
                logged_in(first.uris["gateway"], "dave") as dave:
            mirror = BookMirror()
            for msg in await collect_until(client, lambda m: m == ONLINE):
                mirror.apply(msg)
            ack = await place(dave, "d1", "buy", 3, 9900)
            for msg in await collect_until(client, seq_after(ack["seq"])):
                mirror.apply(msg)
            assert mirror.view("SIM") == {"bids": [[9900, 3]], "asks": []}
            assert await stop_process(first.proc) == 0
            for msg in await collect_until(client, lambda m: m == OFFLINE):
                mirror.apply(msg)
            port = events.rsplit(":", 1)[1]
            async with running_exchange(tmp_path, "--events-port", port) as second:
                resync = await collect_until(client, lambda m: m.get("type") == "status",
                                             timeout=15)
                assert resync[-1] == ONLINE
                assert [m["type"] for m in resync[:-1]] == ["book_snapshot"]
                for msg in resync:
                    mirror.apply(msg)
                # whatever the new process recovered, the feed shows exactly that
                assert mirror.view("SIM") == l2(await exchange_l3(second.uris["events"]))
                async with logged_in(second.uris["gateway"], "erin") as erin:
                    ack = await place(erin, "e1", "sell", 2, 10100)
                    for msg in await collect_until(client, seq_after(ack["seq"])):
                        mirror.apply(msg)
                    truth = l2(await exchange_l3(second.uris["events"]))
                assert [10100, 2] in truth["asks"]
                assert mirror.view("SIM") == truth
