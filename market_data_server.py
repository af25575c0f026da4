"""The public market-data relay: follows the exchange's internal event stream, keeps its
own L2 and L3 replica of every book, and fans the public feed out to any number of
read-only subscribers (see ../shared/PROTOCOL.md, "Market data feed").

Design, for speed and for isolation (see ../shared/PERFORMANCE_NOTES.md):

- One task consumes the exchange stream and does all the bookkeeping synchronously:
  each public message is encoded once and the same ``bytes`` are appended to the
  backlog of every subscriber whose view includes it.
- Each subscriber has its own writer task that drains its backlog (one frame per
  message, or one JSON array per frame with ``"batch": true``), many frames per socket
  write. A writer blocked on a full socket never blocks the consumer; when a backlog
  passes its byte limit it is dropped (replies the client asked for are kept) and
  replaced by fresh snapshots, so a slow subscriber skips ahead but never silently
  misses an update. A peer that reads nothing at all is closed with 1008 "too slow".
- On a sequence gap, a malformed stream or a lost connection the relay reconnects,
  which yields a fresh exchange snapshot, and resynchronises every subscriber.

Beyond PROTOCOL.md the feed sends two messages: ``subscribed`` (the effective view,
in reply to ``subscribe``) and ``orders_snapshot`` (the L3 picture of one book, before
any ``order_event`` of that symbol).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
import sys
import time
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from websockets.asyncio.client import connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.protocol import Protocol, State

from launcher import stop_on_signals
from models import ProtocolError, RejectCode

logger = logging.getLogger("market_data")

DEFAULT_EXCHANGE_URI = "ws://127.0.0.1:9002"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9010
DEFAULT_DEPTH = 10
MAX_DEPTH = 1000
CHANNELS = ("book", "trades", "leaderboard", "orders")
DEFAULT_CHANNELS = frozenset({"book", "trades", "leaderboard"})
SUBSCRIBE_FIELDS = ("type", "channels", "symbols", "depth", "batch")
MAX_SYMBOL_LEN = 32
DEFAULT_MAX_BACKLOG_BYTES = 1 << 20
MAX_BATCH_BYTES = 256 * 1024  # well under a client's default 1 MiB max_size
SUBSCRIBER_MAX_MESSAGE = 64 * 1024  # subscribers only ever send subscribe and ping
SUBSCRIBER_WRITE_LIMIT = 128 * 1024
# Replies a client asked for survive a resync; the rest of a dropped backlog is data
# that the resync's snapshots supersede.
CONTROL_PREFIXES = (b'{"type":"pong"', b'{"type":"error"', b'{"type":"subscribed"')
TOO_SLOW = (1008, "too slow: not reading the feed")
# Left to autotuning, a stalled subscriber's kernel send buffer grows to megabytes
# before the relay notices anything; a fixed one bounds that memory and makes the
# lag visible in the relay's own backlog. Loopback needs little to run at full speed.
DEFAULT_SNDBUF_BYTES = 256 * 1024
BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 2.0
GAP_RETRY_WINDOW_S = 5.0  # a second gap this soon after the last one waits like a loss
OPEN_TIMEOUT_S = 5.0

# What a level change did to one side's price ladder.
UPDATED, INSERTED, REMOVED = 0, 1, 2


class BadStream(Exception):
    """The exchange stream broke its contract (malformed or unexpected message)."""


class SequenceGap(BadStream):
    """An event's ``seq`` is not the next one: something was lost in between."""


# ================================================================ book replica


