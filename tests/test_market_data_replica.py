"""The relay's bookkeeping in-process: replicas, depth-limited updates, the L3 channel,
subscribe validation and stream checks, fed by the fake exchange's real engine events."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.protocol import State

from market_data_server import (
    MAX_UNREAD_RESYNCS,
    BadStream,
    Relay,
    SequenceGap,
    SideBook,
    Subscriber,
    View,
    batched_uri,
    parse_subscribe,
)
from models import ProtocolError, Side
from tests.test_market_data_fake import SYMBOLS, BookMirror, FakeExchange, OrdersMirror


class Recorder:
    """Stands in for a feed connection: ``messages`` is everything the relay has queued
    for a subscriber with ``view`` so far (taken from it as a writer would)."""

    def __init__(self, relay: Relay, view: View) -> None:
        self.sub = Subscriber(StubConnection(), relay, relay.max_backlog)  # type: ignore[arg-type]
        self.sub.view = view
        relay.add(self.sub)
        self._messages: list[dict[str, Any]] = []

    @property
    def messages(self) -> list[dict[str, Any]]:
        self._messages.extend(orjson.loads(m) for m in self.sub.take_pending())
        return self._messages


def wire(fake: FakeExchange, relay: Relay) -> None:
    """Stream the fake's events straight into the relay, no sockets in between."""
    async def deliver(message: dict[str, Any]) -> None:
        relay.on_event(message)
    fake._broadcast = deliver  # type: ignore[method-assign]


DEPTHS = (1, 2, 3, 7, 10, 1000)


async def test_every_depth_view_tracks_the_engine_after_every_command() -> None:
    fake, relay = FakeExchange(), Relay()
    rng = random.Random(11)
    await fake.random_flow(rng, 150)  # a book exists before the relay starts
    relay.on_snapshot(fake.snapshot())
    wire(fake, relay)
    recorders = {d: Recorder(relay, View(channels=frozenset({"book"}), depth=d))
                 for d in DEPTHS}
    mirrors = {d: BookMirror() for d in DEPTHS}
    for _ in range(1200):
        await fake.random_flow(rng, 1)
        for depth, recorder in recorders.items():
            for msg in recorder.messages:
                mirrors[depth].apply(msg)
            recorder.messages.clear()
            for symbol in SYMBOLS:
                assert mirrors[depth].view(symbol) == fake.depth(symbol, depth), (depth, symbol)
    assert all(mirror.snapshots == dict.fromkeys(SYMBOLS, 1) for mirror in mirrors.values())


async def test_updates_only_name_levels_inside_the_view() -> None:
    fake, relay = FakeExchange(), Relay()
    relay.on_snapshot(fake.snapshot())
    wire(fake, relay)
    recorder = Recorder(relay, View(channels=frozenset({"book"}), symbols=frozenset({"SIM"}),
                                    depth=2))
    for price in (9990, 9991, 9992):
        await fake.process(fake.limit("alice", "SIM", Side.BUY, price, 5))
    await fake.process(fake.limit("bob", "SIM", Side.BUY, 9980, 5))  # below the view
    await fake.process(fake.limit("bob", "ALT", Side.BUY, 4990, 5))  # another symbol
    updates = [m for m in recorder.messages if m["type"] == "book_update"]
    assert [(u["bids"], u["asks"]) for u in updates] == [
        ([[9990, 5]], []), ([[9991, 5]], []), ([[9992, 5], [9990, 0]], [])]
    # cancelling the best bid pulls 9990 back into the top 2
    await fake.process(fake.limit("carol", "SIM", Side.SELL, 9992, 5))
    assert recorder.messages[-1]["bids"] == [[9992, 0], [9990, 5]]


async def test_orders_channel_tracks_l3_with_time_priority() -> None:
    fake, relay = FakeExchange(), Relay()
    rng = random.Random(5)
    await fake.random_flow(rng, 200)
    relay.on_snapshot(fake.snapshot())
    wire(fake, relay)
    recorder = Recorder(relay, View(channels=frozenset({"orders"}), symbols=frozenset({"SIM"})))
    await fake.random_flow(rng, 800)
    mirror = OrdersMirror()
    for msg in recorder.messages:
        assert msg["type"] in ("status", "orders_snapshot", "order_event"), msg
        assert msg.get("symbol", "SIM") == "SIM"
        mirror.apply(msg)
    events = {m["event"] for m in recorder.messages if m["type"] == "order_event"}
    assert events == {"add", "cancel", "execute", "amend"}
    assert mirror.view("SIM") == fake.l3("SIM")


