"""The public market-data relay: follows the exchange's internal event stream, keeps its
own L2 and L3 replica of every book, and fans the public feed out to any number of
read-only subscribers (see ../shared/PROTOCOL.md, "Market data feed").

Design, for speed and for isolation (see ../shared/PERFORMANCE_NOTES.md):

- One task consumes the exchange stream and does all the bookkeeping synchronously:
  each public message is encoded once and appended to the shared log of every distinct
  view (channels, symbols, depth, batch) that includes it, not to each subscriber.
- Once per loop iteration a view's log is flushed: each run of it is framed once (one
  frame per message, or one JSON array per frame with ``"batch": true``) and the same
  bytes are written to every subscriber whose cursor stands at its start, many frames
  per socket write. A subscriber whose socket is full is skipped (its writer task waits
  for the socket to drain) and later catches up from the log in larger chunks; when its
  lag passes its byte limit its cursor jumps to the head and it gets fresh snapshots
  (replies the client asked for are kept), so it skips ahead but never silently misses
  an update. The log is trimmed below the slowest cursor. A peer that reads nothing at
  all is closed with 1008 "too slow".
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
import gc
import logging
import socket
import struct
import sys
import time
import urllib.parse
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from websockets.asyncio.client import connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.protocol import State

from launcher import run_event_loop, stop_on_signals
from models import ProtocolError, RejectCode

logger = logging.getLogger("market_data")

DEFAULT_EXCHANGE_URI = "ws://127.0.0.1:9002"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9010
DEFAULT_DEPTH = 10
MAX_DEPTH = 1000
CHANNELS = ("book", "trades", "leaderboard", "orders")
DEFAULT_CHANNELS = frozenset({"book", "trades", "leaderboard"})
SYMBOL_CHANNELS = frozenset({"book", "trades", "orders"})  # the per-symbol channels
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
# A subscriber resynchronised this many times in a row, over at least UNREAD_TIMEOUT_S,
# without reading any of it is closed (TOO_SLOW) when the next resync is due, rather
# than resynced until the WebSocket keepalive gives up on it (about 40 s later).
MAX_UNREAD_RESYNCS = 3
UNREAD_TIMEOUT_S = 10.0
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


def _frame_header(size: int) -> bytes:
    """The header of an unmasked, final text frame of ``size`` bytes (RFC 6455 5.2)."""
    if size < 126:
        return _SMALL_HEADERS[size]
    if size < 1 << 16:
        return struct.pack("!BBH", 0x81, 126, size)
    return struct.pack("!BBQ", 0x81, 127, size)


_SMALL_HEADERS = tuple(bytes((0x81, size)) for size in range(126))


def _text_frames(messages: list[bytes]) -> bytes:
    """One text frame per message, ready for the socket."""
    parts = []
    for data in messages:
        size = len(data)
        parts.append(_SMALL_HEADERS[size] if size < 126 else _frame_header(size))
        parts.append(data)
    return b"".join(parts)


def _batch_frame(messages: list[bytes]) -> bytes:
    """One text frame holding the messages as a JSON array, ready for the socket."""
    payload = b"[" + b",".join(messages) + b"]"
    return _frame_header(len(payload)) + payload


class ViewFeed:
    """What every subscriber with one View receives: an append-only log of encoded
    messages, each subscriber reading it through its own cursor.

    A server's frames are unmasked, so the bytes of a frame are the same for every peer:
    each run of the log is framed once per flush and the same ``bytes`` object is
    written to every subscriber whose cursor is at its start (websockets' own send path
    would serialize it again for each connection). Messages only one subscriber gets
    (replies, snapshots) wait in that subscriber's private queue, tagged with the log
    position they follow. The log is trimmed below the slowest cursor, and a subscriber
    whose lag passes its limit is resynchronised (which moves its cursor to the head),
    so the log stays bounded by the backlog limit."""

    __slots__ = ("base", "check_at", "log", "scheduled", "subs", "total_bytes", "view")

    def __init__(self, view: View) -> None:
        self.view = view
        self.log: list[bytes] = []
        self.base = 0  # position (messages appended so far) of log[0]
        self.total_bytes = 0  # bytes appended so far
        self.subs: list[Subscriber] = []
        # Lowest total_bytes at which some subscriber passes its limit: checking it
        # after each exchange event costs one comparison per view, not per subscriber.
        self.check_at = 0
        self.scheduled = False

    @property
    def head(self) -> int:
        return self.base + len(self.log)

    def append(self, data: bytes) -> None:
        self.log.append(data)
        self.total_bytes += len(data)
        if not self.scheduled:
            self.schedule()

    def schedule(self) -> None:
        """One flush per loop iteration, however many messages arrived meanwhile."""
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def join(self, sub: Subscriber) -> None:
        sub.feed = self
        sub.cursor, sub.cursor_bytes = self.head, self.total_bytes
        self.subs.append(sub)
        self.note(sub)

    def note(self, sub: Subscriber) -> None:
        """``sub``'s lag or limit changed: keep ``check_at`` conservative."""
        self.check_at = min(self.check_at, sub.limit_at())

    def over_limit(self) -> list[Subscriber]:
        total = self.total_bytes
        return [sub for sub in self.subs if sub.limit_at() < total]

    def chunk(self, start: int, end: int) -> tuple[bytes, int, int]:
        """The log from ``start`` towards ``end``, up to MAX_BATCH_BYTES of messages,
        framed: returns (wire bytes, where it stops, message bytes it carries)."""
        items = self.log[start - self.base:end - self.base]
        size = sum(map(len, items))
        if size > MAX_BATCH_BYTES and len(items) > 1:
            size = count = 0
            for data in items:
                if count and size + len(data) > MAX_BATCH_BYTES:
                    break
                size += len(data)
                count += 1
            items = items[:count]
        frame = _batch_frame(items) if self.view.batch else _text_frames(items)
        return frame, start + len(items), size

    def flush(self) -> None:
        """Write what each writable subscriber has not had yet, then trim the log."""
        self.scheduled = False
        head = self.head
        chunks: dict[tuple[int, int], tuple[bytes, int, int]] = {}
        for sub in self.subs:
            if sub.attached and (sub.cursor != head or sub.private):
                try:
                    sub.write_pending(head, chunks)
                except (OSError, RuntimeError) as exc:
                    # its connection is going away (the handler removes it): not a reason
                    # to leave the others unwritten
                    logger.debug("cannot write to %s: %r", sub.name, exc)
        self._trim()
        self.refresh_check()

    def _trim(self) -> None:
        lowest = min((sub.cursor for sub in self.subs), default=self.head)
        if lowest > self.base:
            del self.log[:lowest - self.base]
            self.base = lowest

    def refresh_check(self) -> None:
        self.check_at = min((sub.limit_at() for sub in self.subs), default=1 << 62)