class SideBook:
    """One side of a replicated book: L2 totals, L3 queues, and the prices in rank order
    (rank 0 is the best) so depth-limited views can be maintained in O(log n)."""

    __slots__ = ("is_bid", "keys", "levels", "queues")

    def __init__(self, is_bid: bool) -> None:
        self.is_bid = is_bid
        self.levels: dict[int, int] = {}  # price -> total qty (the exchange's level_qty)
        self.keys: list[int] = []  # ascending sort keys (-price for bids): best first
        self.queues: dict[int, dict[int, int]] = {}  # price -> {order_id: qty}, FIFO

    def _key(self, price: int) -> int:
        return -price if self.is_bid else price

    def price_at(self, rank: int) -> int:
        key = self.keys[rank]
        return -key if self.is_bid else key

    def set_level(self, price: int, qty: int) -> tuple[int, int] | None:
        """Set a level's total (0 removes it); returns (what happened, its rank)."""
        old = self.levels.get(price)
        key = self._key(price)
        if qty:
            self.levels[price] = qty
            if old is not None:
                return UPDATED, bisect_left(self.keys, key)
            insort(self.keys, key)
            return INSERTED, bisect_left(self.keys, key)
        if old is None:
            return None
        del self.levels[price]
        rank = bisect_left(self.keys, key)
        del self.keys[rank]
        return REMOVED, rank

    def top(self, depth: int) -> list[list[int]]:
        levels = self.levels
        sign = -1 if self.is_bid else 1
        return [[sign * key, levels[sign * key]] for key in self.keys[:depth]]

    def orders(self) -> list[list[int]]:
        """L3: ``[order_id, price, qty]`` best price first, time priority within a price."""
        out = []
        for rank in range(len(self.keys)):
            price = self.price_at(rank)
            out.extend([order_id, price, qty]
                       for order_id, qty in self.queues.get(price, {}).items())
        return out

    def visible_change(self, what: int, rank: int, price: int, qty: int,
                       depth: int) -> list[list[int]]:
        """The levels a top-``depth`` view must change after ``set_level``: the level
        itself, plus the level pushed out of (or pulled into) the view."""
        if rank >= depth:
            return []
        if what == UPDATED:
            return [[price, qty]]
        if what == INSERTED:
            if len(self.keys) > depth:
                return [[price, qty], [self.price_at(depth), 0]]
            return [[price, qty]]
        if len(self.keys) >= depth:
            entered = self.price_at(depth - 1)
            return [[price, 0], [entered, self.levels[entered]]]
        return [[price, 0]]


@dataclass(slots=True)
class LevelChange:
    """What one ``book_changed`` did at L2, kept to derive each depth's update."""

    side: SideBook
    what: int
    rank: int
    price: int
    qty: int


class BookReplica:
    """The relay's copy of one symbol's book, at L3 and L2."""

    def __init__(self, symbol: str) -> None:
        self.symbol = symbol
        self.bids = SideBook(is_bid=True)
        self.asks = SideBook(is_bid=False)
        self.order_prices: dict[int, tuple[SideBook, int]] = {}

    @classmethod
    def from_snapshot(cls, symbol: str, book: dict[str, Any]) -> BookReplica:
        replica = cls(symbol)
        for side, name in ((replica.bids, "bids"), (replica.asks, "asks")):
            totals: dict[int, int] = {}
            for order_id, price, qty in book.get(name, []):
                side.queues.setdefault(price, {})[order_id] = qty
                replica.order_prices[order_id] = (side, price)
                totals[price] = totals.get(price, 0) + qty
            for price, total in totals.items():
                side.set_level(price, total)
        return replica

    def apply(self, event: dict[str, Any]) -> LevelChange | None:
        """Apply one ``book_changed`` event; returns its L2 effect (``None``: none)."""
        side = self.bids if event["side"] == "buy" else self.asks
        price, order_id, order_qty = event["price"], event["order_id"], event["order_qty"]
        if event["action"] == "add":
            self._forget(order_id)  # defensive: an add always starts a fresh queue place
            side.queues.setdefault(price, {})[order_id] = order_qty
            self.order_prices[order_id] = (side, price)
        elif order_qty:
            side.queues.setdefault(price, {})[order_id] = order_qty  # in place: keeps FIFO
        else:
            self._forget(order_id)
        result = side.set_level(price, event["level_qty"])
        if result is None:
            return None
        return LevelChange(side, result[0], result[1], price, event["level_qty"])

    def _forget(self, order_id: int) -> None:
        entry = self.order_prices.pop(order_id, None)
        if entry is None:
            return
        side, price = entry
        queue = side.queues.get(price)
        if queue is not None:
            queue.pop(order_id, None)
            if not queue:
                del side.queues[price]


