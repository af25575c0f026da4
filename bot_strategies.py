"""Trading strategies for OpenMarketSim bots, and the API they are written against.

A strategy is a plain class with synchronous hooks, each called with the bot's
``StrategyContext`` first::

    on_start(ctx)                  logged in (and the book replica is ready, if the feed is up)
    on_book(ctx, book)             the book replica changed (a ``Book``)
    on_trade(ctx, trade)           a public trade printed (a ``TradeEvent``)
    on_fill(ctx, fill)             one of this bot's orders executed (a ``FillEvent``)
    on_order_update(ctx, update)   ack, reject, cancel, amend, trigger (an ``OrderUpdate``)
    on_timer(ctx)                  every ``timer_interval_s``
    on_stop(ctx)                   the battle is ending; open orders are canceled after it

Strategies never touch sockets: they read the context and act through it
(``ctx.buy``, ``ctx.sell``, ``ctx.cancel``, ``ctx.cancel_all``, ``ctx.amend``); the bot
client sends the actions when the hook returns. Prices are integer ticks, quantities
integer lots. A strategy decides only from its inputs (the hook arguments and the
context, including ``ctx.now``) and ``ctx.rng``, a ``random.Random`` seeded per bot: it
never reads the wall clock or the global ``random``, so a seed and an input sequence
always produce the same actions.

Parameters come from the bot's ``params`` in the battle config. A strategy declares
them with defaults in ``PARAMS``; unknown names and wrong types are config errors, and
``ctx.params`` holds the defaults merged with the configured values.
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

BUY = "buy"
SELL = "sell"


# --------------------------------------------------------------------------- data


@dataclass(slots=True)
class OrderState:
    """What the bot knows about one of its own orders."""

    client_order_id: str
    side: str
    qty: int  # total quantity, as last amended
    price: int | None  # None for a market order
    tif: str = "gtc"
    post_only: bool = False
    order_id: int | None = None  # exchange id, known from the ack
    leaves_qty: int = 0
    filled_qty: int = 0
    status: str = "pending"  # pending -> open -> filled | canceled | rejected
    cancel_pending: bool = False
    amend_pending: bool = False

    @property
    def is_live(self) -> bool:
        return self.status in ("pending", "open")


@dataclass(slots=True)
class TradeEvent:
    """A public trade from the feed."""

    symbol: str
    price: int
    qty: int
    aggressor: str
    buy_trader: str = ""
    sell_trader: str = ""
    trade_id: int = 0
    ts: int = 0
    seq: int = 0


@dataclass(slots=True)
class FillEvent:
    """One execution of this bot's order."""

    client_order_id: str
    side: str
    price: int
    qty: int
    leaves_qty: int
    liquidity: str = "taker"
    fee: float = 0.0
    order_id: int | None = None
    trade_id: int = 0
    symbol: str = ""
    ts: int = 0


@dataclass(slots=True)
class OrderUpdate:
    """Anything else that happened to one of this bot's orders.

    ``kind`` is one of ``ack``, ``reject``, ``canceled``, ``amended``, ``triggered``,
    ``cancel_reject``, ``amend_reject``. ``order`` is the order's state after the
    update (None when the id is not one this bot tracks).
    """

    kind: str
    client_order_id: str | None
    order: OrderState | None = None
    code: str | None = None
    message: str | None = None
    reason: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)


class Depth(NamedTuple):
    bids: list[tuple[int, int]]  # (price, qty), best first
    asks: list[tuple[int, int]]