class Subscriber:
    """One feed connection: its view, its place in the view's shared log, the messages
    meant for it alone, and a task that waits for its socket when that is full."""

    def __init__(self, ws: ServerConnection, relay: Relay, max_backlog: int) -> None:
        self.ws = ws
        self.relay = relay
        self.name = "{}:{}".format(*ws.remote_address[:2]) if ws.remote_address else "?"
        self.view = View()
        self.feed: ViewFeed | None = None
        self.cursor = 0  # the next message of feed.log it gets
        self.cursor_bytes = 0  # bytes of feed's log before the cursor, since the start
        self.private: deque[tuple[int, bytes]] = deque()  # (log position it follows, data)
        self.private_bytes = 0
        self.max_backlog = max_backlog
        self.threshold = max_backlog  # raised by the size of the last fresh start
        self.resyncs = 0
        self.unread_resyncs = 0  # resyncs in a row with nothing read in between
        self.unread_since = 0.0  # monotonic time of the first of them
        self.wrote = False  # anything written to the socket since the last resync
        self.attached = False  # its writer runs: flushes write to it
        self.closing = False  # closed for being too slow: nothing more is queued
        self.blocked = asyncio.Event()  # its socket is full: wait for it to drain

    @property
    def backlog_bytes(self) -> int:
        """Unsent bytes: its part of the shared log plus its private messages."""
        shared = self.feed.total_bytes - self.cursor_bytes if self.feed is not None else 0
        return shared + self.private_bytes

    def limit_at(self) -> int:
        """The feed's ``total_bytes`` past which this subscriber is over its limit."""
        return self.cursor_bytes + self.threshold - self.private_bytes

    def push(self, data: bytes) -> None:
        """Queue a message for this subscriber alone; past the byte limit, resynchronise
        first (the message then follows the fresh start)."""
        if self.closing or self.feed is None:
            return
        if self.backlog_bytes + len(data) > self.threshold and not self.relay.overflow(self):
            return
        feed = self.feed
        self.private.append((feed.head, data))
        self.private_bytes += len(data)
        feed.note(self)
        feed.schedule()

    def push_sync(self, messages: list[bytes]) -> None:
        """Queue a fresh start (snapshots) behind whatever is already queued."""
        if self.closing or self.feed is None:
            return
        feed = self.feed
        size = sum(map(len, messages))
        position = feed.head
        self.private.extend((position, data) for data in messages)
        self.private_bytes += size
        # a fresh start does not count against the limit: only live traffic piling up does
        self.threshold = self.max_backlog + size
        feed.note(self)
        feed.schedule()
        if self.backlog_bytes > self.threshold:
            self.relay.overflow(self)

    def pending(self) -> list[bytes]:
        """Everything queued for this subscriber and not yet written, in order."""
        feed = self.feed
        if feed is None:
            return [data for _, data in self.private]
        log, base, cursor = feed.log, feed.base, self.cursor
        out: list[bytes] = []
        for position, data in self.private:
            if position > cursor:
                out.extend(log[cursor - base:position - base])
                cursor = position
            out.append(data)
        out.extend(log[cursor - base:])
        return out

    def take_pending(self) -> list[bytes]:
        """``pending()``, now counted as written (what a writer does, all at once)."""
        out = self.pending()
        self._skip_to_head()
        self.private.clear()
        self.private_bytes = 0
        self.wrote = True
        return out

    def _skip_to_head(self) -> None:
        if self.feed is not None:
            self.cursor, self.cursor_bytes = self.feed.head, self.feed.total_bytes

    def move_to(self, feed: ViewFeed) -> None:
        """Follow another view's feed; what is still queued goes out first."""
        carried = self.pending()
        self.leave()
        feed.join(self)
        self.private = deque((feed.head, data) for data in carried)
        self.private_bytes = sum(map(len, carried))

    def leave(self) -> None:
        feed, self.feed = self.feed, None
        if feed is not None:
            feed.subs.remove(self)

    def restart(self, messages: list[bytes]) -> bool:
        """Drop the backlog, except replies the client asked for, and queue ``messages``.
        Returns False when those replies alone are over the limit: the peer is not
        reading at all."""
        kept = [data for _, data in self.private if data.startswith(CONTROL_PREFIXES)]
        if sum(map(len, kept)) > self.max_backlog:
            return False
        self._skip_to_head()
        position = self.cursor
        self.private = deque((position, data) for data in kept)
        self.private_bytes = sum(map(len, kept))
        self.push_sync(messages)
        return True

    def close(self) -> None:
        """Stop queueing for a subscriber being closed; drop what it has not had."""
        self.closing = True
        self.private.clear()
        self.private_bytes = 0
        self.leave()

    def write_pending(self, head: int, chunks: dict[tuple[int, int], tuple[bytes, int, int]]
                      ) -> None:
        """Write, chunk after chunk, what this subscriber has not had up to ``head``,
        until its socket buffer is full. ``chunks`` holds the log runs already framed in
        this flush, so subscribers at the same place share the same bytes."""
        ws = self.ws
        transport = ws.transport
        if ws.protocol.state is not State.OPEN or transport.is_closing():
            return  # closing: the handler is about to remove it
        if ws.paused:
            self.blocked.set()  # its writer flushes again once the socket drains
            return
        feed = self.feed
        assert feed is not None
        private = self.private
        while True:
            if private and private[0][0] <= self.cursor:
                data = self._take_private(feed.view.batch)
            elif self.cursor < head:
                end = private[0][0] if private else head
                key = (self.cursor, end)
                chunk = chunks.get(key)
                if chunk is None:
                    chunk = chunks[key] = feed.chunk(self.cursor, end)
                data, self.cursor, size = chunk
                self.cursor_bytes += size
            else:
                return
            transport.write(data)
            self.wrote = True
            if ws.paused:  # over the socket's high-water mark: its writer waits for it
                self.blocked.set()
                return

    def _take_private(self, batch: bool) -> bytes:
        """The private messages due now, up to MAX_BATCH_BYTES, framed."""
        private, cursor = self.private, self.cursor
        parts: list[bytes] = []
        size = 0
        while private and private[0][0] <= cursor and (
                not parts or size + len(private[0][1]) <= MAX_BATCH_BYTES):
            data = private.popleft()[1]
            parts.append(data)
            size += len(data)
        self.private_bytes -= size
        return _batch_frame(parts) if batch else _text_frames(parts)

    async def run_writer(self) -> None:
        """Let flushes write to this connection; whenever its socket buffer fills up,
        wait for it to drain and ask for another flush. Returns never: cancelled by the
        connection handler."""
        self.attached = True
        if self.feed is not None:
            self.feed.schedule()  # whatever was queued before the writer started
        with contextlib.suppress(ConnectionClosed, OSError):  # the peer is gone: done
            while True:
                await self.blocked.wait()
                self.blocked.clear()
                await self.ws.drain()
                if self.feed is not None:
                    self.feed.schedule()


