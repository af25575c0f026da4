"""The relay as a real process, following the fake exchange stream over a real
WebSocket, with real feed clients: the public feed contract end to end."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.stack import ROOT, Client, ServerProcess, connected, running_relay, stop_process
from tests.test_market_data_fake import (
    SYMBOLS,
    BookMirror,
    FakeExchange,
    OrdersMirror,
    collect_until,
    is_leaderboard,
    messages_of,
    running_fake,
)

ALL_CHANNELS = ["book", "trades", "leaderboard", "orders"]


@contextlib.asynccontextmanager
async def stack(*relay_args: str) -> AsyncIterator[tuple[FakeExchange, ServerProcess, str]]:
    async with running_fake() as fake, running_relay(fake.uri, *relay_args) as relay:
        yield fake, relay, relay.uris["feed"]


async def subscribe(client: Client, **fields: Any) -> dict[str, Any]:
    """Subscribe and return the ``subscribed`` ack (whatever came before is skipped)."""
    await client.send({"type": "subscribe", **fields})
    return await client.recv_until(
        lambda f: any(m.get("type") == "subscribed" for m in messages_of(f)))


async def until_pong(client: Client) -> list[dict[str, Any]]:
    """Everything queued for ``client`` so far: the relay answers a ping in order."""
    await client.send({"type": "ping"})
    return await collect_until(client, lambda m: m.get("type") == "pong")


def apply_all(mirror: BookMirror | OrdersMirror, messages: list[dict[str, Any]]) -> None:
    for msg in messages:
        mirror.apply(msg)


def public_trade(event: dict[str, Any]) -> dict[str, Any]:
    keys = ("symbol", "seq", "trade_id", "price", "qty", "aggressor", "buy_trader",
            "sell_trader", "ts")
    return {"type": "trade", **{k: event[k] for k in keys}}


async def test_ready_line_help_and_clean_sigterm() -> None:
    help_run = subprocess.run([sys.executable, str(ROOT / "market_data_server.py"), "--help"],
                              capture_output=True, text=True, timeout=30, check=False)
    assert help_run.returncode == 0
    for flag in ("--host", "--port", "--exchange-uri", "--log-level", "--max-backlog-bytes"):
        assert flag in help_run.stdout
    async with stack() as (_fake, relay, feed):
        assert feed.startswith("ws://127.0.0.1:") and not feed.endswith(":0")
        async with connected(feed) as client:
            assert await client.recv_type("status")
        taken = subprocess.run(
            [sys.executable, str(ROOT / "market_data_server.py"), "--port",
             feed.rsplit(":", 1)[1]], capture_output=True, text=True, timeout=30, check=False)
        assert taken.returncode == 1 and taken.stdout == ""
        assert "cannot listen on 127.0.0.1" in taken.stderr
        assert await stop_process(relay.proc) == 0


async def test_snapshot_plus_updates_reproduce_the_book_at_each_depth() -> None:
    async with stack() as (fake, _relay, feed):
        rng = random.Random(1)
        await fake.random_flow(rng, 200)
        depths = (1, 3, 10, 1000)
        async with contextlib.AsyncExitStack() as exits:
            clients = [await exits.enter_async_context(connected(feed)) for _ in depths]
            default = await exits.enter_async_context(connected(feed))  # never subscribes
            for client, depth in zip(clients, depths, strict=True):
                ack = await subscribe(client, channels=["book", "leaderboard"], depth=depth)
                assert ack["depth"] == depth and ack["channels"] == ["book", "leaderboard"]
            await fake.random_flow(rng, 800)
            marker = await fake.leaderboard()
            for client, depth in [*zip(clients, depths, strict=True), (default, 10)]:
                mirror = BookMirror()
                messages = await collect_until(client, is_leaderboard(marker))
                apply_all(mirror, messages)
                for symbol in SYMBOLS:
                    assert mirror.view(symbol) == fake.depth(symbol, depth), (depth, symbol)
            kinds = {m["type"] for m in messages}  # the default client's view
            assert {"status", "book_snapshot", "book_update", "trade", "leaderboard"} <= kinds
            assert "order_event" not in kinds and "orders_snapshot" not in kinds


async def test_channel_and_symbol_filters() -> None:
    async with stack() as (fake, _relay, feed), connected(feed) as trades, \
            connected(feed) as book, connected(feed) as board:
        await subscribe(trades, channels=["trades"], symbols=["ALT"])
        await subscribe(book, channels=["book"], symbols=["SIM"], depth=5)
        await subscribe(board, channels=["leaderboard"])
        await fake.random_flow(random.Random(2), 600)
        marker = await fake.leaderboard()
        board_msgs = await collect_until(board, is_leaderboard(marker))
        assert {m["type"] for m in board_msgs} <= {"status", "subscribed", "leaderboard"}
        assert board_msgs[-1]["rows"] and set(board_msgs[-1]["rows"][0]) == {
            "trader_id", "position", "cash", "realized_pnl", "equity"}
        # the relay has handled every event: a ping now comes after all of them
        got_trades = [m for m in await until_pong(trades) if m["type"] == "trade"]
        expected = [public_trade(e) for e in fake.sent
                    if e["type"] == "trade" and e["symbol"] == "ALT"]
        assert expected and got_trades == expected
        book_msgs = await until_pong(book)
        assert {m["type"] for m in book_msgs} <= {"status", "book_snapshot", "book_update",
                                                  "pong"}
        assert {m["symbol"] for m in book_msgs if "symbol" in m} == {"SIM"}
        mirror = BookMirror()
        apply_all(mirror, book_msgs)
        assert mirror.view("SIM") == fake.depth("SIM", 5)


async def test_batch_frames_carry_the_same_messages_in_order() -> None:
    async with stack() as (fake, _relay, feed):
        await fake.random_flow(random.Random(3), 100)
        async with connected(feed) as single, connected(feed) as batched:
            await subscribe(single, channels=ALL_CHANNELS, depth=4)
            ack_frame = await subscribe(batched, channels=ALL_CHANNELS, depth=4, batch=True)
            assert isinstance(ack_frame, list) and len(ack_frame) > 1  # ack + snapshots
            await fake.random_flow(random.Random(4), 500)
            marker = await fake.leaderboard()
            frames: list[Any] = [ack_frame]
            while not any(is_leaderboard(marker)(m) for m in messages_of(frames[-1])):
                frames.append(await batched.recv())
            assert all(isinstance(frame, list) and frame for frame in frames)
            batched_msgs = [m for frame in frames for m in frame]
            single_msgs = await collect_until(single, is_leaderboard(marker))
            assert batched_msgs[0]["type"] == "subscribed" and batched_msgs[0]["batch"] is True
            assert batched_msgs[1:] == single_msgs


async def test_orders_channel_is_l3_without_trader_ids() -> None:
    async with stack() as (fake, _relay, feed):
        rng = random.Random(6)
        await fake.random_flow(rng, 300)
        async with connected(feed) as client:
            await subscribe(client, channels=["orders", "leaderboard"], symbols=["SIM"])
            await fake.random_flow(rng, 600)
            marker = await fake.leaderboard()
            messages = await collect_until(client, is_leaderboard(marker))
            first = next(m for m in messages if m["type"] in ("orders_snapshot", "order_event"))
            assert first["type"] == "orders_snapshot" and first["bids"] and first["asks"]
            mirror = OrdersMirror()
            apply_all(mirror, messages)  # asserts no trader id leaks into an order_event
            assert mirror.view("SIM") == fake.l3("SIM")
            assert {m["symbol"] for m in messages if "symbol" in m} == {"SIM"}


async def test_bad_input_gets_a_clear_error_and_the_connection_keeps_working() -> None:
    cases: list[tuple[str | bytes, str, str]] = [
        ("not json", "BAD_JSON", "not valid JSON"),
        ("[1, 2]", "BAD_JSON", "must be a JSON object"),
        (b'{"type": "ping"}', "BAD_JSON", "binary frames"),
        ('{"no_type": 1}', "UNKNOWN_TYPE", "'type' is required"),
        ('{"type": "new_order"}', "UNKNOWN_TYPE", "unknown message type 'new_order'"),
        ('{"type": "subscribe", "depth": 0}', "INVALID_FIELD", "'depth'"),
        ('{"type": "subscribe", "channels": ["news"]}', "INVALID_FIELD", "'channels'"),
        ('{"type": "subscribe", "symbols": "SIM"}', "INVALID_FIELD", "'symbols'"),
        ('{"type": "subscribe", "batch": "yes"}', "INVALID_FIELD", "'batch'"),
        ('{"type": "subscribe", "symbols": ["XYZ"]}', "UNKNOWN_SYMBOL", "'symbols'"),
    ]
    async with stack() as (fake, _relay, feed), connected(feed) as client:
        await client.recv_until(lambda m: m == {"type": "status", "exchange": "online"})
        for frame, code, fragment in cases:
            await client.send(frame)
            error = await client.recv_type("error")
            assert error["code"] == code and fragment in error["message"], (frame, error)
        await client.send({"type": "ping"})
        assert await client.recv_type("pong") == {"type": "pong"}
        ack = await subscribe(client, channels=["book"], symbols=["SIM"], depth=2)
        assert ack == {"type": "subscribed", "channels": ["book"], "symbols": ["SIM"],
                       "all_symbols": False, "depth": 2, "batch": False}
        snapshot = await client.recv_type("book_snapshot")
        assert snapshot["symbol"] == "SIM" and snapshot["seq"] == fake.seq


async def slow_client(feed: str) -> Any:
    """A client that will stop reading: tiny kernel receive buffer, one-frame queue."""
    host, port = feed.removeprefix("ws://").rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    return connect(feed, sock=sock, max_queue=1, compression=None)


async def test_slow_subscriber_is_resynchronised_while_a_fast_one_gets_everything() -> None:
    async with stack("--max-backlog-bytes", "65536", "--sndbuf-bytes", "16384") as (
            fake, relay, feed):
        rng = random.Random(8)
        await fake.random_flow(rng, 100)
        async with await slow_client(feed) as slow_ws, connected(feed) as fast:
            slow = Client(slow_ws)
            await subscribe(slow, channels=ALL_CHANNELS, depth=20)
            await subscribe(fast, channels=ALL_CHANNELS, depth=20)
            # the fast client reads as the stream flows; the slow one reads nothing
            fast_reader = asyncio.create_task(collect_until(
                fast, lambda m: m.get("type") == "leaderboard", timeout=60))
            await fake.random_flow(rng, 1500)
            marker = await fake.leaderboard()
            fast_msgs = await fast_reader
            assert is_leaderboard(marker)(fast_msgs[-1])
            snapshots = [m for m in fast_msgs if m["type"] == "book_snapshot"]
            assert len(snapshots) == 2  # the subscribe's, one per symbol: never resynced
            assert [m for m in fast_msgs if m["type"] == "trade"] == [
                public_trade(e) for e in fake.sent
                if e["type"] == "trade" and e["seq"] > snapshots[0]["seq"]]
            fast_books, fast_orders = BookMirror(), OrdersMirror()
            apply_all(fast_books, fast_msgs)
            apply_all(fast_orders, fast_msgs)
            slow_msgs = await collect_until(slow, is_leaderboard(marker), timeout=30)
            slow_books, slow_orders = BookMirror(), OrdersMirror()
            apply_all(slow_books, slow_msgs)
            apply_all(slow_orders, slow_msgs)
            assert slow_books.snapshots["SIM"] >= 2  # the subscribe's, then resyncs
            for symbol in SYMBOLS:
                truth = fake.depth(symbol, 20)
                assert fast_books.view(symbol) == truth and slow_books.view(symbol) == truth
                l3 = fake.l3(symbol)
                assert fast_orders.view(symbol) == l3 and slow_orders.view(symbol) == l3
        assert "resynchronising with fresh snapshots" in relay.stderr_text


async def test_a_subscriber_that_never_reads_is_closed_with_a_reason() -> None:
    """Resynchronising a peer that reads nothing only repeats itself: after three resyncs
    in a row (``--stall-timeout 0``: however quickly) it is closed with 1008 and a
    reason, while a subscriber that reads keeps everything."""
    async with stack("--max-backlog-bytes", "16384", "--sndbuf-bytes", "16384",
                     "--stall-timeout", "0") as (fake, relay, feed):
        rng = random.Random(10)
        async with await slow_client(feed) as slow_ws, connected(feed) as fast:
            slow = Client(slow_ws)
            await subscribe(slow, channels=ALL_CHANNELS, depth=20)
            await subscribe(fast, channels=ALL_CHANNELS, depth=20)
            fast_msgs: list[dict[str, Any]] = []
            for _ in range(200):  # until the relay gives up on the slow one
                # small bursts, each read to its end by the fast one: on a loaded machine
                # a reader descheduled for a long burst would fall behind for real
                await fake.random_flow(rng, 40)
                marker = await fake.leaderboard()
                fast_msgs += await collect_until(fast, is_leaderboard(marker), timeout=30)
                if "closing subscriber" in relay.stderr_text:
                    break
            assert "closing subscriber" in relay.stderr_text
            assert len([m for m in fast_msgs if m["type"] == "book_snapshot"]) == 2
            with pytest.raises(ConnectionClosed) as closed:
                while True:  # what was sent before the close, then the close itself
                    await slow.recv(timeout=10)
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (
                1008, "too slow: not reading the feed")
        assert "resynchronised 3 times" in relay.stderr_text


async def test_exchange_loss_sends_offline_then_resyncs_when_it_returns() -> None:
    async with stack() as (fake, _relay, feed), connected(feed) as client:
        rng = random.Random(9)
        await fake.random_flow(rng, 200)
        mirror = BookMirror()
        apply_all(mirror, await collect_until(
            client, lambda m: m == {"type": "status", "exchange": "online"}))
        port = fake.port
        await fake.stop()
        apply_all(mirror, await collect_until(
            client, lambda m: m == {"type": "status", "exchange": "offline"}))
        await fake.random_flow(rng, 200)  # the book moves on while the relay is cut off
        await fake.start(port)
        resync = await collect_until(client, lambda m: m.get("type") == "status", timeout=15)
        assert resync[-1] == {"type": "status", "exchange": "online"}
        snapshots = [m for m in resync if m["type"] == "book_snapshot"]
        assert sorted(m["symbol"] for m in snapshots) == sorted(SYMBOLS)
        assert all(m["seq"] == fake.seq for m in snapshots)
        apply_all(mirror, resync)
        await fake.random_flow(rng, 200)
        marker = await fake.leaderboard()
        apply_all(mirror, await collect_until(client, is_leaderboard(marker)))
        for symbol in SYMBOLS:
            assert mirror.view(symbol) == fake.depth(symbol, 10)


async def test_sequence_gap_reconnects_for_a_fresh_snapshot_without_going_offline() -> None:
    async with stack() as (fake, _relay, feed), connected(feed) as client:
        rng = random.Random(10)
        messages = await collect_until(
            client, lambda m: m == {"type": "status", "exchange": "online"})
        await fake.random_flow(rng, 100)
        fake.lose_one_event()
        lost = fake.seq
        await fake.random_flow(rng, 20)
        messages += await collect_until(
            client, lambda m: m.get("type") == "book_snapshot" and m["seq"] > lost)
        assert fake.connects == 2
        await fake.random_flow(rng, 100)
        marker = await fake.leaderboard()
        messages += await collect_until(client, is_leaderboard(marker))
        assert [m for m in messages if m["type"] == "status"][-1]["exchange"] == "online"
        mirror = BookMirror()
        apply_all(mirror, messages)
        for symbol in SYMBOLS:
            assert mirror.view(symbol) == fake.depth(symbol, 10)


async def test_relay_started_before_the_exchange_waits_offline_then_syncs() -> None:
    fake = FakeExchange()
    port = int((await fake.start()).rsplit(":", 1)[1])
    await fake.stop()  # a port that was free a moment ago; nobody listens there now
    async with running_relay(f"ws://127.0.0.1:{port}") as relay, \
            connected(relay.uris["feed"]) as client:
        assert await client.recv() == {"type": "status", "exchange": "offline"}
        await client.send({"type": "ping"})
        assert await client.recv() == {"type": "pong"}  # no stale books in between
        await fake.start(port)
        try:
            messages = await collect_until(client, lambda m: m.get("type") == "status",
                                           timeout=15)
        finally:
            await fake.stop()
        assert [m["type"] for m in messages] == ["book_snapshot", "book_snapshot", "status"]
        assert messages[-1]["exchange"] == "online"