class Book:
    """An L2 replica of one symbol's book, kept from the feed's snapshots and updates."""

    def __init__(self, symbol: str) -> None:
        self.symbol = symbol
        self.bids: dict[int, int] = {}
        self.asks: dict[int, int] = {}
        self.seq = 0
        self.ready = False  # a snapshot has been applied

    def apply_snapshot(self, message: Mapping[str, Any]) -> None:
        self.bids = {int(p): int(q) for p, q in message.get("bids", ()) if q > 0}
        self.asks = {int(p): int(q) for p, q in message.get("asks", ()) if q > 0}
        self.seq = int(message.get("seq", 0))
        self.ready = True

    def apply_update(self, message: Mapping[str, Any]) -> bool:
        """Apply a ``book_update``; False when it is stale or no snapshot came yet."""
        seq = int(message.get("seq", 0))
        if not self.ready or seq <= self.seq:
            return False
        _apply_levels(self.bids, message.get("bids", ()))
        _apply_levels(self.asks, message.get("asks", ()))
        self.seq = seq
        return True

    def clear(self) -> None:
        self.bids.clear()
        self.asks.clear()
        self.seq = 0
        self.ready = False

    @property
    def best_bid(self) -> int | None:
        return max(self.bids) if self.bids else None

    @property
    def best_ask(self) -> int | None:
        return min(self.asks) if self.asks else None

    @property
    def mid(self) -> float | None:
        bid, ask = self.best_bid, self.best_ask
        return None if bid is None or ask is None else (bid + ask) / 2

    def depth(self, n: int = 5) -> Depth:
        bids = sorted(self.bids.items(), reverse=True)[:n]
        asks = sorted(self.asks.items())[:n]
        return Depth(bids, asks)


def _apply_levels(levels: dict[int, int], changes: Any) -> None:
    for price, qty in changes:
        if qty > 0:
            levels[int(price)] = int(qty)
        else:
            levels.pop(int(price), None)


# --------------------------------------------------------------------------- context


@runtime_checkable
class StrategyContext(Protocol):
    """What a strategy sees and acts through. ``bot_client.BotContext`` implements it."""

    trader_id: str
    symbol: str
    params: dict[str, Any]
    rng: random.Random
    log: logging.Logger
    reference_price: int  # the fair price to assume before any trade (ticks)
    price_band_pct: float  # the exchange's price band around the last trade

    @property
    def now(self) -> int:
        """Microseconds since the epoch, as the client sees it."""
        ...

    @property
    def position(self) -> int: ...

    @property
    def cash(self) -> float | None: ...

    @property
    def equity(self) -> float | None: ...

    @property
    def realized_pnl(self) -> float | None: ...

    @property
    def open_orders(self) -> dict[str, OrderState]:
        """Live orders (sent and not yet done) by client_order_id; a copy."""
        ...

    @property
    def best_bid(self) -> int | None: ...

    @property
    def best_ask(self) -> int | None: ...

    @property
    def last_trade_price(self) -> int | None: ...

    def depth(self, n: int = 5) -> Depth: ...

    def buy(self, qty: int, price: int | None = None, tif: str | None = None,
            post_only: bool = False) -> str:
        """Send a buy (a market order when ``price`` is None); returns its client_order_id."""
        ...

    def sell(self, qty: int, price: int | None = None, tif: str | None = None,
             post_only: bool = False) -> str: ...

    def cancel(self, client_order_id: str) -> bool:
        """Ask to cancel a live order; False when it is not live or already canceling."""
        ...

    def cancel_all(self) -> None: ...

    def amend(self, client_order_id: str, price: int | None = None,
              qty: int | None = None) -> bool:
        """Ask to change a live order's price and/or total qty; False when not possible."""
        ...


# --------------------------------------------------------------------------- helpers


def fair_price(ctx: StrategyContext) -> int:
    """Best guess of value: the mid when two-sided, else the last trade, else the reference."""
    bid, ask = ctx.best_bid, ctx.best_ask
    if bid is not None and ask is not None:
        return (bid + ask) // 2
    if ctx.last_trade_price is not None:
        return ctx.last_trade_price
    return ctx.reference_price


def band_limits(ctx: StrategyContext) -> tuple[int, int]:
    """The exchange's price band as the bot can see it (centred on the last trade)."""
    centre = ctx.last_trade_price or ctx.reference_price
    band = centre * round(ctx.price_band_pct * 100) // 10_000
    return max(1, centre - band), centre + band


def clamp_price(ctx: StrategyContext, price: float) -> int:
    """A price rounded to a tick and pulled inside the band, so it is not rejected."""
    low, high = band_limits(ctx)
    return min(high, max(low, round(price)))