# ================================================================ the relay


class Relay:
    """Replicated books plus fan-out. All methods are synchronous and run on the loop's
    thread, so the state is consistent between any two awaits."""

    def __init__(self, max_backlog: int = DEFAULT_MAX_BACKLOG_BYTES,
                 unread_timeout: float = UNREAD_TIMEOUT_S) -> None:
        self.max_backlog = max_backlog
        self.unread_timeout = unread_timeout
        self.books: dict[str, BookReplica] = {}
        self.symbols: list[str] | None = None  # known after the first exchange snapshot
        self.seq = 0
        self.live = False  # following a current snapshot and its events
        self.snapshots = 0  # exchange snapshots received so far
        self.online = False  # what subscribers were last told
        self.last_leaderboard: bytes | None = None
        self.subscribers: dict[Subscriber, None] = {}
        self.feeds: dict[View, ViewFeed] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # closes in progress
        self._snapshot_cache: dict[tuple[str, str, int], bytes] = {}
        self._book_index: dict[str, dict[int, list[ViewFeed]]] = {}
        self._trade_index: dict[str, list[ViewFeed]] = {}
        self._order_index: dict[str, list[ViewFeed]] = {}
        self._leaderboard_feeds: list[ViewFeed] = []
        self._symbol_feeds: dict[str, list[ViewFeed]] = {}  # any channel of the symbol
        self._feed_list: tuple[ViewFeed, ...] = ()
        self.market_open: dict[str, bool] = {}  # a symbol an admin closed is False
        self._handlers = {"book_changed": self._on_book_changed, "trade": self._on_trade,
                          "leaderboard": self._on_leaderboard,
                          "market_status_changed": self._on_market_status}

    # ------------------------------------------------------------ subscribers

    def add(self, sub: Subscriber) -> None:
        self.subscribers[sub] = None
        self._feed(sub.view).join(sub)
        self._rebuild_index()
        sub.push_sync([self._status_message(), *self._sync_messages(sub.view)])

    def remove(self, sub: Subscriber) -> None:
        self.subscribers.pop(sub, None)
        self._leave(sub)

    def _feed(self, view: View) -> ViewFeed:
        feed = self.feeds.get(view)
        if feed is None:
            feed = self.feeds[view] = ViewFeed(view)
        return feed

    def _leave(self, sub: Subscriber) -> None:
        feed = sub.feed
        sub.leave()
        if feed is not None and not feed.subs:
            del self.feeds[feed.view]
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
        if sub.closing:
            return
        old = sub.feed
        sub.view = view
        if old is None or old.view != view:
            # What is queued still goes out (it belongs to the old view, before the ack);
            # the new view starts from its own snapshots.
            sub.move_to(self._feed(view))
            if old is not None and not old.subs:
                del self.feeds[old.view]
            self._rebuild_index()
        ack = orjson.dumps(view.to_message(self.symbols or ()))
        sub.push_sync([ack, *self._sync_messages(view)])
        logger.info("%s subscribed: %s", sub.name, view)

    def overflow(self, sub: Subscriber) -> bool:
        """``sub`` is too far behind: resync it now. Returns whether it is still open
        (a message being queued for it then follows the fresh start)."""
        self._resync_slow(sub)
        return not sub.closing

    def _check_backlogs(self) -> None:
        """Resync whoever passed its limit. Called between exchange events, never in the
        middle of one: a snapshot then contains exactly the events before it."""
        for feed in self._feed_list:
            if feed.total_bytes > feed.check_at:
                for sub in feed.over_limit():
                    if sub.feed is feed:
                        self._resync_slow(sub)
                feed.refresh_check()

    def _resync_slow(self, sub: Subscriber) -> None:
        now = time.monotonic()
        # it read something since the last one, or its socket has room (the backlog grew
        # within one burst, before the relay could write): either way it is reading
        if sub.wrote or not sub.unread_resyncs or not sub.ws.paused:
            sub.unread_resyncs, sub.unread_since = 0, now
        if sub.unread_resyncs >= MAX_UNREAD_RESYNCS \
                and now - sub.unread_since >= self.unread_timeout:
            self._close_slow(sub, TOO_SLOW, f"resynchronised {sub.unread_resyncs} times in "
                             f"{now - sub.unread_since:.1f} s without reading any of it")
            return
        sub.unread_resyncs += 1
        sub.wrote = False
        sub.resyncs += 1
        logger.warning("subscriber %s fell %d bytes behind: dropping its backlog and "
                       "resynchronising with fresh snapshots (resync #%d)",
                       sub.name, sub.backlog_bytes, sub.resyncs)
        if not sub.restart([self._status_message(), *self._sync_messages(sub.view)]):
            self._close_slow(sub, TOO_SLOW, f"its unread replies alone pass "
                                            f"{sub.max_backlog} bytes")

    def _close_slow(self, sub: Subscriber, close: tuple[int, str], why: str) -> None:
        logger.warning("closing subscriber %s: %s (%s)", sub.name, close[1], why)
        feed = sub.feed
        sub.close()
        if feed is not None and not feed.subs:
            del self.feeds[feed.view]
            self._rebuild_index()
        task = asyncio.get_running_loop().create_task(sub.ws.close(*close))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _rebuild_index(self) -> None:
        """Which views get what, precomputed so the per-event fan-out is a list walk."""
        books: dict[str, dict[int, list[ViewFeed]]] = {}
        trades: dict[str, list[ViewFeed]] = {}
        orders: dict[str, list[ViewFeed]] = {}
        leaderboard: list[ViewFeed] = []
        by_symbol: dict[str, list[ViewFeed]] = {}
        for view, feed in self.feeds.items():
            for symbol in self.books:
                if not view.wants(symbol):
                    continue
                if view.channels & SYMBOL_CHANNELS:
                    by_symbol.setdefault(symbol, []).append(feed)
                if "book" in view.channels:
                    books.setdefault(symbol, {}).setdefault(view.depth, []).append(feed)
                if "trades" in view.channels:
                    trades.setdefault(symbol, []).append(feed)
                if "orders" in view.channels:
                    orders.setdefault(symbol, []).append(feed)
            if "leaderboard" in view.channels:
                leaderboard.append(feed)
        self._book_index, self._trade_index, self._order_index = books, trades, orders
        self._leaderboard_feeds = leaderboard
        self._symbol_feeds = by_symbol
        self._feed_list = tuple(self.feeds.values())

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
            if not self.market_open.get(symbol, True) and view.channels & SYMBOL_CHANNELS:
                out.append(self._market_status(symbol, self.seq))
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
        self.market_open = {s: bool(is_open)
                            for s, is_open in (msg.get("market_open") or {}).items()}
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
        handler(msg, seq)
        self._check_backlogs()

    def _on_book_changed(self, msg: dict[str, Any], seq: int) -> None:
        symbol = msg["symbol"]
        book = self.books.get(symbol)
        if book is None:
            raise BadStream(f"book_changed for symbol {symbol!r} not in the snapshot")
        change = book.apply(msg)
        order_feeds = self._order_index.get(symbol)
        if order_feeds:
            data = orjson.dumps({"type": "order_event", "symbol": symbol, "seq": seq,
                                 "event": msg["action"], "order_id": msg["order_id"],
                                 "side": msg["side"], "price": msg["price"],
                                 "qty": msg["order_qty"]})
            for feed in order_feeds:
                feed.append(data)
        by_depth = self._book_index.get(symbol)
        if change is not None and by_depth:
            self._publish_book_update(symbol, seq, change, by_depth)

    @staticmethod
    def _publish_book_update(symbol: str, seq: int, change: LevelChange,
                             by_depth: dict[int, list[ViewFeed]]) -> None:
        """One ``book_update`` per subscribed depth that sees the change, encoded once."""
        side = change.side
        for depth, feeds in by_depth.items():
            levels = side.visible_change(change.what, change.rank, change.price, change.qty,
                                         depth)
            if not levels:
                continue  # the change is deeper than this view: nothing it shows moved
            data = orjson.dumps({"type": "book_update", "symbol": symbol, "seq": seq,
                                 "bids": levels if side.is_bid else [],
                                 "asks": [] if side.is_bid else levels})
            for feed in feeds:
                feed.append(data)

    def _on_trade(self, msg: dict[str, Any], seq: int) -> None:
        feeds = self._trade_index.get(msg["symbol"])
        if not feeds:
            return
        data = orjson.dumps({
            "type": "trade", "symbol": msg["symbol"], "seq": seq, "trade_id": msg["trade_id"],
            "price": msg["price"], "qty": msg["qty"], "aggressor": msg["aggressor"],
            "buy_trader": msg["buy_trader"], "sell_trader": msg["sell_trader"], "ts": msg["ts"]})
        for feed in feeds:
            feed.append(data)

    def _on_leaderboard(self, msg: dict[str, Any], seq: int) -> None:
        data = self.last_leaderboard = orjson.dumps(
            {"type": "leaderboard", "seq": seq, "ts": msg["ts"], "rows": msg["rows"]})
        for feed in self._leaderboard_feeds:
            feed.append(data)

    def _on_market_status(self, msg: dict[str, Any], seq: int) -> None:
        symbol = msg["symbol"]
        self.market_open[symbol] = bool(msg["is_open"])
        data = self._market_status(symbol, seq)
        for feed in self._symbol_feeds.get(symbol, ()):
            feed.append(data)

    def _market_status(self, symbol: str, seq: int) -> bytes:
        return orjson.dumps({"type": "market_status", "symbol": symbol, "seq": seq,
                             "is_open": self.market_open.get(symbol, True)})

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
        for feed in self._feed_list:
            feed.append(data)
        self._check_backlogs()


