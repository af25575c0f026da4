"""A read-only monitor for the public market-data feed (``market_data_server.py``).

Live: a Textual terminal view of the book's depth, the last trades, the leaderboard,
the feed's status and its message rate. ``--once --json``: connect, take one
consistent snapshot of what the feed says (books, trades seen so far, leaderboard if
one arrived, status), print it as JSON and exit.

The feed logic lives in ``FeedState``, a plain class fed with decoded messages, so it
is testable without a terminal; the Textual app only reads the socket in a worker,
posts what it read to itself, and renders ``FeedState``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections import deque
from collections.abc import Callable
from decimal import Decimal
from typing import Any, ClassVar

import orjson
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import DataTable, Footer, Header, Static
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

logger = logging.getLogger("monitor")

DEFAULT_URI = "ws://127.0.0.1:9010"
DEFAULT_TICK_SIZE = "0.01"  # the built-in instrument's
DEFAULT_DEPTH = 10
DEFAULT_TIMEOUT_S = 5.0
MAX_TRADES = 50
RATE_WINDOW_S = 5
REFRESH_S = 0.25  # repaint at most this often, whatever the message rate
BACKOFF_INITIAL_S = 0.2
BACKOFF_MAX_S = 5.0


# ================================================================ feed state


class FeedState:
    """What the feed has said so far. Feed it decoded frames; read the picture back."""

    def __init__(self, max_trades: int = MAX_TRADES) -> None:
        self.status: str | None = None  # the exchange, per the feed: online / offline
        self.books: dict[str, dict[str, Any]] = {}  # symbol -> seq, bids, asks (price->qty)
        self.trades: deque[dict[str, Any]] = deque(maxlen=max_trades)  # newest last
        self.leaderboard: dict[str, Any] | None = None
        self.closed: set[str] = set()  # symbols an admin has halted (market_status)
        self.last_error: dict[str, Any] | None = None
        self.messages = 0
        self.pongs = 0
        self.malformed = 0
        self._buckets: deque[list[int]] = deque()  # [whole second, messages in it]

    def apply_frame(self, frame: Any, now: float) -> None:
        """One decoded frame: a message, or a JSON array of them (batch mode)."""
        for message in frame if isinstance(frame, list) else [frame]:
            try:
                self.apply(message, now)
            except (AttributeError, KeyError, TypeError, ValueError):
                # a monitor shows what it can; one odd message must not stop it
                self.malformed += 1
                logger.warning("ignoring a malformed feed message: %.200r", message)

    def apply(self, msg: dict[str, Any], now: float) -> None:
        self._count(now)
        kind = msg.get("type")
        if kind == "book_snapshot":
            self.books[msg["symbol"]] = {
                "seq": msg["seq"], "bids": {p: q for p, q in msg["bids"]},
                "asks": {p: q for p, q in msg["asks"]}}
        elif kind == "book_update":
            self._apply_update(msg)
        elif kind == "trade":
            self.trades.append(msg)
        elif kind == "leaderboard":
            self.leaderboard = msg
        elif kind == "status":
            self.status = msg["exchange"]
        elif kind == "market_status":
            if msg["is_open"]:
                self.closed.discard(msg["symbol"])
            else:
                self.closed.add(msg["symbol"])
        elif kind == "error":
            self.last_error = msg
            logger.warning("feed error %s: %s", msg.get("code"), msg.get("message"))
        elif kind == "pong":
            self.pongs += 1

    def _apply_update(self, msg: dict[str, Any]) -> None:
        book = self.books.get(msg["symbol"])
        if book is None or msg["seq"] <= book["seq"]:
            return  # the feed sends a snapshot first; older updates are already in it
        book["seq"] = msg["seq"]
        for side in ("bids", "asks"):
            levels = book[side]
            for price, qty in msg[side]:
                if qty:
                    levels[price] = qty
                else:
                    levels.pop(price, None)

    def _count(self, now: float) -> None:
        self.messages += 1
        second = int(now)
        buckets = self._buckets
        if buckets and buckets[-1][0] == second:
            buckets[-1][1] += 1
        else:
            buckets.append([second, 1])
            while buckets[0][0] <= second - RATE_WINDOW_S:
                buckets.popleft()

    def rate(self, now: float) -> float:
        """Messages per second over the last few whole seconds."""
        start = int(now) - RATE_WINDOW_S
        return sum(count for second, count in self._buckets if second > start) / RATE_WINDOW_S

    def symbols(self) -> list[str]:
        return sorted(self.books)

    def depth(self, symbol: str, side: str, n: int | None = None) -> list[list[int]]:
        """``[[price, qty]]`` best first."""
        book = self.books.get(symbol)
        if book is None:
            return []
        levels = sorted(book[side].items(), reverse=side == "bids")
        return [[price, qty] for price, qty in levels[:n]]

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "books": {symbol: {"seq": self.books[symbol]["seq"],
                               "bids": self.depth(symbol, "bids"),
                               "asks": self.depth(symbol, "asks")}
                      for symbol in self.symbols()},
            "trades": list(self.trades),
            "leaderboard": self.leaderboard,
            "closed_markets": sorted(self.closed),
        }


def subscribe_message(depth: int, batch: bool) -> dict[str, Any]:
    return {"type": "subscribe", "channels": ["book", "trades", "leaderboard"],
            "depth": depth, "batch": batch}


# ================================================================ --once


class FeedUnreachable(Exception):
    """The feed could not be reached or did not answer in time."""


async def fetch_once(uri: str, depth: int, timeout: float) -> FeedState:
    """Connect, subscribe, and read until the relay has answered a ping: everything it
    queued for the subscription (snapshots, the latest leaderboard) is in by then."""
    state = FeedState()

    async def read() -> None:
        async with connect(uri, compression=None, open_timeout=timeout,
                           max_size=None) as ws:
            await ws.send(orjson.dumps(subscribe_message(depth, batch=True)).decode())
            await ws.send('{"type":"ping"}')
            while not state.pongs:
                state.apply_frame(orjson.loads(await ws.recv()), time.monotonic())

    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise FeedUnreachable(f"no complete answer from {uri} within {timeout:g} s") from None
    except (OSError, WebSocketException) as exc:
        raise FeedUnreachable(f"cannot reach the feed at {uri}: {exc}") from None
    except orjson.JSONDecodeError as exc:
        raise FeedUnreachable(f"{uri} is not a market-data feed (a frame was not JSON: "
                              f"{exc})") from None
    return state


def format_text(state: FeedState, depth: int) -> str:
    """A plain-text rendering of a snapshot, for ``--once`` without ``--json``."""
    lines = [f"exchange: {state.status or 'unknown'}"]
    for symbol in state.symbols():
        lines.append(f"{symbol}  {'bid qty':>9} {'bid':>8} | {'ask':<8} {'ask qty':<9}"
                     + ("  CLOSED" if symbol in state.closed else ""))
        bids, asks = state.depth(symbol, "bids", depth), state.depth(symbol, "asks", depth)
        for i in range(max(len(bids), len(asks))):
            bid = bids[i] if i < len(bids) else ["", ""]
            ask = asks[i] if i < len(asks) else ["", ""]
            lines.append(f"{'':{len(symbol)}}  {bid[1]:>9} {bid[0]:>8} | {ask[0]!s:<8} "
                         f"{ask[1]!s:<9}")
    for trade in list(state.trades)[-10:]:
        lines.append(f"trade {trade['symbol']} {trade['qty']} @ {trade['price']} "
                     f"({trade['aggressor']})")
    if state.leaderboard:
        for row in state.leaderboard["rows"]:
            lines.append(f"{row['trader_id']:<16} equity {row['equity']}")
    return "\n".join(lines)


# ================================================================ the live view


class FeedFrames(Message):
    """Frames the reader worker received, already decoded."""

    def __init__(self, frames: list[Any], received_at: float) -> None:
        super().__init__()
        self.frames = frames
        self.received_at = received_at


class FeedConnection(Message):
    """The worker connected to, or lost, the feed."""

    def __init__(self, connected: bool, detail: str) -> None:
        super().__init__()
        self.connected = connected
        self.detail = detail


def price_formatter(tick_size: str) -> Callable[[int], str]:
    """Ticks to a currency string with the tick's decimals (10012 at 0.01 -> 100.12). The
    feed speaks ticks and does not carry the tick size, hence ``--tick-size``."""
    tick = Decimal(tick_size)
    places = max(0, -tick.as_tuple().exponent)  # type: ignore[operator]
    return lambda ticks: f"{ticks * tick:.{places}f}"


class MonitorApp(App[None]):
    """Live depth, trades, leaderboard, status and message rate of one feed."""

    TITLE = "OpenMarketSim monitor"
    CSS = """
    #status { height: 1; padding: 0 1; }
    #books, #bottom { height: 1fr; }
    DataTable { width: 1fr; }
    """
    BINDINGS: ClassVar[list[Binding]] = [  # type: ignore[misc]
        Binding("q", "quit", "Quit"),
        Binding("n", "next_symbol", "Next symbol"),
    ]

    connection: reactive[str] = reactive("connecting")
    exchange: reactive[str] = reactive("unknown")
    rate: reactive[float] = reactive(0.0)
    symbol: reactive[str] = reactive("")
    revision: reactive[int] = reactive(0)  # bumped per applied batch; repaint is throttled

    def __init__(self, uri: str = DEFAULT_URI, depth: int = DEFAULT_DEPTH,
                 tick_size: str = DEFAULT_TICK_SIZE) -> None:
        super().__init__()
        self.uri = uri
        self.depth = depth
        self.price = price_formatter(tick_size)
        self.state = FeedState()
        self.synced = asyncio.Event()  # set once the first subscription is fully in
        self._painted = -1

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="status")
        with Horizontal(id="books"):
            yield DataTable(id="bids", cursor_type="none")
            yield DataTable(id="asks", cursor_type="none")
        with Horizontal(id="bottom"):
            yield DataTable(id="trades", cursor_type="none")
            yield DataTable(id="leaderboard", cursor_type="none")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#bids", DataTable).add_columns("bid qty", "bid")
        self.query_one("#asks", DataTable).add_columns("ask", "ask qty")
        self.query_one("#trades", DataTable).add_columns("symbol", "price", "qty", "aggressor")
        self.query_one("#leaderboard", DataTable).add_columns(
            "trader", "position", "realized", "equity")
        self._paint_status()
        self.set_interval(REFRESH_S, self._tick)
        self.read_feed()

    # ------------------------------------------------------------ network (worker)

    @work(exclusive=True, group="feed")
    async def read_feed(self) -> None:
        """Follow the feed forever, reconnecting with backoff; post what arrives."""
        delay = BACKOFF_INITIAL_S
        while True:
            try:
                async with connect(self.uri, compression=None, max_size=None,
                                   open_timeout=DEFAULT_TIMEOUT_S) as ws:
                    self.post_message(FeedConnection(True, self.uri))
                    delay = BACKOFF_INITIAL_S
                    await ws.send(orjson.dumps(subscribe_message(self.depth, True)).decode())
                    await ws.send('{"type":"ping"}')
                    async for raw in ws:
                        self.post_message(FeedFrames([orjson.loads(raw)], time.monotonic()))
                detail = "the feed closed the connection"
            except (OSError, TimeoutError, WebSocketException, ValueError) as exc:
                detail = f"{type(exc).__name__}: {exc}"  # ValueError: a frame not JSON
            self.post_message(FeedConnection(False, detail))
            await asyncio.sleep(delay)  # backoff between reconnection attempts
            delay = min(delay * 2, BACKOFF_MAX_S)

    # ------------------------------------------------------------ state (app side)

    def on_feed_frames(self, message: FeedFrames) -> None:
        for frame in message.frames:
            self.state.apply_frame(frame, message.received_at)
        self.exchange = self.state.status or "unknown"
        if not self.symbol and self.state.books:
            self.symbol = self.state.symbols()[0]
        self.revision += 1
        if self.state.pongs and not self.synced.is_set():
            self.paint()  # the first complete picture shows at once
            self.synced.set()

    def on_feed_connection(self, message: FeedConnection) -> None:
        self.connection = "connected" if message.connected else f"disconnected ({message.detail})"

    def action_next_symbol(self) -> None:
        symbols = self.state.symbols()
        if symbols:
            index = symbols.index(self.symbol) + 1 if self.symbol in symbols else 0
            self.symbol = symbols[index % len(symbols)]

    def _tick(self) -> None:
        self.rate = self.state.rate(time.monotonic())
        if self.revision != self._painted:
            self.paint()

    def watch_connection(self) -> None:
        self._paint_status()

    def watch_exchange(self) -> None:
        self._paint_status()

    def watch_rate(self) -> None:
        self._paint_status()

    def watch_symbol(self) -> None:
        self.paint()

    # ------------------------------------------------------------ rendering

    def _paint_status(self) -> None:
        if not self.is_mounted:
            return
        self.query_one("#status", Static).update(
            f"feed {self.uri}: {self.connection} | exchange: {self.exchange} | "
            f"{self.rate:,.0f} msg/s | symbol: {self.symbol or '-'}"
            f"{' CLOSED' if self.symbol in self.state.closed else ''} (n: next)")

    def paint(self) -> None:
        """Redraw the tables from ``state``."""
        if not self.is_mounted:
            return
        self._painted = self.revision
        state, symbol = self.state, self.symbol
        price = self.price
        self._fill("#bids", [[qty, price(ticks)] for ticks, qty in
                             state.depth(symbol, "bids", self.depth)])
        self._fill("#asks", [[price(ticks), qty] for ticks, qty in
                             state.depth(symbol, "asks", self.depth)])
        self._fill("#trades", [[t["symbol"], price(t["price"]), t["qty"], t["aggressor"]]
                               for t in reversed(state.trades)])
        rows = state.leaderboard["rows"] if state.leaderboard else []
        self._fill("#leaderboard", [[r["trader_id"], r["position"], r["realized_pnl"],
                                     r["equity"]] for r in rows])
        self._paint_status()

    def _fill(self, selector: str, rows: list[list[Any]]) -> None:
        table = self.query_one(selector, DataTable)
        table.clear()
        table.add_rows(rows)


# ================================================================ CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Read-only monitor of the OpenMarketSim market-data feed.")
    parser.add_argument("--uri", default=DEFAULT_URI,
                        help="the feed's WebSocket URI (default %(default)s)")
    parser.add_argument("--depth", type=int, default=DEFAULT_DEPTH,
                        help="book levels per side (default %(default)s)")
    parser.add_argument("--once", action="store_true",
                        help="print one snapshot and exit instead of the live view")
    parser.add_argument("--json", action="store_true",
                        help="with --once: print JSON (prices stay in ticks, as on the feed)")
    parser.add_argument("--tick-size", default=DEFAULT_TICK_SIZE,
                        help="currency per price tick, for display (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="with --once: seconds to wait for the feed (default %(default)s)")
    parser.add_argument("--log-level", default="WARNING",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level (default %(default)s)")
    args = parser.parse_args(argv)
    if args.json and not args.once:
        parser.error("--json needs --once")
    if not 1 <= args.depth <= 1000:
        parser.error("--depth must be from 1 to 1000")
    return args


def run_once(args: argparse.Namespace) -> int:
    try:
        state = asyncio.run(fetch_once(args.uri, args.depth, args.timeout))
    except FeedUnreachable as exc:
        print(f"monitor: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(orjson.dumps(state.to_json(), option=orjson.OPT_INDENT_2).decode())
    else:
        print(format_text(state, args.depth))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.once:
        logging.basicConfig(level=args.log_level, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return run_once(args)
    from textual.logging import TextualHandler  # stderr would scribble over the screen

    logging.basicConfig(level=args.log_level, handlers=[TextualHandler()])
    MonitorApp(args.uri, args.depth, args.tick_size).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