def submit(ctx: StrategyContext, side: str, qty: int, price: int | None = None,
           tif: str | None = None, post_only: bool = False) -> str:
    action = ctx.buy if side == BUY else ctx.sell
    return action(qty, price, tif, post_only)


def aggressive_price(ctx: StrategyContext, side: str, slippage: int) -> int:
    """A marketable limit: through the opposite touch by ``slippage`` ticks, inside the band."""
    touch = ctx.best_ask if side == BUY else ctx.best_bid
    base = touch if touch is not None else fair_price(ctx)
    return clamp_price(ctx, base + slippage if side == BUY else base - slippage)


class ParamError(ValueError):
    """A bad strategy parameter; ``key`` names it so the config error can too."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


def _check_type(key: str, value: Any, default: Any) -> Any:
    kind = type(default)
    if kind is bool:
        ok = type(value) is bool
    elif kind is int:
        ok = type(value) is int
    elif kind is float:
        ok = type(value) in (int, float)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ParamError(key, f"expected {kind.__name__}, got {value!r}")
    return value


def require_positive(params: Mapping[str, Any], *keys: str) -> None:
    for key in keys:
        if params[key] <= 0:
            raise ParamError(key, f"must be positive, got {params[key]!r}")


# --------------------------------------------------------------------------- base


class Strategy:
    """Base class: every hook is a no-op, so a strategy overrides only what it needs.

    Subclasses may declare ``PARAMS`` (name -> default) and override ``check_params``
    for range checks; both run when the battle config is loaded.
    """

    PARAMS: ClassVar[dict[str, Any]] = {}

    @classmethod
    def resolve_params(cls, params: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults merged with ``params``; raises ``ParamError`` naming a bad key."""
        if not cls.PARAMS:  # a strategy that declares nothing takes anything
            return dict(params)
        merged = dict(cls.PARAMS)
        for key, value in params.items():
            if key not in cls.PARAMS:
                known = ", ".join(sorted(cls.PARAMS))
                raise ParamError(key, f"unknown parameter for {cls.__name__} (known: {known})")
            merged[key] = _check_type(key, value, cls.PARAMS[key])
        cls.check_params(merged)
        return merged

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        """Range checks; raise ``ParamError``."""

    def on_start(self, ctx: StrategyContext) -> None:
        pass

    def on_book(self, ctx: StrategyContext, book: Book) -> None:
        pass

    def on_trade(self, ctx: StrategyContext, trade: TradeEvent) -> None:
        pass

    def on_fill(self, ctx: StrategyContext, fill: FillEvent) -> None:
        pass

    def on_order_update(self, ctx: StrategyContext, update: OrderUpdate) -> None:
        pass

    def on_timer(self, ctx: StrategyContext) -> None:
        pass

    def on_stop(self, ctx: StrategyContext) -> None:
        pass


# --------------------------------------------------------------------------- market maker