# ================================================================ subscriptions


@dataclass(frozen=True, slots=True)
class View:
    """What one subscriber asked for."""

    channels: frozenset[str] = DEFAULT_CHANNELS
    symbols: frozenset[str] | None = None  # None: every symbol, present and future
    depth: int = DEFAULT_DEPTH
    batch: bool = False

    def wants(self, symbol: str) -> bool:
        return self.symbols is None or symbol in self.symbols

    def to_message(self, known_symbols: Iterable[str]) -> dict[str, Any]:
        symbols = sorted(self.symbols) if self.symbols is not None else sorted(known_symbols)
        return {"type": "subscribed", "channels": [c for c in CHANNELS if c in self.channels],
                "symbols": symbols, "all_symbols": self.symbols is None,
                "depth": self.depth, "batch": self.batch}


def _invalid(field: str, problem: str) -> ProtocolError:
    return ProtocolError(RejectCode.INVALID_FIELD, f"'{field}' {problem}")


def _parse_channels(value: Any) -> frozenset[str]:
    if value is None:
        return DEFAULT_CHANNELS
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise _invalid("channels", "must be a list of channel names")
    for channel in value:
        if channel not in CHANNELS:
            raise _invalid("channels", f"has unknown channel {channel!r} "
                                       f"(known: {', '.join(CHANNELS)})")
    return frozenset(value)


def _parse_symbols(value: Any, known: Collection[str] | None) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(
            isinstance(s, str) and 0 < len(s) <= MAX_SYMBOL_LEN for s in value):
        raise _invalid("symbols", f"must be a list of symbol names (1-{MAX_SYMBOL_LEN} chars)")
    if known is not None:  # before the first exchange snapshot nothing can be checked
        for symbol in value:
            if symbol not in known:
                raise ProtocolError(RejectCode.UNKNOWN_SYMBOL,
                                    f"'symbols' has unknown symbol {symbol!r} "
                                    f"(known: {', '.join(sorted(known))})")
    return frozenset(value)


def parse_subscribe(msg: dict[str, Any], known_symbols: Collection[str] | None) -> View:
    """Validate a ``subscribe`` message; raises ``ProtocolError`` naming the bad field."""
    for key in msg:
        if key not in SUBSCRIBE_FIELDS:
            raise _invalid(key, "is not a subscribe field (known: "
                                f"{', '.join(SUBSCRIBE_FIELDS[1:])})")
    depth = msg.get("depth")
    if depth is None:
        depth = DEFAULT_DEPTH
    elif type(depth) is not int or not 1 <= depth <= MAX_DEPTH:
        raise _invalid("depth", f"must be an integer from 1 to {MAX_DEPTH}, got {depth!r}")
    batch = msg.get("batch")
    if batch is None:
        batch = False
    elif type(batch) is not bool:
        raise _invalid("batch", f"must be true or false, got {batch!r}")
    return View(_parse_channels(msg.get("channels")),
                _parse_symbols(msg.get("symbols"), known_symbols), depth, batch)


def _error(code: RejectCode, message: str) -> bytes:
    return orjson.dumps({"type": "error", "code": code.value, "message": message})


# ================================================================ subscribers