async def test_sequence_gap_and_bad_stream_are_detected() -> None:
    fake, relay = FakeExchange(), Relay()
    relay.on_snapshot(fake.snapshot())
    wire(fake, relay)
    await fake.process(fake.limit("alice", "SIM", Side.BUY, 9990, 5))
    fake.lose_one_event()
    with pytest.raises(SequenceGap, match="expected seq 3, got 4"):
        await fake.process(fake.limit("alice", "SIM", Side.BUY, 9991, 5))
    with pytest.raises(BadStream, match="expected a snapshot"):
        Relay().on_snapshot({"type": "trade", "seq": 1})
    relay = Relay()
    relay.on_snapshot(fake.snapshot())
    with pytest.raises(BadStream, match="'NOPE' not in the snapshot"):
        relay.on_event({"type": "book_changed", "seq": fake.seq + 1, "symbol": "NOPE",
                        "action": "add", "order_id": 99, "side": "buy", "price": 1,
                        "order_qty": 1, "level_qty": 1})


@pytest.mark.parametrize(("message", "code", "fragment"), [
    ({"channels": "book"}, "INVALID_FIELD", "'channels' must be a list"),
    ({"channels": ["book", "news"]}, "INVALID_FIELD", "'channels' has unknown channel 'news'"),
    ({"symbols": "SIM"}, "INVALID_FIELD", "'symbols' must be a list"),
    ({"symbols": [""]}, "INVALID_FIELD", "'symbols' must be a list"),
    ({"symbols": ["XYZ"]}, "UNKNOWN_SYMBOL", "'symbols' has unknown symbol 'XYZ'"),
    ({"depth": 0}, "INVALID_FIELD", "'depth' must be an integer from 1 to 1000"),
    ({"depth": 1001}, "INVALID_FIELD", "'depth' must be an integer"),
    ({"depth": "5"}, "INVALID_FIELD", "'depth' must be an integer"),
    ({"depth": True}, "INVALID_FIELD", "'depth' must be an integer"),
    ({"batch": 1}, "INVALID_FIELD", "'batch' must be true or false"),
    ({"chanels": ["book"]}, "INVALID_FIELD", "'chanels' is not a subscribe field"),
])
def test_parse_subscribe_names_the_bad_field(message: dict[str, Any], code: str,
                                             fragment: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_subscribe({"type": "subscribe", **message}, ["SIM", "ALT"])
    assert caught.value.code.value == code
    assert fragment in caught.value.message


def test_parse_subscribe_defaults_and_full_form() -> None:
    assert parse_subscribe({"type": "subscribe"}, None) == View()
    view = parse_subscribe({"type": "subscribe", "channels": ["orders", "book"],
                            "symbols": ["ALT"], "depth": 3, "batch": True}, ["SIM", "ALT"])
    assert view == View(frozenset({"orders", "book"}), frozenset({"ALT"}), 3, True)
    assert "orders" not in View().channels


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(0, 3)), max_size=80),
       st.integers(1, 8), st.booleans())
def test_side_book_visible_changes_replay_to_the_top_n(ops: list[tuple[int, int]], depth: int,
                                                       is_bid: bool) -> None:
    """Any sequence of level changes: applying the emitted changes to the first top-N
    reproduces the new top-N (a brute-force check of visible_change)."""
    side = SideBook(is_bid)
    view: dict[int, int] = {}
    for price, qty in ops:
        result = side.set_level(price, qty)
        if result is not None:
            for p, q in side.visible_change(result[0], result[1], price, qty, depth):
                if q:
                    view[p] = q
                else:
                    del view[p]
        assert sorted(view.items(), reverse=is_bid) == [tuple(lv) for lv in side.top(depth)]