class MarketMaker(Strategy):
    """Two-sided post-only quotes around a fair price, skewed against inventory.

    Fair starts at the book's mid (or the configured reference price when the book is
    empty, so it quotes into an empty market) and follows trades as an EMA. Long
    inventory lowers both quotes (sell more, buy less); at ``max_inventory`` it stops
    quoting the side that would add to it. Quotes are amended in place, and only when
    the target moved, so book updates do not cause churn.
    """

    PARAMS: ClassVar[dict[str, Any]] = {
        "size": 10,
        "levels": 2,
        "half_spread": 5,
        "level_spacing": 3,
        "skew_per_lot": 0.1,  # ticks of quote shift per lot of inventory
        "max_inventory": 200,
        "fair_alpha": 0.3,  # EMA weight of each trade price
        "spread_jitter": 2,  # random extra half-spread per instance, so makers differ
    }

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        require_positive(params, "size", "levels", "half_spread", "max_inventory")
        if not 0 < params["fair_alpha"] <= 1:
            raise ParamError("fair_alpha", "must be in (0, 1]")
        if params["level_spacing"] < 1 or params["spread_jitter"] < 0:
            raise ParamError("level_spacing", "must be >= 1 (and spread_jitter >= 0)")

    def __init__(self) -> None:
        self.fair: float | None = None
        self.half_spread = 0
        self.slots: dict[tuple[str, int], str] = {}  # (side, level) -> client_order_id

    def on_start(self, ctx: StrategyContext) -> None:
        p = ctx.params
        self.half_spread = p["half_spread"] + ctx.rng.randint(0, p["spread_jitter"])
        self.fair = float(fair_price(ctx))
        self.requote(ctx)

    def on_trade(self, ctx: StrategyContext, trade: TradeEvent) -> None:
        alpha = ctx.params["fair_alpha"]
        fair = self.fair if self.fair is not None else float(trade.price)
        self.fair = fair + alpha * (trade.price - fair)
        self.requote(ctx)

    def on_book(self, ctx: StrategyContext, book: Book) -> None:
        self.requote(ctx)

    def on_fill(self, ctx: StrategyContext, fill: FillEvent) -> None:
        self.requote(ctx)

    def on_timer(self, ctx: StrategyContext) -> None:
        self.requote(ctx)

    def targets(self, ctx: StrategyContext) -> dict[tuple[str, int], int | None]:
        """Desired price per quote slot; None means the slot should be empty."""
        p = ctx.params
        fair = self.fair if self.fair is not None else float(fair_price(ctx))
        centre = fair - ctx.position * p["skew_per_lot"]
        out: dict[tuple[str, int], int | None] = {}
        for level in range(p["levels"]):
            offset = self.half_spread + level * p["level_spacing"]
            bid, ask = math.floor(centre - offset), math.ceil(centre + offset)
            # Stay behind the opposite touch: post-only quotes that cross are rejected.
            if ctx.best_ask is not None:
                bid = min(bid, ctx.best_ask - 1)
            if ctx.best_bid is not None:
                ask = max(ask, ctx.best_bid + 1)
            long_full = ctx.position >= p["max_inventory"]
            short_full = ctx.position <= -p["max_inventory"]
            out[(BUY, level)] = None if long_full else clamp_price(ctx, bid)
            out[(SELL, level)] = None if short_full else clamp_price(ctx, ask)
        return out

    def requote(self, ctx: StrategyContext) -> None:
        live = ctx.open_orders
        for slot, price in self.targets(ctx).items():
            coid = self.slots.get(slot)
            order = live.get(coid) if coid is not None else None
            if order is None:
                if price is not None:
                    self.slots[slot] = submit(ctx, slot[0], ctx.params["size"], price,
                                              post_only=True)
            elif order.status == "open" and not (order.cancel_pending or order.amend_pending):
                if price is None:
                    ctx.cancel(order.client_order_id)
                elif price != order.price:
                    ctx.amend(order.client_order_id, price=price)


# --------------------------------------------------------------------------- noise


class NoiseTrader(Strategy):
    """Random orders on the timer: some marketable, most resting near the fair price."""

    PARAMS: ClassVar[dict[str, Any]] = {
        "trade_probability": 0.5,  # chance of an order on each timer tick
        "market_ratio": 0.3,  # share of orders that take liquidity
        "max_qty": 5,
        "max_offset": 10,  # ticks a resting order sits away from fair, at most
        "max_open_orders": 4,  # the oldest is canceled beyond this
        "max_position": 100,  # beyond this it only trades to reduce
    }

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        require_positive(params, "max_qty", "max_offset", "max_open_orders", "max_position")
        for key in ("trade_probability", "market_ratio"):
            if not 0 <= params[key] <= 1:
                raise ParamError(key, "must be between 0 and 1")

    def __init__(self) -> None:
        self.order_ids: deque[str] = deque()  # oldest first

    def on_timer(self, ctx: StrategyContext) -> None:
        p = ctx.params
        self._trim(ctx)
        if ctx.rng.random() >= p["trade_probability"]:
            return
        side = self._pick_side(ctx)
        qty = ctx.rng.randint(1, p["max_qty"])
        if ctx.rng.random() < p["market_ratio"]:
            self.order_ids.append(submit(ctx, side, qty, aggressive_price(ctx, side, 5), "ioc"))
            return
        offset = ctx.rng.randint(1, p["max_offset"])
        fair = fair_price(ctx)
        price = fair - offset if side == BUY else fair + offset
        self.order_ids.append(submit(ctx, side, qty, clamp_price(ctx, price)))

    def _pick_side(self, ctx: StrategyContext) -> str:
        limit = ctx.params["max_position"]
        if ctx.position >= limit:
            return SELL
        if ctx.position <= -limit:
            return BUY
        return BUY if ctx.rng.random() < 0.5 else SELL

    def _trim(self, ctx: StrategyContext) -> None:
        live = ctx.open_orders
        self.order_ids = deque(c for c in self.order_ids if c in live)
        while len(self.order_ids) > ctx.params["max_open_orders"]:
            ctx.cancel(self.order_ids.popleft())


