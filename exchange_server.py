"""The exchange process: the order gateway and the internal event stream around one Engine.

- Order gateway (default ``ws://127.0.0.1:9001``): traders log in and send orders; each
  gets private messages about its own orders only (``../shared/PROTOCOL.md``).
- Internal event stream (default ``ws://127.0.0.1:9002``): a snapshot, then every
  sequenced event (``API_SPEC.md``), for the market-data relay and other trusted tools.
- Telemetry: ``trades.csv`` and ``performance.csv`` in ``--data-dir`` (``telemetry.py``).

One sequencer, no threads: every accepted request is applied to the Engine at once,
inside the event loop, with a wall-clock timestamp that never goes backwards; every
resulting event but a rejection gets the next ``seq`` and its messages are queued
in that order before the next request is read. Nothing here awaits a client while
sequencing: messages are queued per connection without waiting (``Outbound``) and a
client whose unsent backlog passes a bound is closed (1008, "too slow").

Private messages beyond PROTOCOL.md's core (for API_SPEC.md):
- ``trader_status`` ``{status, ts, seq}``: the trader's margin status changed
  (``ok``, ``margin_call``, ``liquidating``), sent to all of its sessions.
- ``fill`` and ``order_ack`` also carry ``liquidation``; ``order_ack`` carries
  ``stop_price`` and ``post_only``; ``position`` carries ``fees``, and after a fill,
  ``ts`` and ``seq``; ``open_orders`` orders carry ``status`` and ``filled_qty``.
- ``login_ack`` also carries ``fees`` and ``margin`` (the configured rates).
- ``error`` code ``INTERNAL_ERROR`` if a request hit a bug (logged); nothing else changes.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from config import ConfigError, ExchangeConfig, load_config
from engine import Engine
from models import (
    PROTOCOL_VERSION,
    REJECT_EVENTS,
    TRADER_ID_RE,
    AmendRejected,
    CancelAll,
    CancelReason,
    CancelRejected,
    Event,
    GetOpenOrders,
    GetPosition,
    Login,
    OrderAccepted,
    OrderAmended,
    OrderCanceled,
    OrderRejected,
    OrderStatus,
    OrderTriggered,
    Ping,
    PositionChanged,
    ProtocolError,
    RejectCode,
    Request,
    Side,
    Trade,
    TraderStatusChanged,
    event_to_dict,
    parse_request,
)
from orderbook import Order
from positions import PositionReport, to_currency
from telemetry import PerformanceRow, Telemetry

log = logging.getLogger("exchange")

DEFAULT_CLIENT_BUFFER = 4 * 2**20  # bytes a trader session may leave unsent
DEFAULT_CONSUMER_BUFFER = 64 * 2**20  # an event consumer gets more: it carries everything
EVICT_TIMEOUT_S = 5.0  # a too-slow peer gets this long to take its close frame
CLOSE_TIMEOUT_S = 2.0
FLUSH_BYTES = 64 * 1024  # a peer's frames are written at once when this much is queued
SHUTDOWN_TIMEOUT_S = 5.0
TOO_SLOW = (1008, "too slow")


class Clock:
    """Wall-clock microseconds, never going backwards (the engine's ``ts``)."""

    def __init__(self) -> None:
        self.last = 0

    def now(self) -> int:
        now = time.time_ns() // 1000
        if now > self.last:
            self.last = now
        return self.last


class Session:
    """One gateway connection; ``trader_id`` is set by a successful login."""

    __slots__ = ("trader_id", "ws")

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws
        self.trader_id: str | None = None


class Outbound:
    """Writes to peers that never wait on them.

    ``send`` queues a text frame in each peer's websockets protocol buffer at once (so
    order is kept) and the queued frames of a peer go out in one socket write at the end
    of the current event-loop turn: one system call per peer per turn, not per frame,
    which is what fan-out costs. Peers whose unsent backlog passes ``limit`` bytes are
    closed with 1008 "too slow".
    """

    def __init__(self, limit: int, kind: str) -> None:
        self.limit = limit
        self.kind = kind
        self._pending: dict[ServerConnection, int] = {}  # peer -> bytes queued this turn
        self._flush_scheduled = False
        self._evicting: set[ServerConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def send(self, peers: Iterable[ServerConnection], data: bytes) -> None:
        pending = self._pending
        size = len(data)
        for ws in peers:
            if ws.protocol.state is not State.OPEN or ws in self._evicting:
                continue
            ws.protocol.send_text(data)
            queued = pending.get(ws, 0) + size
            if queued < FLUSH_BYTES:
                pending[ws] = queued
            else:  # one turn may answer many requests: keep the backlog check honest
                pending.pop(ws, None)
                self._write(ws)
        if pending and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, {}
        for ws in pending:
            self._write(ws)

    def _write(self, ws: ServerConnection) -> None:
        # websockets may have written them already (it flushes with its own frames)
        data = b"".join(ws.protocol.data_to_send())
        transport = ws.transport
        if not data or transport.is_closing():
            return
        transport.write(data)
        if transport.get_write_buffer_size() > self.limit and ws not in self._evicting:
            self._evict(ws)

    def _evict(self, ws: ServerConnection) -> None:
        log.warning("closing %s %s: %d bytes unsent (limit %d)", self.kind, ws.remote_address,
                    ws.transport.get_write_buffer_size(), self.limit)
        self._evicting.add(ws)
        task = asyncio.get_running_loop().create_task(self._close(ws))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _close(self, ws: ServerConnection) -> None:
        try:
            # close() waits for the backlog to drain; a peer that never reads is cut off.
            await asyncio.wait_for(ws.close(*TOO_SLOW), EVICT_TIMEOUT_S)
        except asyncio.TimeoutError:
            ws.transport.abort()
        finally:
            self._evicting.discard(ws)


def order_state(order: Order, resting: bool) -> dict[str, Any]:
    """A live order as the ``open_orders`` reply lists it."""
    if not resting:
        status = OrderStatus.PENDING_TRIGGER
    elif order.leaves_qty < order.qty:
        status = OrderStatus.PARTIALLY_FILLED
    else:
        status = OrderStatus.NEW
    return {"order_id": order.order_id, "client_order_id": order.client_order_id,
            "symbol": order.symbol, "side": order.side.value,
            "order_type": order.order_type.value, "price": order.price,
            "stop_price": order.stop_price, "qty": order.qty, "leaves_qty": order.leaves_qty,
            "filled_qty": order.qty - order.leaves_qty, "tif": order.tif.value,
            "post_only": order.post_only, "status": status.value, "ts": order.ts}


def reject_message(event: OrderRejected | CancelRejected | AmendRejected) -> dict[str, Any]:
    if isinstance(event, OrderRejected):
        return {"type": "order_reject", "client_order_id": event.client_order_id,
                "code": event.code.value, "message": event.message, "ts": event.ts}
    kind = "cancel_reject" if isinstance(event, CancelRejected) else "amend_reject"
    return {"type": kind, "order_id": event.order_id, "client_order_id": event.client_order_id,
            "code": event.code.value, "message": event.message, "ts": event.ts}


def fill_message(trade: Trade, seq: int, side: Side) -> dict[str, Any]:
    """One side's view of a trade."""
    buy = side is Side.BUY
    return {"type": "fill",
            "order_id": trade.buy_order_id if buy else trade.sell_order_id,
            "client_order_id": trade.buy_client_order_id if buy else trade.sell_client_order_id,
            "trade_id": trade.trade_id, "symbol": trade.symbol, "side": side.value,
            "price": trade.price, "qty": trade.qty,
            "leaves_qty": trade.buy_leaves_qty if buy else trade.sell_leaves_qty,
            "liquidity": "taker" if trade.aggressor is side else "maker",
            "fee": to_currency(trade.buy_fee if buy else trade.sell_fee),
            "ts": trade.ts, "seq": seq, "liquidation": trade.liquidation}


class Exchange:
    """The sequencer and both endpoints' handlers (transport-agnostic up to the socket)."""

    def __init__(self, config: ExchangeConfig, telemetry: Telemetry,
                 accounts: dict[str, str] | None = None,
                 client_buffer: int = DEFAULT_CLIENT_BUFFER,
                 consumer_buffer: int = DEFAULT_CONSUMER_BUFFER) -> None:
        self.config = config
        self.engine = Engine(config)
        self.telemetry = telemetry
        self.accounts = accounts
        self.clock = Clock()
        self.seq = 0
        self.stopping = False
        self.sessions: dict[str, dict[ServerConnection, None]] = {}  # trader -> its sessions
        self.consumers: dict[ServerConnection, None] = {}
        self.to_clients = Outbound(client_buffer, "trader session")
        self.to_consumers = Outbound(consumer_buffer, "event consumer")
        symbols = self.engine.symbols
        self.default_symbol = symbols[0] if len(symbols) == 1 else None
        self._fill_prices: dict[str, int] = {}  # last trade price per symbol, for `position`
        self._login_info = self._build_login_info()
        self._private: dict[type, Callable[[Any, int], None]] = {
            OrderAccepted: self._on_accepted, Trade: self._on_trade,
            PositionChanged: self._on_position, OrderCanceled: self._on_canceled,
            OrderAmended: self._on_amended, OrderTriggered: self._on_triggered,
            TraderStatusChanged: self._on_trader_status,
        }
        self._requests: dict[type, Callable[[Session, Any], None]] = {
            Login: self._login, Ping: self._ping, GetPosition: self._get_position,
            GetOpenOrders: self._get_open_orders,
        }

    def _build_login_info(self) -> dict[str, Any]:
        config = self.config
        risk, fees, margin = config.risk, config.fees, config.margin
        return {
            "protocol_version": PROTOCOL_VERSION,
            "instruments": [{"symbol": i.symbol, "tick_size": float(Decimal(i.tick_size)),
                             "lot_size": i.lot_size} for i in config.instruments],
            "limits": {"max_order_qty": risk.max_order_qty, "max_position": risk.max_position,
                       "max_open_orders": risk.max_open_orders,
                       "rate_limit_per_sec": risk.rate_limit_per_sec,
                       "rate_limit_burst": risk.rate_limit_burst,
                       "max_message_bytes": config.server.max_message_bytes},
            "fees": {"maker_fee_bps": fees.maker_fee_bps, "taker_fee_bps": fees.taker_fee_bps},
            "margin": {"enabled": margin.enabled, "initial_cash": margin.initial_cash,
                       "initial_margin_pct": margin.initial_margin_pct,
                       "maintenance_margin_pct": margin.maintenance_margin_pct},
        }

    # ================================================================= sequencer

    def submit(self, command: Any) -> None:
        """Apply one command to the engine now and send out what it caused."""
        self.publish(self.engine.process(command, self.clock.now()))

    def publish(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, REJECT_EVENTS):
                self._send_private(event.trader_id, reject_message(event))
                continue
            self.seq += 1
            seq = self.seq
            if type(event) is Trade:
                self._record_trade(event, seq)
            if self.consumers:
                self.to_consumers.send(self.consumers, orjson.dumps(event_to_dict(event, seq)))
            handler = self._private.get(type(event))
            if handler is not None:
                try:
                    handler(event, seq)
                except Exception:  # a bug here must not cut the stream short
                    log.exception("private message for %r failed", event)

    def _record_trade(self, trade: Trade, seq: int) -> None:
        self._fill_prices[trade.symbol] = trade.price
        try:
            # the row is on disk before anyone is told of the fill
            self.telemetry.write_trade(trade, seq)
        except OSError:
            log.exception("trades.csv: cannot write trade %d", trade.trade_id)

    def publish_leaderboard(self) -> None:
        """A sequenced leaderboard event on the internal stream (money in currency)."""
        self.seq += 1
        if not self.consumers:
            return
        rows = [{"trader_id": row["trader_id"], "position": row["position"],
                 "cash": to_currency(row["cash"]), "realized_pnl": to_currency(row["realized_pnl"]),
                 "equity": to_currency(row["equity"])} for row in self.engine.leaderboard()]
        message = {"type": "leaderboard", "seq": self.seq, "ts": self.clock.now(), "rows": rows}
        self.to_consumers.send(self.consumers, orjson.dumps(message))

    def snapshot(self) -> dict[str, Any]:
        """The exchange after event ``seq``: L3 books and market state."""
        engine = self.engine
        books = {symbol: {"bids": [[o.order_id, o.price, o.leaves_qty]
                                   for o in book.iter_orders(Side.BUY)],
                          "asks": [[o.order_id, o.price, o.leaves_qty]
                                   for o in book.iter_orders(Side.SELL)]}
                 for symbol, book in engine.books.items()}
        return {"type": "snapshot", "seq": self.seq, "ts": self.clock.now(),
                "instruments": [{"symbol": i.symbol, "tick_size": i.tick_size,
                                 "lot_size": i.lot_size} for i in self.config.instruments],
                "books": books, "market_open": dict(engine.market_open),
                "last_prices": dict(engine.last_prices)}

    # ================================================================= private messages

    def _send_private(self, trader_id: str, message: dict[str, Any]) -> None:
        sessions = self.sessions.get(trader_id)
        if sessions:
            self.to_clients.send(sessions, orjson.dumps(message))

    def _reply(self, session: Session, message: dict[str, Any]) -> None:
        self.to_clients.send((session.ws,), orjson.dumps(message))

    def _on_accepted(self, event: OrderAccepted, seq: int) -> None:
        self._send_private(event.trader_id, {
            "type": "order_ack", "order_id": event.order_id,
            "client_order_id": event.client_order_id, "symbol": event.symbol,
            "side": event.side.value, "order_type": event.order_type.value,
            "price": event.price, "stop_price": event.stop_price, "qty": event.qty,
            "leaves_qty": event.qty, "tif": event.tif.value, "post_only": event.post_only,
            "ts": event.ts, "seq": seq, "liquidation": event.liquidation})

    def _on_trade(self, event: Trade, seq: int) -> None:
        self._send_private(event.buy_trader, fill_message(event, seq, Side.BUY))
        self._send_private(event.sell_trader, fill_message(event, seq, Side.SELL))

    def _on_position(self, event: PositionChanged, seq: int) -> None:
        if event.trader_id not in self.sessions:
            return  # valuing it costs a little; nobody would read it
        symbol = event.symbol
        mark = self._fill_prices.get(symbol) or self.engine.mark_price(symbol)
        tick_value = self.engine.tick_values[symbol]
        held_value = event.position * mark * tick_value
        report = PositionReport(
            event.trader_id, symbol, event.position,
            event.open_cost / event.position if event.position else 0.0, event.cash,
            event.realized_pnl, held_value - event.open_cost * tick_value,
            event.cash + held_value + self._other_holdings(event.trader_id, symbol),
            event.fees)
        message = self._position_message(report)
        message["ts"], message["seq"] = event.ts, seq
        self._send_private(event.trader_id, message)

    def _other_holdings(self, trader_id: str, symbol: str) -> int:
        """Value at the marks of the trader's positions in symbols other than ``symbol``."""
        account = self.engine.ledger.accounts.get(trader_id)
        if account is None or len(account.positions) <= 1:
            return 0
        marks = self.engine.marks()
        tick_values = self.engine.tick_values
        return sum(p.qty * marks[s] * tick_values[s]
                   for s, p in account.positions.items() if s != symbol and p.qty)

    def _position_message(self, report: PositionReport) -> dict[str, Any]:
        trader_id = report.trader_id
        return {"type": "position", "symbol": report.symbol, "position": report.position,
                "avg_price": report.avg_price, "cash": to_currency(report.cash),
                "realized_pnl": to_currency(report.realized_pnl),
                "unrealized_pnl": to_currency(report.unrealized_pnl),
                "equity": to_currency(report.equity),
                "margin_used": to_currency(self.engine.margin_used(trader_id)),
                "status": self.engine.trader_status(trader_id).value,
                "fees": to_currency(report.fees)}

    def _on_canceled(self, event: OrderCanceled, seq: int) -> None:
        self._send_private(event.trader_id, {
            "type": "order_canceled", "order_id": event.order_id,
            "client_order_id": event.client_order_id, "symbol": event.symbol,
            "side": event.side.value, "canceled_qty": event.canceled_qty,
            "reason": event.reason.value, "ts": event.ts, "seq": seq})

    def _on_amended(self, event: OrderAmended, seq: int) -> None:
        self._send_private(event.trader_id, {
            "type": "order_amended", "order_id": event.order_id,
            "client_order_id": event.client_order_id, "symbol": event.symbol,
            "side": event.side.value, "price": event.price, "qty": event.qty,
            "leaves_qty": event.leaves_qty, "priority_kept": event.priority_kept,
            "ts": event.ts, "seq": seq})

    def _on_triggered(self, event: OrderTriggered, seq: int) -> None:
        self._send_private(event.trader_id, {
            "type": "order_triggered", "order_id": event.order_id,
            "client_order_id": event.client_order_id, "symbol": event.symbol,
            "ts": event.ts, "seq": seq})

    def _on_trader_status(self, event: TraderStatusChanged, seq: int) -> None:
        self._send_private(event.trader_id, {"type": "trader_status",
                                             "status": event.status.value,
                                             "ts": event.ts, "seq": seq})

    # ================================================================= gateway

    async def gateway(self, ws: ServerConnection) -> None:
        session = Session(ws)
        try:
            async for frame in ws:
                self.on_frame(session, frame)
        except ConnectionClosed:
            pass  # a client that vanishes is normal; its session just ends
        finally:
            self.end_session(session)

    def on_frame(self, session: Session, frame: str | bytes) -> None:
        """Handle one inbound frame completely (synchronously: this is the sequencer)."""
        if self.stopping:
            return  # the final performance rows are written; nothing more is applied
        try:
            request = self._decode(session, frame)
            handler = self._requests.get(type(request))
            if handler is None:
                self.submit(request)
            else:
                handler(session, request)
        except ProtocolError as exc:
            self._reply(session, {"type": "error", "code": exc.code.value,
                                  "message": exc.message, "ref": exc.ref})
        except Exception:
            log.exception("request from %s failed: %.200r", session.trader_id, frame)
            self._reply(session, {"type": "error", "code": RejectCode.INTERNAL_ERROR.value,
                                  "message": "the exchange failed to process this request",
                                  "ref": None})

    def _decode(self, session: Session, frame: str | bytes) -> Request:
        if not isinstance(frame, str):
            raise ProtocolError(RejectCode.BAD_JSON,
                                "binary frames are not accepted; send JSON in a text frame")
        try:
            message = orjson.loads(frame)
        except orjson.JSONDecodeError as exc:
            raise ProtocolError(RejectCode.BAD_JSON, f"not valid JSON: {exc}") from None
        try:
            return parse_request(message, session.trader_id, self.default_symbol)
        except ProtocolError as exc:
            if exc.ref is None and isinstance(message, dict):
                ref = message.get("client_order_id", message.get("order_id"))
                exc.ref = ref if type(ref) in (str, int) else None
            raise

    def end_session(self, session: Session) -> None:
        trader_id = session.trader_id
        if trader_id is None:
            return
        sessions = self.sessions.get(trader_id, {})
        sessions.pop(session.ws, None)
        if sessions:
            return
        self.sessions.pop(trader_id, None)
        log.info("trader %s disconnected", trader_id)
        if self.config.server.cancel_on_disconnect and not self.stopping:
            try:
                self.submit(CancelAll(trader_id, reason=CancelReason.DISCONNECT))
            except Exception:
                log.exception("cancel-on-disconnect for %s failed", trader_id)

    def _login(self, session: Session, request: Login) -> None:
        if self.accounts is not None:
            expected = self.accounts.get(request.trader_id)
            token = request.token or ""
            if expected is None or not hmac.compare_digest(expected.encode(), token.encode()):
                raise ProtocolError(RejectCode.AUTH_FAILED,
                                    "unknown trader_id or wrong token")
        session.trader_id = request.trader_id
        self.sessions.setdefault(request.trader_id, {})[session.ws] = None
        log.info("trader %s logged in from %s", request.trader_id, session.ws.remote_address)
        self._reply(session, {"type": "login_ack", "trader_id": request.trader_id,
                              **self._login_info})

    def _ping(self, session: Session, _request: Ping) -> None:
        self._reply(session, {"type": "pong"})

    def _symbols(self, symbol: str | None) -> list[str]:
        if symbol is None:
            return self.engine.symbols
        if symbol not in self.engine.books:
            raise ProtocolError(RejectCode.UNKNOWN_SYMBOL, f"unknown symbol {symbol!r}", symbol)
        return [symbol]

    def _get_position(self, session: Session, request: GetPosition) -> None:
        trader_id = session.trader_id
        assert trader_id is not None
        for symbol in self._symbols(request.symbol):
            self._reply(session, self._position_message(self._report(trader_id, symbol)))

    def _report(self, trader_id: str, symbol: str) -> PositionReport:
        return self.engine.position_report(trader_id, symbol)  # read-only: opens no account

    def _get_open_orders(self, session: Session, request: GetOpenOrders) -> None:
        trader_id = session.trader_id
        assert trader_id is not None
        self._symbols(request.symbol)  # validates it
        orders = self.engine.open_orders(trader_id, request.symbol)
        books = self.engine.books
        self._reply(session, {"type": "open_orders", "symbol": request.symbol, "orders": [
            order_state(o, o.order_id in books[o.symbol].resting_orders) for o in orders]})

    # ================================================================= event stream

    async def events(self, ws: ServerConnection) -> None:
        # Snapshot and registration happen with no await between: no event can slip in.
        self.to_consumers.send((ws,), orjson.dumps(self.snapshot()))
        self.consumers[ws] = None
        log.info("event consumer connected from %s at seq %d", ws.remote_address, self.seq)
        try:
            async for _ in ws:
                pass  # consumers send nothing; reading only keeps the close handshake going
        except ConnectionClosed:
            pass
        finally:
            self.consumers.pop(ws, None)

    # ================================================================= telemetry

    def performance_rows(self) -> list[PerformanceRow]:
        engine = self.engine
        marks = engine.marks()
        tick_values = engine.tick_values
        rows = []
        for trader_id, account in sorted(engine.ledger.accounts.items()):
            positions = account.positions
            rows.append(PerformanceRow(
                trader_id, sum(p.qty for p in positions.values()), account.cash,
                sum(p.realized for p in positions.values()),
                engine.ledger.equity(trader_id, marks),
                sum(p.unrealized(marks[s], tick_values[s]) for s, p in positions.items()),
                sum(p.fees for p in positions.values())))
        return rows

    def write_performance(self) -> None:
        try:
            self.telemetry.write_performance(self.clock.now(), self.performance_rows())
        except OSError:
            log.exception("performance.csv: cannot write")


# ===================================================================== process


async def every(interval_s: float, action: Callable[[], None]) -> None:
    """Run ``action`` every ``interval_s`` seconds until canceled; a failure is logged."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            action()
        except Exception:
            log.exception("periodic %s failed", getattr(action, "__name__", action))


def endpoint_uri(server: Server) -> str:
    host, port = server.sockets[0].getsockname()[:2]
    return f"ws://[{host}]:{port}" if ":" in host else f"ws://{host}:{port}"


async def run(args: argparse.Namespace, exchange: Exchange) -> None:
    options: dict[str, Any] = {"compression": None, "close_timeout": CLOSE_TIMEOUT_S,
                               "max_size": exchange.config.server.max_message_bytes}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    gateway = await serve(exchange.gateway, args.host, args.port, **options)
    events = await serve(exchange.events, args.host, args.events_port, **options)
    print("READY " + json.dumps({"gateway": endpoint_uri(gateway),
                                 "events": endpoint_uri(events)}), flush=True)
    server_config = exchange.config.server
    tasks = [asyncio.create_task(every(server_config.leaderboard_interval_s,
                                       exchange.publish_leaderboard)),
             asyncio.create_task(every(server_config.performance_interval_s,
                                       exchange.write_performance))]
    await stop.wait()
    log.info("shutting down")
    await shutdown(exchange, (gateway, events), tasks)


async def shutdown(exchange: Exchange, servers: tuple[Server, ...],
                   tasks: list[asyncio.Task[None]]) -> None:
    exchange.stopping = True
    for task in tasks:
        task.cancel()
    for server in servers:
        server.server.close()  # stop accepting; open sessions close below
    exchange.write_performance()
    for server in servers:
        server.close()
    try:
        await asyncio.wait_for(asyncio.gather(*(s.wait_closed() for s in servers)),
                               SHUTDOWN_TIMEOUT_S)
    except asyncio.TimeoutError:
        log.warning("some connections did not close within %.0f s", SHUTDOWN_TIMEOUT_S)
    exchange.telemetry.close()


def load_accounts(path: str) -> dict[str, str]:
    """``{"trader_id": "token", ...}``; a problem is a ConfigError naming it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read accounts {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected an object of trader_id -> token")
    for trader_id, token in data.items():
        if not TRADER_ID_RE.fullmatch(trader_id):
            raise ConfigError(f"{path}: {trader_id!r}: not a valid trader_id")
        if not isinstance(token, str) or not token:
            raise ConfigError(f"{path}: {trader_id}: token must be a non-empty string")
    return data


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="OpenMarketSim exchange: order gateway, internal event stream, "
                    "CSV telemetry.")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (%(default)s)")
    parser.add_argument("--port", type=int, default=9001,
                        help="order gateway port; 0 picks a free one (%(default)s)")
    parser.add_argument("--events-port", type=int, default=9002,
                        help="internal event stream port; 0 picks a free one (%(default)s)")
    parser.add_argument("--config", help="exchange config JSON (default: built-in defaults)")
    parser.add_argument("--data-dir", default=".",
                        help="where trades.csv and performance.csv are appended (%(default)s)")
    parser.add_argument("--accounts",
                        help="JSON object trader_id -> token; when given, login needs a token")
    parser.add_argument("--client-buffer", type=int, default=DEFAULT_CLIENT_BUFFER,
                        help="bytes a trader session may leave unsent before it is closed "
                             "as too slow (%(default)s)")
    parser.add_argument("--consumer-buffer", type=int, default=DEFAULT_CONSUMER_BUFFER,
                        help="the same bound for event stream consumers (%(default)s)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="(%(default)s)")
    parser.set_defaults(parser=parser)
    return parser.parse_args(argv)


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop  # optional: a faster event loop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "DEBUG":
        logging.getLogger("websockets").setLevel(logging.WARNING)
    try:
        config = load_config(args.config)
        accounts = load_accounts(args.accounts) if args.accounts else None
    except ConfigError as exc:
        args.parser.exit(2, f"exchange_server: config error: {exc}\n")
    try:
        telemetry = Telemetry(Path(args.data_dir), config.instruments)
    except OSError as exc:
        args.parser.exit(2, f"exchange_server: cannot write telemetry in {args.data_dir}: {exc}\n")
    exchange = Exchange(config, telemetry, accounts, args.client_buffer, args.consumer_buffer)
    try:
        run_loop(run(args, exchange))
    except OSError as exc:
        log.error("cannot serve: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