class Subscriber:
    """One feed connection: its view, its backlog of encoded messages, its writer."""

    def __init__(self, ws: ServerConnection, relay: Relay, max_backlog: int) -> None:
        self.ws = ws
        self.relay = relay
        self.name = "{}:{}".format(*ws.remote_address[:2]) if ws.remote_address else "?"
        self.view = View()
        self.backlog: deque[bytes] = deque()
        self.backlog_bytes = 0
        self.max_backlog = max_backlog
        self.threshold = max_backlog  # raised by the size of the last fresh start
        self.resyncs = 0
        self.lagging = False  # over the limit in mid-event; resynced when the event is done
        self.closing = False  # closed for being too slow: nothing more is queued
        self.wakeup = asyncio.Event()

    def push(self, data: bytes) -> None:
        """Queue one encoded message; past the byte limit, resynchronise instead."""
        if self.lagging or self.closing:
            return  # lagging: the resync due after this event covers this message
        if self.backlog_bytes + len(data) > self.threshold and not self.relay.overflow(self):
            return
        self.backlog.append(data)
        self.backlog_bytes += len(data)
        self.wakeup.set()

    def push_sync(self, messages: list[bytes]) -> None:
        """Queue a fresh start (snapshots) behind whatever is already queued."""
        if self.closing:
            return
        size = sum(map(len, messages))
        self.backlog.extend(messages)
        self.backlog_bytes += size
        self.lagging = False
        # a fresh start does not count against the limit: only live traffic piling up does
        self.threshold = self.max_backlog + size
        self.wakeup.set()
        if self.backlog_bytes > self.threshold:
            self.relay.overflow(self)

    def restart(self, messages: list[bytes]) -> bool:
        """Drop the backlog, except replies the client asked for, and queue ``messages``.
        Returns False when those replies alone are over the limit: the peer is not
        reading at all."""
        kept = [m for m in self.backlog if m.startswith(CONTROL_PREFIXES)]
        if sum(map(len, kept)) > self.max_backlog:
            return False
        self.backlog.clear()
        self.backlog.extend(kept)
        self.backlog_bytes = sum(map(len, kept))
        self.push_sync(messages)
        return True

    async def run_writer(self) -> None:
        """Drain the backlog to the socket until the connection closes.

        Frames are queued in the connection's Sans-I/O protocol and go out in one socket
        write per chunk rather than one per frame: with many subscribers, system calls
        are what fan-out costs (the exchange's Outbound does the same)."""
        ws, backlog = self.ws, self.backlog
        protocol, transport = ws.protocol, ws.transport
        with contextlib.suppress(ConnectionClosed, OSError):  # the peer is gone: done
            while True:
                await self.wakeup.wait()
                self.wakeup.clear()
                while backlog:
                    if self.closing or protocol.state is not State.OPEN \
                            or transport.is_closing():
                        return
                    if self.view.batch:
                        protocol.send_text(self._take_batch())
                    else:
                        self._queue_frames(protocol)
                    transport.write(b"".join(protocol.data_to_send()))
                    # Suspends only while this socket's buffer is over its high-water
                    # mark: exactly when this subscriber's backlog grows, nobody else's.
                    await ws.drain()

    def _queue_frames(self, protocol: Protocol) -> None:
        """One text frame per message, up to MAX_BATCH_BYTES per socket write."""
        backlog = self.backlog
        size = 0
        while backlog and size < MAX_BATCH_BYTES:
            item = backlog.popleft()
            protocol.send_text(item)
            size += len(item)
        self.backlog_bytes -= size

    def _take_batch(self) -> bytes:
        backlog = self.backlog
        parts: list[bytes] = []
        size = 0
        while backlog and (not parts or size + len(backlog[0]) <= MAX_BATCH_BYTES):
            item = backlog.popleft()
            parts.append(item)
            size += len(item)
        self.backlog_bytes -= size
        return b"[" + b",".join(parts) + b"]"


# ================================================================ the relay