# --------------------------------------------------------------------------- price samplers


class _Sampler(Strategy):
    """Samples the price on each timer tick into a bounded window."""

    window_param = "window"

    def __init__(self) -> None:
        self.prices: deque[float] = deque()

    def sample(self, ctx: StrategyContext) -> bool:
        """Record the current price; False when there is none yet."""
        price: float | None = ctx.last_trade_price
        if price is None:
            bid, ask = ctx.best_bid, ctx.best_ask
            price = None if bid is None or ask is None else (bid + ask) / 2
        if price is None:
            return False
        self.prices.append(float(price))
        while len(self.prices) > ctx.params[self.window_param]:
            self.prices.popleft()
        return True

    def take(self, ctx: StrategyContext, side: str, qty: int) -> str:
        slippage = ctx.params["slippage_ticks"]
        return submit(ctx, side, qty, aggressive_price(ctx, side, slippage), "ioc")


class MomentumTrader(_Sampler):
    """Trend follower: buys when the fast average is above the slow one, sells below."""

    PARAMS: ClassVar[dict[str, Any]] = {
        "fast_window": 5,
        "slow_window": 20,
        "threshold_ticks": 2.0,
        "qty": 5,
        "max_position": 50,
        "cooldown_ticks": 3,  # timer ticks to wait after trading
        "slippage_ticks": 3,
    }
    window_param = "slow_window"

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        require_positive(params, "fast_window", "slow_window", "qty", "max_position")
        if params["fast_window"] >= params["slow_window"]:
            raise ParamError("fast_window", "must be smaller than slow_window")

    def __init__(self) -> None:
        super().__init__()
        self.cooldown = 0

    def on_timer(self, ctx: StrategyContext) -> None:
        p = ctx.params
        if not self.sample(ctx) or len(self.prices) < p["slow_window"]:
            return
        if self.cooldown > 0:
            self.cooldown -= 1
            return
        fast = sum(list(self.prices)[-p["fast_window"]:]) / p["fast_window"]
        slow = sum(self.prices) / len(self.prices)
        signal = fast - slow
        if signal > p["threshold_ticks"] and ctx.position < p["max_position"]:
            self.take(ctx, BUY, p["qty"])
            self.cooldown = p["cooldown_ticks"]
        elif signal < -p["threshold_ticks"] and ctx.position > -p["max_position"]:
            self.take(ctx, SELL, p["qty"])
            self.cooldown = p["cooldown_ticks"]


