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

from market_data_server import (
    BadStream,
    Relay,
    SequenceGap,
    SideBook,
    Subscriber,
    View,
    parse_subscribe,
)
from models import ProtocolError, Side
from tests.test_market_data_fake import SYMBOLS, BookMirror, FakeExchange, OrdersMirror


class Recorder:
    """Stands in for a feed connection: records what the relay queues for it."""

    def __init__(self, view: View) -> None:
        self.view = view
        self.name = "recorder"
        self.messages: list[dict[str, Any]] = []

    def push(self, data: bytes) -> None:
        self.messages.append(orjson.loads(data))

    def push_sync(self, messages: list[bytes]) -> None:
        self.messages.extend(orjson.loads(m) for m in messages)


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
    recorders = {d: Recorder(View(channels=frozenset({"book"}), depth=d)) for d in DEPTHS}
    for recorder in recorders.values():
        relay.add(recorder)  # type: ignore[arg-type]
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
    recorder = Recorder(View(channels=frozenset({"book"}), symbols=frozenset({"SIM"}), depth=2))
    relay.add(recorder)  # type: ignore[arg-type]
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
    recorder = Recorder(View(channels=frozenset({"orders"}), symbols=frozenset({"SIM"})))
    relay.add(recorder)  # type: ignore[arg-type]
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
    return [orjson.loads(m)["type"] for m in sub.backlog]


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
        for data in sub.backlog:
            msg = orjson.loads(data)
            books.apply(msg)
            orders.apply(msg)
        sub.backlog.clear()
        sub.backlog_bytes = 0
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
    assert sub.closing and not sub.backlog
    relay.on_client_message(sub, '{"type": "ping"}')
    assert not sub.backlog  # nothing more is queued for a closing subscriber