# ================================================================ processes


def batched_uri(uri: str) -> str:
    """Ask the exchange for one frame per input (``?batch=1``), unless the URI says."""
    parts = urllib.parse.urlsplit(uri)
    if "batch" in urllib.parse.parse_qs(parts.query):
        return uri
    query = f"{parts.query}&batch=1" if parts.query else "batch=1"
    return urllib.parse.urlunsplit(parts._replace(path=parts.path or "/", query=query))


async def _follow_once(relay: Relay, uri: str) -> None:
    async with connect(batched_uri(uri), compression=None, max_size=None, max_queue=1024,
                       open_timeout=OPEN_TIMEOUT_S) as ws:
        logger.info("connected to the exchange event stream at %s", uri)
        on_event = relay.on_event
        try:
            relay.on_snapshot(orjson.loads(await ws.recv()))
            async for raw in ws:
                message = orjson.loads(raw)
                if type(message) is list:  # one input's events (batched stream)
                    for event in message:
                        on_event(event)
                else:
                    on_event(message)
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
    relay = Relay(args.max_backlog_bytes, args.stall_timeout)
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
    parser.add_argument("--stall-timeout", type=float, default=UNREAD_TIMEOUT_S,
                        metavar="SECONDS",
                        help=f"a subscriber resynchronised {MAX_UNREAD_RESYNCS} times in a row "
                             "without reading any of it, over at least this long, is closed "
                             "(1008 too slow) at the next resync (default %(default)s)")
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
    # what is loaded now lives as long as the process: spare it the collector's full
    # passes, which would stall every subscriber's fan-out for milliseconds
    gc.collect()
    gc.freeze()
    try:
        run_event_loop(run(args))
    except OSError as exc:
        logger.error("cannot listen on %s:%d: %s", args.host, args.port, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
