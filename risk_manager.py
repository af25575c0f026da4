"""Pre-trade risk checks: order size, worst-case position, price band, open orders, rate.

Pure functions of the trader's state and the order; the engine calls them before an
order touches the book, so a rejected order changes nothing. Time comes from the
command's ``ts`` (microseconds), never from a clock.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

from config import RiskConfig
from models import RejectCode, TraderStatus

if TYPE_CHECKING:
    from margin_risk_manager import Arming
    from orderbook import Order
    from positions import Account, Position

Reject = tuple[RejectCode, str]

_TOKEN: Final = 10**9  # one message in the bucket's units: nano-messages keep refill exact


class OpenQty:
    """A trader's open quantity in one symbol by side: what its open orders could still
    add to the position. Two native ints: a ``[buy, sell]`` list held boxed ints, and
    every update went through generic in-place arithmetic in the compiled build."""

    __slots__ = ("buy", "position", "sell")

    def __init__(self, buy: int = 0, sell: int = 0) -> None:
        self.buy = buy
        self.sell = sell
        # the trader's position in the symbol, its ledger account's, once a fill opened
        # one: held here so the hot path does not look it up by symbol in the account
        self.position: Position | None = None

    def add(self, is_buy: bool, qty: int) -> None:
        if is_buy:
            self.buy += qty
        else:
            self.sell += qty

    def __iter__(self) -> Iterator[int]:
        return iter((self.buy, self.sell))

    def __repr__(self) -> str:
        return f"OpenQty(buy={self.buy}, sell={self.sell})"


class TraderState:
    """What the engine tracks per trader besides accounting."""

    __slots__ = ("account", "arming", "exposure", "live_orders", "rate_counted",
                 "rate_last", "rate_tokens", "status", "trader_id")

    def __init__(self, trader_id: str, burst: int) -> None:
        self.trader_id = trader_id
        self.live_orders: dict[str, Order] = {}  # by client_order_id, stops included
        self.exposure: dict[str, OpenQty] = {}  # by symbol
        self.rate_tokens = burst * _TOKEN  # token bucket, in nano-messages
        # the timestamp of the last message the bucket counted, once it counted one: a
        # flag and a plain int rather than ``int | None``, which the compiled build
        # would box on every message
        self.rate_counted = False
        self.rate_last = 0
        self.status = TraderStatus.OK
        # the trader's ledger account once its first fill opened one: held here so the
        # hot path does not look it up by trader id
        self.account: Account | None = None
        # its arming in the margin watch once a margin check armed it: held here so that
        # re-arming does not look it up by trader id
        self.arming: Arming | None = None

    def __getnewargs__(self) -> tuple[Any, ...]:  # see native_core.py
        return (self.trader_id, 0)

    @property
    def rate_ts(self) -> int | None:
        """The timestamp of the last message the bucket counted (``None``: none yet)."""
        return self.rate_last if self.rate_counted else None

    @rate_ts.setter
    def rate_ts(self, ts: int | None) -> None:
        self.rate_counted = ts is not None
        self.rate_last = 0 if ts is None else ts

    def open_qty(self, symbol: str) -> OpenQty:
        exposure = self.exposure.get(symbol)
        if exposure is None:
            exposure = self.exposure[symbol] = OpenQty()
        return exposure


class RiskManager:
    def __init__(self, config: RiskConfig) -> None:
        self.max_order_qty = config.max_order_qty
        self.max_position = config.max_position
        self.max_open_orders = config.max_open_orders
        self.burst = config.rate_limit_burst
        self._capacity = config.rate_limit_burst * _TOKEN
        # nano-messages per microsecond: exact for rates given to a thousandth per second
        self._refill_per_us = round(config.rate_limit_per_sec * 1_000)

    def __getnewargs__(self) -> tuple[Any, ...]:  # see native_core.py
        return (RiskConfig(),)

    def new_trader(self, trader_id: str) -> TraderState:
        return TraderState(trader_id, self.burst)

    def take_rate_token(self, trader: TraderState, ts: int) -> Reject | None:
        """Token bucket on the message's own timestamp: ``rate_limit_per_sec`` sustained,
        ``rate_limit_burst`` at once. A message older than the last one refills nothing."""
        rate_ts = trader.rate_last
        tokens = trader.rate_tokens
        if not trader.rate_counted:
            trader.rate_counted = True
            trader.rate_last = ts
        elif ts > rate_ts:
            # A bucket that the time elapsed refills to the brim is the common case;
            # testing it by division keeps a large refill rate out of the product
            # (a factor past 2**30 leaves mypyc's machine-int multiply), and at least one
            # microsecond has elapsed, so a room within one microsecond's refill needs
            # no division at all.
            elapsed, refill = ts - rate_ts, self._refill_per_us
            room = self._capacity - tokens
            if room <= refill or (refill > 0 and elapsed >= -(-room // refill)):
                tokens = self._capacity
            else:
                tokens += elapsed * refill
                if tokens > self._capacity:
                    tokens = self._capacity
            trader.rate_last = ts
        if tokens < _TOKEN:
            trader.rate_tokens = tokens
            return RejectCode.RATE_LIMITED, "message rate limit exceeded; slow down"
        trader.rate_tokens = tokens - _TOKEN
        return None

    def check_order(self, trader: TraderState, symbol: str, is_buy: bool, qty: int,
                    added_qty: int, position: int, new_orders: int) -> Reject | None:
        """Size, open-order count and worst-case position for an order of ``qty`` that
        adds ``added_qty`` to the trader's open quantity on its side (an amend adds the
        difference) and ``new_orders`` (0 or 1) to its open-order count."""
        if qty > self.max_order_qty:
            return (RejectCode.RISK_MAX_ORDER_QTY,
                    f"qty {qty} exceeds max_order_qty {self.max_order_qty}")
        if new_orders and len(trader.live_orders) >= self.max_open_orders:
            return (RejectCode.RISK_MAX_OPEN_ORDERS,
                    f"already {len(trader.live_orders)} open orders "
                    f"(max_open_orders {self.max_open_orders})")
        exposure = trader.exposure.get(symbol)
        open_buy, open_sell = (0, 0) if exposure is None else (exposure.buy, exposure.sell)
        worst = position + open_buy + added_qty if is_buy else position - open_sell - added_qty
        if abs(worst) > self.max_position:
            return (RejectCode.RISK_MAX_POSITION,
                    f"position could reach {worst} if open orders fill "
                    f"(max_position {self.max_position})")
        return None

    def check_new_order(self, trader: TraderState, ts: int, symbol: str,
                        exposure: OpenQty | None, is_buy: bool, qty: int,
                        position: int) -> Reject | None:
        """Every pre-trade check of a new order of this module's, in order: message
        rate, size, open orders, worst-case position. ``exposure`` is the trader's open
        quantity in ``symbol`` (``None``: no entry), which the caller has already looked
        up. (The engine tests a limit price against the band edges its markets cache.)

        Every order passes through here, so the limits are tested inline; only a
        failing order calls the functions that name the problem (the amend path's)."""
        reject = self.take_rate_token(trader, ts)
        if reject is not None:
            return reject
        if exposure is None:
            worst = position + qty if is_buy else position - qty
        else:
            worst = position + exposure.buy + qty if is_buy else position - exposure.sell - qty
        if qty > self.max_order_qty or len(trader.live_orders) >= self.max_open_orders \
                or worst > self.max_position or -worst > self.max_position:
            return self.check_order(trader, symbol, is_buy, qty, qty, position, 1)
        return None


def check_price_band(price: int, reference: int, band_bps: int) -> Reject | None:
    """A limit price must lie within ``band_bps`` of the reference price."""
    band = reference * band_bps // 10_000
    if price < reference - band or price > reference + band:
        return (RejectCode.RISK_PRICE_BAND,
                f"price {price} is outside the band {reference - band}..{reference + band} "
                f"around the reference price {reference}")
    return None


def band_limit(is_buy: bool, reference: int, band_bps: int) -> int:
    """The worst price a market order may trade at: the edge of the band."""
    band = reference * band_bps // 10_000
    return reference + band if is_buy else max(1, reference - band)