class MeanReversionTrader(_Sampler):
    """Fades moves: sells when the price is ``entry_z`` deviations above its recent mean,
    buys when below, and flattens once it is back within ``exit_z``."""

    PARAMS: ClassVar[dict[str, Any]] = {
        "window": 20,
        "entry_z": 1.5,
        "exit_z": 0.3,
        "qty": 5,
        "max_position": 50,
        "slippage_ticks": 2,
        "min_std_ticks": 1.0,  # ignore deviations of a flat market
    }

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        require_positive(params, "window", "qty", "max_position", "entry_z")
        if not 0 <= params["exit_z"] < params["entry_z"]:
            raise ParamError("exit_z", "must be >= 0 and smaller than entry_z")

    def on_timer(self, ctx: StrategyContext) -> None:
        p = ctx.params
        if not self.sample(ctx) or len(self.prices) < p["window"]:
            return
        if any(o.is_live for o in ctx.open_orders.values()):
            return  # one decision at a time: wait for the last order to finish
        mean = sum(self.prices) / len(self.prices)
        var = sum((x - mean) ** 2 for x in self.prices) / len(self.prices)
        std = max(math.sqrt(var), p["min_std_ticks"])
        z = (self.prices[-1] - mean) / std
        self._act(ctx, z)

    def _act(self, ctx: StrategyContext, z: float) -> None:
        p = ctx.params
        pos = ctx.position
        if z > p["entry_z"] and pos > -p["max_position"]:
            self.take(ctx, SELL, min(p["qty"], p["max_position"] + pos))
        elif z < -p["entry_z"] and pos < p["max_position"]:
            self.take(ctx, BUY, min(p["qty"], p["max_position"] - pos))
        elif abs(z) < p["exit_z"] and pos != 0:
            self.take(ctx, SELL if pos > 0 else BUY, min(p["qty"], abs(pos)))


# --------------------------------------------------------------------------- TWAP


class TWAPExecutor(Strategy):
    """Works a parent order of ``total_qty`` over ``duration_s`` in ``slices`` child orders.

    The schedule is cumulative: by slice k it aims to have done ``total_qty * k /
    slices``; each child is a marketable IOC for what the schedule still lacks, so an
    unfilled remainder rolls into the next slice and the children never exceed the
    parent. After the last slice it keeps working any remainder on each timer tick.
    """

    PARAMS: ClassVar[dict[str, Any]] = {
        "side": "buy",
        "total_qty": 200,
        "duration_s": 60.0,
        "slices": 20,
        "slippage_ticks": 5,
        "start_delay_s": 0.0,
    }

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        require_positive(params, "total_qty", "duration_s", "slices")
        if params["side"] not in (BUY, SELL):
            raise ParamError("side", f"must be 'buy' or 'sell', got {params['side']!r}")
        if params["slices"] > params["total_qty"]:
            raise ParamError("slices", "must not exceed total_qty")

    def __init__(self) -> None:
        self.start_us: int | None = None
        self.filled = 0
        self.child: str | None = None
        self.children: list[tuple[int, int]] = []  # (now, qty) of each child sent
        self.done = False

    def on_start(self, ctx: StrategyContext) -> None:
        self.start_us = ctx.now + round(ctx.params["start_delay_s"] * 1_000_000)
        self.work(ctx)

    def on_timer(self, ctx: StrategyContext) -> None:
        self.work(ctx)

    def on_fill(self, ctx: StrategyContext, fill: FillEvent) -> None:
        self.filled += fill.qty
        if self.filled >= ctx.params["total_qty"] and not self.done:
            self.done = True
            ctx.log.info("TWAP done: %s %d lots", ctx.params["side"], self.filled)

    def scheduled_qty(self, ctx: StrategyContext) -> int:
        """Cumulative quantity the schedule wants done by ``ctx.now``."""
        p = ctx.params
        if self.start_us is None or ctx.now < self.start_us:
            return 0
        duration_us = round(p["duration_s"] * 1_000_000)
        due = min(p["slices"], (ctx.now - self.start_us) * p["slices"] // duration_us + 1)
        return p["total_qty"] * due // p["slices"]

    def work(self, ctx: StrategyContext) -> None:
        if self.done or (self.child is not None and self.child in ctx.open_orders):
            return  # one child at a time: its fills decide the next one's size
        self.child = None
        qty = self.scheduled_qty(ctx) - self.filled
        if qty > 0:
            self.child = submit(ctx, ctx.params["side"], qty,
                                aggressive_price(ctx, ctx.params["side"],
                                                 ctx.params["slippage_ticks"]), "ioc")
            self.children.append((ctx.now, qty))


BUILTIN_STRATEGIES: dict[str, type[Strategy]] = {
    cls.__name__: cls
    for cls in (MarketMaker, NoiseTrader, MomentumTrader, MeanReversionTrader, TWAPExecutor)
}