class StubConnection:
    """Enough of a server connection for a Subscriber whose writer never runs."""

    remote_address = ("127.0.0.1", 1)
    paused = True  # a peer that never reads: its socket stays full

    def __init__(self) -> None:
        self.closed_with: tuple[int, str] | None = None

    async def close(self, code: int, reason: str) -> None:
        self.closed_with = (code, reason)


def stub_subscriber(relay: Relay) -> tuple[Subscriber, StubConnection]:
    ws = StubConnection()
    sub = Subscriber(ws, relay, relay.max_backlog)  # type: ignore[arg-type]
    relay.add(sub)
    return sub, ws


def queued_types(sub: Subscriber) -> list[str]:
    return [orjson.loads(m)["type"] for m in sub.pending()]


async def test_a_subscriber_over_its_limit_is_resynced_consistently_even_mid_event() -> None:
    """A reader that drains its backlog only now and then: whatever it finds, resync
    snapshots included, must rebuild the exact book (L2 and L3) every time."""
    fake, relay = FakeExchange(), Relay(max_backlog=1500)
    rng = random.Random(12)
    await fake.random_flow(rng, 100)
    relay.on_snapshot(fake.snapshot())
    wire(fake, relay)
    sub, _ws = stub_subscriber(relay)
    relay.on_client_message(sub, orjson.dumps({"type": "subscribe", "channels": [
        "book", "trades", "orders"], "depth": 5}).decode())
    books, orders = BookMirror(), OrdersMirror()
    for round_ in range(120):
        await fake.random_flow(rng, rng.randint(1, 15))
        for data in sub.take_pending():
            msg = orjson.loads(data)
            books.apply(msg)
            orders.apply(msg)
        for symbol in SYMBOLS:
            assert books.view(symbol) == fake.depth(symbol, 5), round_
            assert orders.view(symbol) == fake.l3(symbol), round_
    assert sub.resyncs >= 5


async def test_replies_are_kept_in_order_across_subscribes_and_resyncs() -> None:
    fake, relay = FakeExchange(), Relay(max_backlog=2000)
    relay.on_snapshot(fake.snapshot())
    wire(fake, relay)
    sub, ws = stub_subscriber(relay)
    relay.on_client_message(sub, '{"type": "ping"}')
    relay.on_client_message(sub, '{"type": "subscribe", "symbols": ["SIM"], "depth": 3}')
    relay.on_client_message(sub, '{"type": "nope"}')
    assert queued_types(sub) == ["status", "book_snapshot", "book_snapshot", "pong",
                                 "subscribed", "book_snapshot", "error"]
    await fake.random_flow(random.Random(3), 300)  # nobody reads: resyncs happen
    assert sub.resyncs >= 1 and ws.closed_with is None
    kinds = queued_types(sub)
    assert kinds[:4] == ["pong", "subscribed", "error", "status"]  # replies survived
    assert kinds[4] == "book_snapshot"


async def test_a_peer_that_reads_nothing_at_all_is_closed_with_a_reason() -> None:
    relay = Relay(max_backlog=300)
    relay.on_snapshot(FakeExchange().snapshot())
    sub, ws = stub_subscriber(relay)
    for _ in range(40):  # 40 pongs nobody reads: more than the limit, and all replies
        relay.on_client_message(sub, '{"type": "ping"}')
    await asyncio.gather(*relay._tasks)  # the close runs in a task of its own
    assert ws.closed_with == (1008, "too slow: not reading the feed")
    assert sub.closing and not sub.pending()
    relay.on_client_message(sub, '{"type": "ping"}')
    assert not sub.pending()  # nothing more is queued for a closing subscriber


class SocketTransport:
    """A subscriber's socket as the relay sees it: holds what was written until the
    test reads it, and is full past ``capacity`` bytes."""

    def __init__(self, conn: SocketConnection, capacity: int) -> None:
        self.conn = conn
        self.capacity = capacity
        self.unread = bytearray()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.unread += data
        if len(self.unread) > self.capacity:
            self.conn.paused = True

    def is_closing(self) -> bool:
        return False