class Relay:
    """Replicated books plus fan-out. All methods are synchronous and run on the loop's
    thread, so the state is consistent between any two awaits."""

    def __init__(self, max_backlog: int = DEFAULT_MAX_BACKLOG_BYTES) -> None:
        self.max_backlog = max_backlog
        self.books: dict[str, BookReplica] = {}
        self.symbols: list[str] | None = None  # known after the first exchange snapshot
        self.seq = 0
        self.live = False  # following a current snapshot and its events
        self.snapshots = 0  # exchange snapshots received so far
        self.online = False  # what subscribers were last told
        self.last_leaderboard: bytes | None = None
        self.subscribers: dict[Subscriber, None] = {}
        self._dispatching = False  # inside one exchange event's fan-out
        self._lagging: list[Subscriber] = []
        self._tasks: set[asyncio.Task[None]] = set()  # closes in progress
        self._snapshot_cache: dict[tuple[str, str, int], bytes] = {}
        self._book_index: dict[str, dict[int, list[Subscriber]]] = {}
        self._trade_index: dict[str, list[Subscriber]] = {}
        self._order_index: dict[str, list[Subscriber]] = {}
        self._leaderboard_subs: list[Subscriber] = []
        self._handlers = {"book_changed": self._on_book_changed, "trade": self._on_trade,
                          "leaderboard": self._on_leaderboard}

    # ------------------------------------------------------------ subscribers

    def add(self, sub: Subscriber) -> None:
        self.subscribers[sub] = None
        self._rebuild_index()
        sub.push_sync([self._status_message(), *self._sync_messages(sub.view)])

    def remove(self, sub: Subscriber) -> None:
        self.subscribers.pop(sub, None)
        self._rebuild_index()

    def on_client_message(self, sub: Subscriber, raw: str | bytes) -> None:
        """Handle one frame from a subscriber; anything wrong gets an ``error``."""
        try:
            self._handle_client_message(sub, raw)
        except ProtocolError as exc:
            sub.push(_error(exc.code, exc.message))

    def _handle_client_message(self, sub: Subscriber, raw: str | bytes) -> None:
        if isinstance(raw, bytes):
            raise ProtocolError(RejectCode.BAD_JSON, "binary frames are not accepted; "
                                                     "send JSON text")
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ProtocolError(RejectCode.BAD_JSON, f"not valid JSON: {exc}") from None
        if not isinstance(msg, dict):
            raise ProtocolError(RejectCode.BAD_JSON, "a message must be a JSON object")
        kind = msg.get("type")
        if kind == "ping":
            sub.push(b'{"type":"pong"}')
        elif kind == "subscribe":
            self._subscribe(sub, parse_subscribe(msg, self.symbols))
        elif not isinstance(kind, str):
            raise ProtocolError(RejectCode.UNKNOWN_TYPE, "'type' is required and must be a string")
        else:
            raise ProtocolError(RejectCode.UNKNOWN_TYPE,
                                f"unknown message type {kind!r}: the feed is read-only and "
                                "accepts only subscribe and ping")

    def _subscribe(self, sub: Subscriber, view: View) -> None:
        sub.view = view
        self._rebuild_index()
        # What is queued still goes out (it belongs to the old view, before the ack);
        # the new view starts from its own snapshots.
        ack = orjson.dumps(view.to_message(self.symbols or ()))
        sub.push_sync([ack, *self._sync_messages(view)])
        logger.info("%s subscribed: %s", sub.name, view)

    def overflow(self, sub: Subscriber) -> bool:
        """``sub`` is too far behind. Returns whether the message being pushed should
        still be queued (after a resync done now) or dropped (a resync is deferred)."""
        if self._dispatching:
            # Mid-event, a snapshot now would already contain the event's effect while
            # its remaining messages were still to come: resync once the event is done.
            sub.lagging = True
            self._lagging.append(sub)
            return False
        self._resync_slow(sub)
        return not sub.closing

    def _resync_slow(self, sub: Subscriber) -> None:
        sub.resyncs += 1
        logger.warning("subscriber %s fell %d bytes behind: dropping its backlog and "
                       "resynchronising with fresh snapshots (resync #%d)",
                       sub.name, sub.backlog_bytes, sub.resyncs)
        if not sub.restart([self._status_message(), *self._sync_messages(sub.view)]):
            self._close_slow(sub)

    def _close_slow(self, sub: Subscriber) -> None:
        logger.warning("closing subscriber %s: %s (its unread replies alone pass %d bytes)",
                       sub.name, TOO_SLOW[1], sub.max_backlog)
        sub.closing = True
        sub.backlog.clear()
        task = asyncio.get_running_loop().create_task(sub.ws.close(*TOO_SLOW))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _resync_lagging(self) -> None:
        lagging, self._lagging = self._lagging, []
        for sub in lagging:
            if sub in self.subscribers:
                self._resync_slow(sub)

    def _rebuild_index(self) -> None:
        """Who gets what, precomputed so the per-event fan-out is a list walk."""
        books: dict[str, dict[int, list[Subscriber]]] = {}
        trades: dict[str, list[Subscriber]] = {}
        orders: dict[str, list[Subscriber]] = {}
        leaderboard: list[Subscriber] = []
        for sub in self.subscribers:
            view = sub.view
            for symbol in self.books:
                if not view.wants(symbol):
                    continue
                if "book" in view.channels:
                    books.setdefault(symbol, {}).setdefault(view.depth, []).append(sub)
                if "trades" in view.channels:
                    trades.setdefault(symbol, []).append(sub)
                if "orders" in view.channels:
                    orders.setdefault(symbol, []).append(sub)
            if "leaderboard" in view.channels:
                leaderboard.append(sub)
        self._book_index, self._trade_index, self._order_index = books, trades, orders
        self._leaderboard_subs = leaderboard

    # ------------------------------------------------------------ snapshots

    def _status_message(self) -> bytes:
        return b'{"type":"status","exchange":"online"}' if self.online \
            else b'{"type":"status","exchange":"offline"}'

    def _sync_messages(self, view: View) -> list[bytes]:
        """Everything a subscriber with ``view`` needs to start: snapshots for each
        subscribed book (L2 and/or L3) and the latest leaderboard."""
        if not self.live:
            return []  # stale books are never served; the reconnect resyncs everyone
        out = []
        for symbol in self.books:
            if not view.wants(symbol):
                continue
            if "book" in view.channels:
                out.append(self._book_snapshot(symbol, view.depth))
            if "orders" in view.channels:
                out.append(self._orders_snapshot(symbol))
        if "leaderboard" in view.channels and self.last_leaderboard is not None:
            out.append(self.last_leaderboard)
        return out

    def _book_snapshot(self, symbol: str, depth: int) -> bytes:
        key = (symbol, "book", depth)
        data = self._snapshot_cache.get(key)
        if data is None:
            book = self.books[symbol]
            data = self._snapshot_cache[key] = orjson.dumps({
                "type": "book_snapshot", "symbol": symbol, "seq": self.seq,
                "bids": book.bids.top(depth), "asks": book.asks.top(depth)})
        return data

    def _orders_snapshot(self, symbol: str) -> bytes:
        key = (symbol, "orders", 0)
        data = self._snapshot_cache.get(key)
        if data is None:
            book = self.books[symbol]
            data = self._snapshot_cache[key] = orjson.dumps({
                "type": "orders_snapshot", "symbol": symbol, "seq": self.seq,
                "bids": book.bids.orders(), "asks": book.asks.orders()})
        return data

    # ------------------------------------------------------------ exchange stream

    def on_snapshot(self, msg: dict[str, Any]) -> None:
        """A fresh exchange snapshot: rebuild every replica, resync every subscriber."""
        if msg.get("type") != "snapshot":
            raise BadStream(f"expected a snapshot first, got {msg.get('type')!r}")
        books = msg.get("books") or {}
        symbols = [i["symbol"] for i in msg.get("instruments", [])]
        symbols += [s for s in books if s not in symbols]
        self.books = {s: BookReplica.from_snapshot(s, books.get(s, {})) for s in symbols}
        self.symbols = symbols
        self.seq = msg["seq"]
        self.live = True
        self.snapshots += 1
        self.last_leaderboard = None  # from the previous connection: possibly stale
        self._snapshot_cache.clear()
        self._rebuild_index()
        for sub in self.subscribers:
            sub.push_sync(self._sync_messages(sub.view))
        logger.info("exchange snapshot at seq %d: %s", self.seq,
                    ", ".join(f"{s} {len(b.order_prices)} orders" for s, b in self.books.items()))
        self.set_online()

    def on_event(self, msg: dict[str, Any]) -> None:
        seq = msg["seq"]
        if seq != self.seq + 1:
            raise SequenceGap(f"sequence gap: expected seq {self.seq + 1}, got {seq}")
        self.seq = seq
        if self._snapshot_cache:
            self._snapshot_cache.clear()
        handler = self._handlers.get(msg["type"])
        if handler is None:
            return
        self._dispatching = True
        try:
            handler(msg, seq)
        finally:
            self._dispatching = False
            if self._lagging:
                self._resync_lagging()

    def _on_book_changed(self, msg: dict[str, Any], seq: int) -> None:
        symbol = msg["symbol"]
        book = self.books.get(symbol)
        if book is None:
            raise BadStream(f"book_changed for symbol {symbol!r} not in the snapshot")
        change = book.apply(msg)
        order_subs = self._order_index.get(symbol)
        if order_subs:
            data = orjson.dumps({"type": "order_event", "symbol": symbol, "seq": seq,
                                 "event": msg["action"], "order_id": msg["order_id"],
                                 "side": msg["side"], "price": msg["price"],
                                 "qty": msg["order_qty"]})
            for sub in order_subs:
                sub.push(data)
        by_depth = self._book_index.get(symbol)
        if change is not None and by_depth:
            self._publish_book_update(symbol, seq, change, by_depth)

    @staticmethod
    def _publish_book_update(symbol: str, seq: int, change: LevelChange,
                             by_depth: dict[int, list[Subscriber]]) -> None:
        """One ``book_update`` per subscribed depth that sees the change, encoded once."""
        side = change.side
        for depth, subs in by_depth.items():
            levels = side.visible_change(change.what, change.rank, change.price, change.qty,
                                         depth)
            if not levels:
                continue  # the change is deeper than this view: nothing it shows moved
            data = orjson.dumps({"type": "book_update", "symbol": symbol, "seq": seq,
                                 "bids": levels if side.is_bid else [],
                                 "asks": [] if side.is_bid else levels})
            for sub in subs:
                sub.push(data)

    def _on_trade(self, msg: dict[str, Any], seq: int) -> None:
        subs = self._trade_index.get(msg["symbol"])
        if not subs:
            return
        data = orjson.dumps({
            "type": "trade", "symbol": msg["symbol"], "seq": seq, "trade_id": msg["trade_id"],
            "price": msg["price"], "qty": msg["qty"], "aggressor": msg["aggressor"],
            "buy_trader": msg["buy_trader"], "sell_trader": msg["sell_trader"], "ts": msg["ts"]})
        for sub in subs:
            sub.push(data)

    def _on_leaderboard(self, msg: dict[str, Any], seq: int) -> None:
        data = self.last_leaderboard = orjson.dumps(
            {"type": "leaderboard", "seq": seq, "ts": msg["ts"], "rows": msg["rows"]})
        for sub in self._leaderboard_subs:
            sub.push(data)

    def set_online(self) -> None:
        if not self.online:
            self.online = True
            self._broadcast_status()

    def set_offline(self, reason: str) -> None:
        self.live = False
        if self.online:
            logger.warning("exchange offline: %s", reason)
            self.online = False
            self._broadcast_status()

    def _broadcast_status(self) -> None:
        data = self._status_message()
        for sub in self.subscribers:
            sub.push(data)


