"""One trading bot: a strategy (``bot_strategies``) wired to the gateway and the feed.

``BotContext`` is the strategy's view of the world and has no sockets: it keeps the
book replica, the bot's orders (client_order_id -> ``OrderState`` from acks, fills,
cancels, amends and rejects), the position from ``position`` messages, and an outbox
of actions. ``BotClient`` owns the connections: it logs in, subscribes to the feed,
applies every message to the context, calls the strategy's hooks, sends the outbox,
runs the timer, and reconnects with exponential backoff when a connection drops.

Lockstep mode (``lockstep_participants`` set; the exchange runs ``--clock sim``): the
bot joins the exchange's lockstep and takes no feed. Each ``tick`` from the gateway
carries the simulated time and the public market data of the step before (trades, the
L2 book); the bot applies it, runs ``on_trade``/``on_book``/``on_timer`` on simulated
time, sends what the strategy queued (including what it queued on the private replies
that came since the last tick) and then ``step_done``. Everything the strategy sees
arrives on one connection in the exchange's order, so its decisions are a pure
function of its seed and the exchange's outputs. After ``duration_s`` simulated
seconds it leaves the lockstep (``on_stop``, cancel everything, ``lockstep_leave``).
There is no reconnect in this mode: a lost gateway fails the bot.

Crash isolation: a hook that raises is logged with its traceback and the bot is
**stopped** (its actions from that hook are dropped, its open orders canceled, its
connections closed); a strategy in an unknown state should not keep trading. Other
bots are unaffected. Hooks run synchronously on the event loop, so a hook that never
returns blocks every bot of its process; ``bot_battle_runner.py --workers`` puts bots
in separate processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from bot_strategies import (
    BUY,
    SELL,
    Book,
    Depth,
    FillEvent,
    OrderState,
    OrderUpdate,
    TradeEvent,
)

log = logging.getLogger("bot_client")

DEFAULT_EXCHANGE_URI = "ws://127.0.0.1:9001"
DEFAULT_MARKET_DATA_URI = "ws://127.0.0.1:9010"
TIFS = ("gtc", "ioc", "fok")

Hook = tuple[str, Any]  # (hook name, its argument or None)


def wall_clock_us() -> int:
    return time.time_ns() // 1000


def _positive_int(name: str, value: Any) -> int:
    if type(value) is not int or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


# --------------------------------------------------------------------------- context


class BotContext:
    """The ``StrategyContext`` of one bot: state kept from messages, actions to an outbox."""

    def __init__(self, trader_id: str, *, symbol: str = "SIM",
                 params: dict[str, Any] | None = None, seed: int = 0,
                 reference_price: int = 10_000, price_band_pct: float = 10.0,
                 clock: Callable[[], int] = wall_clock_us,
                 logger: logging.Logger | None = None) -> None:
        self.trader_id = trader_id
        self.symbol = symbol
        self.params: dict[str, Any] = dict(params or {})
        self.rng = random.Random(seed)
        self.log = logger or logging.getLogger(f"bot.{trader_id}")
        self.reference_price = reference_price
        self.price_band_pct = price_band_pct
        self.book = Book(symbol)
        self.orders: dict[str, OrderState] = {}  # live orders only
        self.outbox: list[dict[str, Any]] = []
        self.account: dict[str, Any] = {}  # the last `position` message
        self.fills = 0
        self._position = 0
        self._last_trade_price: int | None = None
        self._clock = clock
        self._next_id = 0

    # ------------------------------------------------------------ what strategies read

    @property
    def now(self) -> int:
        return self._clock()

    @property
    def position(self) -> int:
        return self._position

    @property
    def cash(self) -> float | None:
        return self.account.get("cash")

    @property
    def equity(self) -> float | None:
        return self.account.get("equity")

    @property
    def realized_pnl(self) -> float | None:
        return self.account.get("realized_pnl")

    @property
    def open_orders(self) -> dict[str, OrderState]:
        # A copy: strategies often cancel or place orders while iterating.
        return dict(self.orders)

    @property
    def best_bid(self) -> int | None:
        return self.book.best_bid

    @property
    def best_ask(self) -> int | None:
        return self.book.best_ask

    @property
    def last_trade_price(self) -> int | None:
        return self._last_trade_price

    def depth(self, n: int = 5) -> Depth:
        return self.book.depth(n)

    # ------------------------------------------------------------ what strategies do

    def buy(self, qty: int, price: int | None = None, tif: str | None = None,
            post_only: bool = False) -> str:
        return self._new_order(BUY, qty, price, tif, post_only)

    def sell(self, qty: int, price: int | None = None, tif: str | None = None,
             post_only: bool = False) -> str:
        return self._new_order(SELL, qty, price, tif, post_only)

    def cancel(self, client_order_id: str) -> bool:
        order = self.orders.get(client_order_id)
        if order is None or order.cancel_pending:
            return False
        order.cancel_pending = True
        self.outbox.append({"type": "cancel_order", "client_order_id": client_order_id})
        return True

    def cancel_all(self) -> None:
        for order in self.orders.values():
            order.cancel_pending = True
        self.outbox.append({"type": "cancel_all", "symbol": self.symbol})

    def amend(self, client_order_id: str, price: int | None = None,
              qty: int | None = None) -> bool:
        order = self.orders.get(client_order_id)
        if order is None or order.cancel_pending or (price is None and qty is None):
            return False
        message: dict[str, Any] = {"type": "amend_order", "client_order_id": client_order_id}
        if price is not None:
            message["price"] = _positive_int("price", price)
        if qty is not None:
            message["qty"] = _positive_int("qty", qty)
        order.amend_pending = True
        self.outbox.append(message)
        return True

    def _new_order(self, side: str, qty: int, price: int | None, tif: str | None,
                   post_only: bool) -> str:
        # Bad arguments are a strategy bug: raising makes the bot stop with a clear error.
        _positive_int("qty", qty)
        order_type = "market" if price is None else "limit"
        tif = tif or ("ioc" if price is None else "gtc")
        if tif not in TIFS or (price is None and tif == "gtc"):
            raise ValueError(f"tif must be one of {TIFS} (ioc/fok for a market order), "
                             f"got {tif!r}")
        self._next_id += 1
        coid = f"o{self._next_id}"
        message: dict[str, Any] = {"type": "new_order", "client_order_id": coid,
                                   "symbol": self.symbol, "side": side,
                                   "order_type": order_type, "qty": qty, "tif": tif}
        if price is not None:
            message["price"] = _positive_int("price", price)
        if post_only:
            message["post_only"] = True
        self.orders[coid] = OrderState(coid, side, qty, price, tif, post_only, leaves_qty=qty)
        self.outbox.append(message)
        return coid

    # ------------------------------------------------------------ applying messages

    def apply_gateway(self, msg: dict[str, Any]) -> list[Hook]:
        """Update state from a gateway message; the hooks the strategy should get."""
        handler = _GATEWAY_HANDLERS.get(msg.get("type", ""))
        return handler(self, msg) if handler is not None else []

    def apply_feed(self, msg: dict[str, Any]) -> list[Hook]:
        """Update state from a feed message; the hooks the strategy should get."""
        if msg.get("symbol", self.symbol) != self.symbol:
            return []
        kind = msg.get("type")
        if kind == "book_snapshot":
            self.book.apply_snapshot(msg)
            return [("on_book", self.book)]
        if kind == "book_update":
            return [("on_book", self.book)] if self.book.apply_update(msg) else []
        if kind == "trade":
            self._last_trade_price = msg["price"]
            return [("on_trade", _trade_event(msg))]
        return []

    def drop_order(self, client_order_id: str, kind: str, code: str | None = None,
                   message: str | None = None, reason: str | None = None) -> OrderUpdate | None:
        """Forget a live order the exchange no longer has (or never got)."""
        order = self.orders.pop(client_order_id, None)
        if order is None:
            return None
        order.status = "rejected" if kind == "reject" else "canceled"
        return OrderUpdate(kind, client_order_id, order, code, message, reason)

    def _on_ack(self, msg: dict[str, Any]) -> list[Hook]:
        order = self.orders.get(msg["client_order_id"])
        if order is not None and order.status == "pending":
            order.status = "open"
            order.order_id = msg.get("order_id")
            order.leaves_qty = msg.get("leaves_qty", order.leaves_qty)
        return [("on_order_update", _update("ack", msg, order))]

    def _on_reject(self, msg: dict[str, Any]) -> list[Hook]:
        update = self.drop_order(msg["client_order_id"], "reject", msg.get("code"),
                                 msg.get("message"))
        return [("on_order_update", update or _update("reject", msg, None))]

    def _on_fill(self, msg: dict[str, Any]) -> list[Hook]:
        self.fills += 1
        qty, side = msg["qty"], msg["side"]
        # The `position` message follows the fill; count it now so on_fill sees it.
        self._position += qty if side == BUY else -qty
        order = self.orders.get(msg["client_order_id"])
        if order is not None:
            order.filled_qty += qty
            order.leaves_qty = msg["leaves_qty"]
            order.status = "open"
            if order.leaves_qty <= 0:
                order.status = "filled"
                del self.orders[order.client_order_id]
        return [("on_fill", _fill_event(msg))]

    def _on_canceled(self, msg: dict[str, Any]) -> list[Hook]:
        update = self.drop_order(msg["client_order_id"], "canceled", reason=msg.get("reason"))
        return [("on_order_update", update or _update("canceled", msg, None))]

    def _on_amended(self, msg: dict[str, Any]) -> list[Hook]:
        order = self.orders.get(msg["client_order_id"])
        if order is not None:
            order.amend_pending = False
            order.price = msg.get("price", order.price)
            order.qty = msg.get("qty", order.qty)
            order.leaves_qty = msg.get("leaves_qty", order.leaves_qty)
            if order.leaves_qty <= 0:  # amended down to what had already filled
                order.status = "filled"
                del self.orders[order.client_order_id]
        return [("on_order_update", _update("amended", msg, order))]

    def _on_request_reject(self, msg: dict[str, Any]) -> list[Hook]:
        kind = msg["type"].replace("_reject", "")
        order = self.orders.get(msg.get("client_order_id") or "")
        if order is not None:
            setattr(order, f"{kind}_pending", False)
        return [("on_order_update", _update(msg["type"], msg, order))]

    def _on_triggered(self, msg: dict[str, Any]) -> list[Hook]:
        return [("on_order_update", _update("triggered", msg, self.orders.get(
            msg.get("client_order_id") or "")))]

    def _on_position(self, msg: dict[str, Any]) -> list[Hook]:
        if msg.get("symbol", self.symbol) == self.symbol:
            self.account = msg
            self._position = msg.get("position", self._position)
        return []

    def _on_error(self, msg: dict[str, Any]) -> list[Hook]:
        # A malformed new_order may be answered with `error` instead of `order_reject`:
        # its `ref` names the order, which then never existed.
        self.log.warning("exchange error %s: %s (ref %r)", msg.get("code"), msg.get("message"),
                         msg.get("ref"))
        ref = msg.get("ref")
        order = self.orders.get(ref) if isinstance(ref, str) else None
        if order is None or order.status != "pending":
            return []
        update = self.drop_order(order.client_order_id, "reject", msg.get("code"),
                                 msg.get("message"))
        return [("on_order_update", update)]


_GATEWAY_HANDLERS: dict[str, Callable[[BotContext, dict[str, Any]], list[Hook]]] = {
    "order_ack": BotContext._on_ack,
    "order_reject": BotContext._on_reject,
    "fill": BotContext._on_fill,
    "order_canceled": BotContext._on_canceled,
    "order_amended": BotContext._on_amended,
    "cancel_reject": BotContext._on_request_reject,
    "amend_reject": BotContext._on_request_reject,
    "order_triggered": BotContext._on_triggered,
    "position": BotContext._on_position,
    "error": BotContext._on_error,
}


def _update(kind: str, msg: dict[str, Any], order: OrderState | None) -> OrderUpdate:
    coid = msg.get("client_order_id")
    return OrderUpdate(kind, coid if isinstance(coid, str) else None, order, msg.get("code"),
                       msg.get("message"), msg.get("reason"), msg)


def _trade_event(msg: dict[str, Any]) -> TradeEvent:
    return TradeEvent(msg.get("symbol", ""), msg["price"], msg["qty"], msg.get("aggressor", ""),
                      msg.get("buy_trader", ""), msg.get("sell_trader", ""),
                      msg.get("trade_id", 0), msg.get("ts", 0), msg.get("seq", 0))


def _fill_event(msg: dict[str, Any]) -> FillEvent:
    return FillEvent(msg["client_order_id"], msg["side"], msg["price"], msg["qty"],
                     msg["leaves_qty"], msg.get("liquidity", "taker"), msg.get("fee", 0.0),
                     msg.get("order_id"), msg.get("trade_id", 0), msg.get("symbol", ""),
                     msg.get("ts", 0))


# --------------------------------------------------------------------------- client


class LoginRefused(Exception):
    """The exchange answered the login with an error: retrying will not help."""


@dataclass
class BotResult:
    trader_id: str
    strategy: str
    status: str  # stopped, crashed, failed
    fills: int = 0
    position: int = 0
    cash: float | None = None
    realized_pnl: float | None = None
    equity: float | None = None
    logged_in: bool = False
    error: str | None = None
    sim_seconds: float = 0.0  # lockstep: simulated time from its first tick to its last


# Errors after which a connection is worth retrying.
_RETRYABLE = (OSError, asyncio.TimeoutError, ConnectionClosed, InvalidHandshake)


class BotClient:
    """Runs one strategy against the exchange until ``stop()`` (or a crash)."""

    def __init__(self, ctx: BotContext, strategy: Any, *,
                 exchange_uri: str = DEFAULT_EXCHANGE_URI,
                 market_data_uri: str = DEFAULT_MARKET_DATA_URI,
                 timer_interval_s: float = 1.0, token: str | None = None,
                 backoff_initial_s: float = 0.2, backoff_max_s: float = 5.0,
                 start_wait_s: float = 2.0, stop_timeout_s: float = 3.0,
                 lockstep_participants: int | None = None, duration_s: float = 0.0,
                 lockstep_start_timeout_s: float = 60.0,
                 leave_timeout_s: float = 10.0) -> None:
        self.ctx = ctx
        self.strategy = strategy
        self.exchange_uri = exchange_uri
        self.market_data_uri = market_data_uri
        self.timer_interval_s = timer_interval_s
        self.token = token
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.start_wait_s = start_wait_s
        self.stop_timeout_s = stop_timeout_s
        self.log = ctx.log
        self.status = "starting"  # -> running -> stopping -> stopped | crashed | failed
        self.error: str | None = None
        self.logged_in = False
        self._stop = asyncio.Event()
        self._book_ready = asyncio.Event()
        self._pong = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._ws: ClientConnection | None = None
        self._reconcile_ids: set[str] | None = None
        self._timer_task: asyncio.Task[None] | None = None
        # Backoff jitter has its own generator: it must not disturb the strategy's rng.
        self._jitter = random.Random(f"backoff/{ctx.trader_id}")
        # lockstep mode: simulated time comes from the ticks
        self.lockstep_participants = lockstep_participants
        self.duration_us = round(duration_s * 1_000_000)
        self.lockstep_start_timeout_s = lockstep_start_timeout_s
        self.leave_timeout_s = leave_timeout_s
        self.sim_now = 0  # the last tick's ts
        self._sim_start: int | None = None
        self._next_timer = 0
        self._joined = False
        self._leaving = False
        self._left = asyncio.Event()
        self._started = asyncio.Event()
        if lockstep_participants is not None:
            ctx._clock = self._sim_clock  # ctx.now is simulated time

    @property
    def lockstep(self) -> bool:
        return self.lockstep_participants is not None

    def _sim_clock(self) -> int:
        return self.sim_now

    @property
    def alive(self) -> bool:
        return self.status in ("starting", "running")

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> BotResult:
        tasks = [asyncio.create_task(self._guard(self._gateway_loop()))]
        if not self.lockstep:  # lockstep bots get their market data with the ticks
            tasks.append(asyncio.create_task(self._guard(self._feed_loop())))
        try:
            await self._stop.wait()
            await self._shutdown()
        finally:
            if self._timer_task is not None:
                tasks.append(self._timer_task)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return self.result()

    def result(self) -> BotResult:
        ctx = self.ctx
        sim_seconds = 0.0 if self._sim_start is None else (
            (self.sim_now - self._sim_start) / 1_000_000)
        return BotResult(ctx.trader_id, type(self.strategy).__name__, self.status, ctx.fills,
                         ctx.position, ctx.cash, ctx.realized_pnl, ctx.equity,
                         self.logged_in, self.error, sim_seconds)

    # ------------------------------------------------------------ hooks and sending

    def call(self, hook: str, *args: Any) -> None:
        """Call a strategy hook; a hook that raises stops this bot (see module doc)."""
        if self.status != "running":
            return
        method = getattr(self.strategy, hook, None)
        if method is None:
            return
        try:
            method(self.ctx, *args)
        except (Exception, SystemExit) as exc:
            self.log.exception("strategy %s raised in %s; stopping bot %s and canceling its "
                               "orders", type(self.strategy).__name__, hook, self.ctx.trader_id)
            self.status = "crashed"
            self.error = f"{hook}: {type(exc).__name__}: {exc}"
            self.ctx.outbox.clear()  # what a failing hook queued is suspect
            self._stop.set()

    def _dispatch(self, hooks: list[Hook]) -> None:
        for hook, arg in hooks:
            self.call(hook, arg)

    async def flush(self) -> None:
        """Send the outbox in order; what cannot be sent is dropped (orders rejected)."""
        dropped: list[Hook] = []
        async with self._send_lock:  # a fair lock: outbox order is wire order
            while self.ctx.outbox:
                message = self.ctx.outbox.pop(0)
                ws = self._ws
                try:
                    if ws is None:
                        raise ConnectionError("not connected")
                    await ws.send(orjson.dumps(message).decode())
                except (ConnectionError, ConnectionClosed):
                    dropped.extend(self._drop(message))
        # Told after the loop: what the strategy does about it waits for the next event,
        # so a strategy that resubmits on reject cannot spin while disconnected.
        self._dispatch(dropped)

    def _drop(self, message: dict[str, Any]) -> list[Hook]:
        coid = message.get("client_order_id")
        order = self.ctx.orders.get(coid) if isinstance(coid, str) else None
        if order is None:
            return []
        if message["type"] == "new_order":
            return [("on_order_update", self.ctx.drop_order(
                order.client_order_id, "reject", "NOT_CONNECTED", "not connected"))]
        order.cancel_pending = order.amend_pending = False
        return []

    # ------------------------------------------------------------ gateway

    async def _gateway_loop(self) -> None:
        backoff = self.backoff_initial_s
        while not self._stop.is_set():
            try:
                async with connect(self.exchange_uri, compression=None, open_timeout=5,
                                   close_timeout=2) as ws:
                    await self._login(ws)
                    backoff = self.backoff_initial_s
                    self._ws = ws
                    await self._on_logged_in()
                    async for raw in ws:
                        await self._on_gateway_frame(raw)
                if self.lockstep and not self._stop.is_set():
                    raise ConnectionError("the exchange closed the connection")
            except (LoginRefused, InvalidURI) as exc:
                self._fail(f"cannot log in at {self.exchange_uri}: {exc}")
                return
            except _RETRYABLE as exc:
                self.error = f"gateway {self.exchange_uri}: {exc or type(exc).__name__}"
                if self.lockstep and not self._stop.is_set():
                    # a step's inputs may have been lost: no determinism to resume with
                    self._fail(f"lockstep: lost the gateway: {self.error}")
                    return
                if not self._stop.is_set():
                    self._log_retry(backoff, "%s; reconnecting in %.1fs", self.error, backoff)
            finally:
                self._ws = None
            if await self._wait_stop(backoff * (1 + self._jitter.random() / 2)):
                return
            backoff = min(backoff * 2, self.backoff_max_s)

    async def _login(self, ws: ClientConnection) -> None:
        login: dict[str, Any] = {"type": "login", "trader_id": self.ctx.trader_id}
        if self.token is not None:
            login["token"] = self.token
        await ws.send(orjson.dumps(login).decode())
        while True:
            msg = orjson.loads(await asyncio.wait_for(ws.recv(), 5.0))
            if msg.get("type") == "login_ack":
                return
            if msg.get("type") == "error":
                raise LoginRefused(f"{msg.get('code')}: {msg.get('message')}")

    async def _on_logged_in(self) -> None:
        self.ctx.outbox.append({"type": "get_position", "symbol": self.ctx.symbol})
        if self.lockstep:
            self.logged_in = True
            self.error = None
            self.ctx.outbox.append({"type": "lockstep_join",
                                    "participants": self.lockstep_participants})
            await self.flush()
            self._timer_task = asyncio.create_task(self._guard(self._await_first_tick()))
            return
        if self.logged_in:
            # A reconnect: orders may have been canceled while we were away; ask.
            self.log.info("reconnected to %s", self.exchange_uri)
            self._reconcile_ids = set(self.ctx.orders)
            self.ctx.outbox.append({"type": "get_open_orders", "symbol": self.ctx.symbol})
            await self.flush()
            return
        self.logged_in = True
        self.error = None
        with contextlib.suppress(asyncio.TimeoutError):
            # Start with a book when the feed is up; trade without one when it is not.
            await asyncio.wait_for(self._book_ready.wait(), self.start_wait_s)
        if self.status == "starting" and not self._stop.is_set():
            self.status = "running"
            self.call("on_start")
            self._timer_task = asyncio.create_task(self._guard(self._timer_loop()))
        await self.flush()

    async def _on_gateway_frame(self, raw: str | bytes) -> None:
        try:
            msg = orjson.loads(raw)
            if self.lockstep and self._on_lockstep_message(msg):
                if msg["type"] == "tick":
                    await self._on_tick(msg)
                return
            if msg.get("type") == "pong":
                self._pong.set()
            elif msg.get("type") == "open_orders":
                self._reconcile(msg)
            hooks = self.ctx.apply_gateway(msg)
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError) as exc:
            self.log.warning("ignoring malformed gateway message %.200r: %r", raw, exc)
            return
        self._dispatch(hooks)
        if not self.lockstep:  # lockstep: what the hooks queued goes out with the next step
            await self.flush()

    def _reconcile(self, msg: dict[str, Any]) -> None:
        ids, self._reconcile_ids = self._reconcile_ids, None
        if ids is None:
            return
        alive = {o.get("client_order_id") for o in msg.get("orders", [])}
        for coid in sorted(ids - alive):
            update = self.ctx.drop_order(coid, "canceled", reason="disconnect")
            if update is not None:
                self.call("on_order_update", update)

    # ------------------------------------------------------------ lockstep

    def _on_lockstep_message(self, msg: dict[str, Any]) -> bool:
        """Handle a lockstep control message; True when ``msg`` was one (a tick is
        left to ``_on_tick``)."""
        kind = msg.get("type")
        if kind == "tick":
            return True
        if kind == "lockstep_joined":
            self._joined = True
            self.log.debug("joined the lockstep: %s", msg)
            return True
        if kind == "lockstep_left":
            self._left.set()
            return True
        code = msg.get("code")
        if kind == "error" and isinstance(code, str) and code.startswith("LOCKSTEP_"):
            self._fail(f"lockstep: {code}: {msg.get('message')}")
            return True
        return False

    async def _await_first_tick(self) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._started.wait(), self.lockstep_start_timeout_s)
        if not self._started.is_set() and not self._stop.is_set():
            self._fail(f"lockstep: no tick within {self.lockstep_start_timeout_s:.0f} s of "
                       f"joining ({self.lockstep_participants} participants expected)")

    async def _on_tick(self, msg: dict[str, Any]) -> None:
        """One step: market data, hooks on simulated time, then this step's inputs."""
        if self._leaving or self._stop.is_set():
            return
        ts = msg["ts"]
        self.sim_now = ts
        ctx = self.ctx
        first = self._sim_start is None
        if first:
            self._sim_start = ts
            self._next_timer = ts + round(self.timer_interval_s * 1_000_000)
            self._started.set()
        start = self._sim_start if self._sim_start is not None else ts
        hooks: list[Hook] = []
        for trade in msg.get("trades", ()):
            hooks.extend(ctx.apply_feed(trade))
        book_changed = self._apply_tick_book(msg)
        if first:
            self.status = "running"
            self.call("on_start")
        else:
            self._dispatch(hooks)
            if book_changed:
                self.call("on_book", ctx.book)
        if ts >= self._next_timer:
            interval = max(1, round(self.timer_interval_s * 1_000_000))
            self._next_timer += ((ts - self._next_timer) // interval + 1) * interval
            self.call("on_timer")
        if self.duration_us and ts - start >= self.duration_us:
            self._stop.set()  # _shutdown sends this step's last inputs and leaves
        if self._stop.is_set():
            return
        ctx.outbox.append({"type": "step_done", "step": msg["step"]})
        await self.flush()

    def _apply_tick_book(self, msg: dict[str, Any]) -> bool:
        """Take the tick's L2 book of our symbol; True when it changed."""
        book = msg.get("books", {}).get(self.ctx.symbol)
        if book is None:
            return False
        bids = {price: qty for price, qty in book.get("bids", ())}
        asks = {price: qty for price, qty in book.get("asks", ())}
        replica = self.ctx.book
        if replica.ready and replica.bids == bids and replica.asks == asks:
            return False
        replica.apply_snapshot({"bids": book.get("bids", ()), "asks": book.get("asks", ()),
                                "seq": msg.get("seq", 0)})
        return True

    # ------------------------------------------------------------ feed

    async def _feed_loop(self) -> None:
        backoff = self.backoff_initial_s
        subscribe = {"type": "subscribe", "channels": ["book", "trades"],
                     "symbols": [self.ctx.symbol], "depth": 10, "batch": True}
        while not self._stop.is_set():
            try:
                async with connect(self.market_data_uri, compression=None, open_timeout=5,
                                   close_timeout=2, max_size=None) as ws:
                    await ws.send(orjson.dumps(subscribe).decode())
                    backoff = self.backoff_initial_s
                    async for raw in ws:
                        await self._on_feed_frame(raw)
            except InvalidURI as exc:
                self.log.error("bad market data uri %s: %s; trading without a feed",
                               self.market_data_uri, exc)
                return
            except _RETRYABLE as exc:
                if not self._stop.is_set():
                    self._log_retry(backoff, "feed %s: %s; reconnecting in %.1fs",
                                    self.market_data_uri, exc or type(exc).__name__, backoff)
            # A new connection starts with a fresh snapshot; never trade on a stale book.
            self.ctx.book.clear()
            if await self._wait_stop(backoff * (1 + self._jitter.random() / 2)):
                return
            backoff = min(backoff * 2, self.backoff_max_s)

    async def _on_feed_frame(self, raw: str | bytes) -> None:
        try:
            decoded = orjson.loads(raw)
            messages = decoded if isinstance(decoded, list) else [decoded]
            hooks: list[Hook] = []
            for msg in messages:
                hooks.extend(self.ctx.apply_feed(msg))
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError) as exc:
            self.log.warning("ignoring malformed feed message %.200r: %r", raw, exc)
            return
        if self.ctx.book.ready:
            self._book_ready.set()
        if self._ws is None:
            return  # not logged in: the strategy could not act on it anyway
        # One on_book per frame, after its trades: a batch is one coherent change.
        book_changed = any(hook == "on_book" for hook, _ in hooks)
        self._dispatch([h for h in hooks if h[0] != "on_book"])
        if book_changed:
            self.call("on_book", self.ctx.book)
        await self.flush()

    # ------------------------------------------------------------ timer and stopping

    async def _timer_loop(self) -> None:
        while not await self._wait_stop(self.timer_interval_s):
            if self._ws is not None:
                self.call("on_timer")
                await self.flush()

    def _log_retry(self, backoff: float, fmt: str, *args: Any) -> None:
        # The first failure of a run of them is news; the retries that follow are not.
        level = logging.WARNING if backoff == self.backoff_initial_s else logging.DEBUG
        self.log.log(level, fmt, *args)

    async def _wait_stop(self, seconds: float) -> bool:
        """Wait up to ``seconds``; True when the bot was told to stop meanwhile."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
        return self._stop.is_set()

    async def _guard(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run one of the bot's loops; a bug in it fails this bot, not the process."""
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.log.exception("bot %s failed", self.ctx.trader_id)
            self._fail(f"internal error: {exc!r}")

    def _fail(self, error: str) -> None:
        self.log.error("bot %s: %s", self.ctx.trader_id, error)
        self.status = "failed"
        self.error = error
        self._stop.set()

    async def _shutdown(self) -> None:
        """on_stop, then cancel every order and read the final position."""
        if self.status == "running":
            self.call("on_stop")
        if self.status in ("running", "starting"):
            self.status = "stopped"
        ws = self._ws
        if ws is None:
            return
        self.ctx.cancel_all()
        if self._joined and not self._leaving:
            # the cancel and whatever on_stop sent are this step's last inputs
            self._leaving = True
            self.ctx.outbox.append({"type": "lockstep_leave"})
            await self.flush()
            try:
                await asyncio.wait_for(self._left.wait(), self.leave_timeout_s)
            except asyncio.TimeoutError:
                self.log.warning("the exchange did not confirm lockstep_leave")
        self.ctx.outbox.append({"type": "get_position", "symbol": self.ctx.symbol})
        self.ctx.outbox.append({"type": "ping"})
        self._pong.clear()
        await self.flush()
        try:
            # Replies come in order: after the pong, the cancels and position are in.
            await asyncio.wait_for(self._pong.wait(), self.stop_timeout_s)
        except asyncio.TimeoutError:
            self.log.warning("no reply to the final ping; position may be stale")
        await ws.close()