class SocketConnection(StubConnection):
    """A connection whose frames the test reads itself, a frame at a time."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.transport = SocketTransport(self, capacity)
        self.protocol = type("OpenProtocol", (), {"state": State.OPEN})()
        self.paused = False

    def read_frames(self) -> list[Any]:
        """Parse and consume every frame written so far (unmasked text frames)."""
        data, frames, at = self.transport.unread, [], 0
        while at < len(data):
            assert data[at] == 0x81, "a final text frame"
            size, at = data[at + 1], at + 2
            if size == 126:
                size, at = int.from_bytes(data[at:at + 2], "big"), at + 2
            elif size == 127:
                size, at = int.from_bytes(data[at:at + 8], "big"), at + 8
            frames.append(orjson.loads(bytes(data[at:at + size])))
            at += size
        data.clear()
        self.paused = False
        return frames


def flush_all(relay: Relay) -> None:
    for feed in list(relay.feeds.values()):
        feed.flush()


def socket_subscriber(relay: Relay, view: View, capacity: int = 1 << 30
                      ) -> tuple[Subscriber, SocketConnection]:
    ws = SocketConnection(capacity)
    sub = Subscriber(ws, relay, relay.max_backlog)  # type: ignore[arg-type]
    sub.view = view
    sub.attached = True  # flushes write to it; the test flushes and reads by itself
    relay.add(sub)
    return sub, ws


async def test_subscribers_sharing_a_view_get_what_each_would_get_alone() -> None:
    """Many subscribers of one view share one log and, where they stand at the same
    place, the same frame bytes; each, reading at its own pace, must still get exactly
    the messages a lone subscriber gets, in the same order, in one frame per message or
    in arrays, and rebuild the books from them."""
    fake, alone_relay, shared_relay = FakeExchange(), Relay(), Relay()
    rng = random.Random(21)
    await fake.random_flow(rng, 100)
    for relay in (alone_relay, shared_relay):
        relay.on_snapshot(fake.snapshot())

    async def deliver(message: dict[str, Any]) -> None:
        alone_relay.on_event(message)
        shared_relay.on_event(message)
    fake._broadcast = deliver  # type: ignore[method-assign]
    channels = frozenset({"book", "trades", "orders", "leaderboard"})
    views = [View(channels, depth=5), View(channels, depth=5, batch=True)]
    alone = {view: socket_subscriber(alone_relay, view)[1] for view in views}
    # (view, socket capacity, reads every n-th round): two fast ones, a small socket,
    # sluggish ones
    paces = [(view, capacity, every) for view in views for capacity, every in (
        (1 << 30, 1), (1 << 30, 1), (600, 1), (1 << 30, 3), (2000, 4))]
    shared = [(socket_subscriber(shared_relay, view, capacity), every)
              for view, capacity, every in paces]
    got: dict[int, list[Any]] = {i: [] for i in range(len(shared))}
    expected: dict[View, list[Any]] = {view: [] for view in views}
    for round_ in range(1, 151):
        await fake.random_flow(rng, rng.randint(1, 8))
        if round_ % 50 == 0:
            await fake.leaderboard()
        for relay in (alone_relay, shared_relay):
            flush_all(relay)
        for view, ws in alone.items():
            expected[view] += ws.read_frames()
        for i, ((_sub, ws), every) in enumerate(shared):
            if round_ % every == 0:
                got[i] += ws.read_frames()
    while any(sub.pending() for (sub, _ws), _ in shared):  # let everyone catch up
        flush_all(shared_relay)
        for i, ((_sub, ws), _) in enumerate(shared):
            got[i] += ws.read_frames()
    assert shared_relay.feeds.keys() == set(views)  # one log per distinct view
    assert all(not feed.log for feed in shared_relay.feeds.values())  # trimmed when read
    for i, ((sub, _ws), _) in enumerate(shared):
        assert sub.resyncs == 0
        view = sub.view
        if view.batch:
            assert all(isinstance(frame, list) and frame for frame in got[i])
            messages = [m for frame in got[i] for m in frame]
            assert messages == [m for frame in expected[view] for m in frame], i
        else:
            assert all(isinstance(frame, dict) for frame in got[i])
            messages = got[i]
            assert messages == expected[view], i
        books, orders = BookMirror(), OrdersMirror()
        for msg in messages:
            books.apply(msg)
            orders.apply(msg)
        for symbol in SYMBOLS:
            assert books.view(symbol) == fake.depth(symbol, 5), (i, symbol)
            assert orders.view(symbol) == fake.l3(symbol), (i, symbol)
    # subscribers at the same place were written the very same bytes, framed once
    for first, second in ((0, 1), (5, 6)):
        writes = [shared[i][0][1].transport.writes for i in (first, second)]
        assert writes[0][0] == writes[1][0]  # their fresh start: framed for each
        assert len(writes[0]) > 50 and all(
            a is b for a, b in zip(writes[0][1:], writes[1][1:], strict=True))
    # a batch reader with a small socket that reads now and then catches up in fewer,
    # larger frames than a fast one
    assert paces[9][0].batch and paces[5][0].batch and len(got[9]) < len(got[5])


async def test_a_peer_that_never_reads_is_closed_after_repeated_resyncs() -> None:
    """Resynchronising a subscriber that reads nothing at all only repeats itself: after
    MAX_UNREAD_RESYNCS in a row (over the stall timeout, here 0 s) it is closed with a
    reason, while one that reads between resyncs is never closed for falling behind."""
    fake, relay = FakeExchange(), Relay(max_backlog=2000, unread_timeout=0.0)
    relay.on_snapshot(fake.snapshot())
    wire(fake, relay)
    stalled, stalled_ws = stub_subscriber(relay)
    reader, reader_ws = stub_subscriber(relay)
    rng = random.Random(31)
    for round_ in range(1, 401):
        await fake.random_flow(rng, 5)
        if round_ % 4 == 0:
            reader.take_pending()  # reads only now and then: it falls behind and resyncs
        if stalled.closing:
            break
    await asyncio.gather(*relay._tasks)  # the close runs in a task of its own
    assert stalled_ws.closed_with == (1008, "too slow: not reading the feed")
    assert stalled.resyncs == MAX_UNREAD_RESYNCS and not stalled.pending()
    assert stalled not in relay.feeds[View()].subs  # no longer holds the shared log
    for round_ in range(1, 61):
        await fake.random_flow(rng, 5)
        if round_ % 4 == 0:
            reader.take_pending()
    assert reader.resyncs > MAX_UNREAD_RESYNCS and reader_ws.closed_with is None


async def test_a_peer_whose_socket_has_room_is_not_closed_for_resyncs_in_a_burst() -> None:
    """Resyncs that come before the relay could write anything (within one burst) say
    nothing about the peer: while its socket has room, it is not 'not reading'."""
    fake, relay = FakeExchange(), Relay(max_backlog=2000, unread_timeout=0.0)
    relay.on_snapshot(fake.snapshot())
    wire(fake, relay)
    sub, ws = stub_subscriber(relay)
    ws.paused = False  # type: ignore[misc]
    await fake.random_flow(random.Random(33), 600)
    assert sub.resyncs > MAX_UNREAD_RESYNCS and ws.closed_with is None


async def test_a_stalled_peer_is_kept_until_the_stall_timeout() -> None:
    fake, relay = FakeExchange(), Relay(max_backlog=2000, unread_timeout=3600.0)
    relay.on_snapshot(fake.snapshot())
    wire(fake, relay)
    sub, ws = stub_subscriber(relay)
    await fake.random_flow(random.Random(32), 600)
    assert sub.resyncs > MAX_UNREAD_RESYNCS and ws.closed_with is None
    assert sub.backlog_bytes <= sub.threshold  # resynced, so still bounded


@pytest.mark.parametrize(("uri", "expected"), [
    ("ws://127.0.0.1:9002", "ws://127.0.0.1:9002/?batch=1"),
    ("ws://h:1/stream?x=2", "ws://h:1/stream?x=2&batch=1"),
    ("ws://h:1/?batch=0", "ws://h:1/?batch=0"),  # the user's choice stands
])
def test_batched_uri_asks_for_the_batched_stream_unless_told(uri: str, expected: str) -> None:
    assert batched_uri(uri) == expected