# ================================================================ processes


async def _follow_once(relay: Relay, uri: str) -> None:
    async with connect(uri, compression=None, max_size=None, max_queue=1024,
                       open_timeout=OPEN_TIMEOUT_S) as ws:
        logger.info("connected to the exchange event stream at %s", uri)
        try:
            relay.on_snapshot(orjson.loads(await ws.recv()))
            async for raw in ws:
                relay.on_event(orjson.loads(raw))
        except BadStream:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            # orjson.JSONDecodeError is a ValueError; all of these mean a broken contract
            raise BadStream(f"malformed exchange message: {exc!r}") from exc


async def follow_exchange(relay: Relay, uri: str) -> None:
    """Follow the exchange forever: reconnect with backoff, resync on every snapshot."""
    delay = 0.0
    last_gap = -GAP_RETRY_WINDOW_S
    while True:
        if delay:
            await asyncio.sleep(delay)
        snapshots_before = relay.snapshots
        try:
            await _follow_once(relay, uri)
            problem = "the exchange closed the event stream"
        except SequenceGap as exc:
            problem = str(exc)
            now = time.monotonic()
            # A first gap is worth an immediate reconnect (the fresh snapshot heals it)
            # while subscribers stay online; repeated gaps are treated as an outage.
            if now - last_gap > GAP_RETRY_WINDOW_S:
                last_gap = now
                logger.warning("%s: reconnecting for a fresh snapshot", exc)
                delay = 0.0
                continue
        except BadStream as exc:
            problem = str(exc)
            logger.error("bad exchange stream: %s", problem)
        except (OSError, TimeoutError, WebSocketException) as exc:
            problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        relay.set_offline(problem)
        # back off only while attempts keep failing; a session that got going resets it
        got_going = relay.snapshots != snapshots_before
        first_retry = got_going or not delay
        delay = BACKOFF_INITIAL_S if first_retry else min(delay * 2, BACKOFF_MAX_S)
        logger.log(logging.INFO if first_retry else logging.DEBUG,
                   "cannot follow %s (%s): retrying in %.1f s", uri, problem, delay)


def _limit_send_buffer(ws: ServerConnection, size: int) -> None:
    sock = ws.transport.get_extra_info("socket")
    if size and sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def _make_handler(relay: Relay, sndbuf: int) -> Callable[[ServerConnection], Awaitable[None]]:
    async def handle(ws: ServerConnection) -> None:
        _limit_send_buffer(ws, sndbuf)
        sub = Subscriber(ws, relay, relay.max_backlog)
        relay.add(sub)
        writer = asyncio.create_task(sub.run_writer())
        logger.info("subscriber %s connected", sub.name)
        try:
            async for raw in ws:
                relay.on_client_message(sub, raw)
        except ConnectionClosed:
            pass
        finally:
            relay.remove(sub)
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            logger.info("subscriber %s disconnected (%s)", sub.name, ws.close_reason or
                        ws.close_code)
    return handle


def _bound_uri(server: Server) -> str:
    host, port = server.sockets[0].getsockname()[:2]
    return f"ws://[{host}]:{port}" if ":" in host else f"ws://{host}:{port}"


async def run(args: argparse.Namespace) -> None:
    relay = Relay(args.max_backlog_bytes)
    stop = asyncio.Event()
    stop_on_signals(stop)
    handler = _make_handler(relay, args.sndbuf_bytes)
    async with serve(handler, args.host, args.port, compression=None,
                     max_size=SUBSCRIBER_MAX_MESSAGE,
                     write_limit=SUBSCRIBER_WRITE_LIMIT) as server:
        follower = asyncio.create_task(follow_exchange(relay, args.exchange_uri))
        print("READY " + orjson.dumps({"feed": _bound_uri(server)}).decode(), flush=True)
        await stop.wait()
        logger.info("shutting down")
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="OpenMarketSim public market-data relay: follows the exchange's "
                    "event stream and serves the read-only feed.")
    parser.add_argument("--host", default=DEFAULT_HOST, help="interface to listen on "
                        "(default %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="feed port; 0 picks a free one (default %(default)s)")
    parser.add_argument("--exchange-uri", default=DEFAULT_EXCHANGE_URI,
                        help="the exchange's internal event stream (default %(default)s)")
    parser.add_argument("--max-backlog-bytes", type=int, default=DEFAULT_MAX_BACKLOG_BYTES,
                        help="unsent bytes a subscriber may fall behind before its backlog "
                             "is dropped and it is resynchronised (default %(default)s)")
    parser.add_argument("--sndbuf-bytes", type=int, default=DEFAULT_SNDBUF_BYTES,
                        help="kernel send buffer per subscriber socket; 0 leaves it to the "
                             "OS (default %(default)s)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="stderr log level (default %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "DEBUG":
        logging.getLogger("websockets").setLevel(logging.WARNING)  # per-connection chatter
    try:
        import uvloop
    except ImportError:
        runner: Any = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(run(args))
    except OSError as exc:
        logger.error("cannot listen on %s:%d: %s", args.host, args.port, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
