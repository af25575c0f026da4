"""The shared vocabulary of OpenMarketSim: enums, commands, events and the wire parser.

Everything that crosses a module boundary is defined here once. Commands are what a
trader asks for; events are what the engine says happened. Both are slotted
dataclasses so they are cheap to build on the hot path and compare by value in tests.

Prices are integer ticks and quantities integer lots everywhere. Money inside the
core is an integer count of ``1 / MONEY_SCALE`` currency units (see ``config.py``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from mypy_extensions import mypyc_attr

PROTOCOL_VERSION = 1


class StrEnum(str, Enum):
    """A str-valued enum that serialises as its value (``enum.StrEnum`` is 3.11+)."""

    def __str__(self) -> str:
        return self.value


class Side(StrEnum):
    BUY = "buy"
    SELL = "sell"

    @property
    def opposite(self) -> Side:
        return Side.SELL if self is Side.BUY else Side.BUY


class OrderType(StrEnum):
    LIMIT = "limit"
    MARKET = "market"
    STOP = "stop"
    STOP_LIMIT = "stop_limit"


class TimeInForce(StrEnum):
    GTC = "gtc"
    IOC = "ioc"
    FOK = "fok"


class StpMode(StrEnum):
    """Self-trade prevention: what happens when an order meets its own trader's order."""

    CANCEL_RESTING = "cancel_resting"
    CANCEL_INCOMING = "cancel_incoming"
    CANCEL_BOTH = "cancel_both"
    DECREMENT = "decrement"


class OrderStatus(StrEnum):
    PENDING_TRIGGER = "pending_trigger"  # a stop order waiting outside the book
    NEW = "new"
    PARTIALLY_FILLED = "partially_filled"
    FILLED = "filled"
    CANCELED = "canceled"


class CancelReason(StrEnum):
    USER = "user"
    IOC = "ioc"
    FOK = "fok"
    SELF_TRADE = "self_trade"
    DISCONNECT = "disconnect"
    LIQUIDATION = "liquidation"
    RISK = "risk"


class Liquidity(StrEnum):
    MAKER = "maker"
    TAKER = "taker"


class TraderStatus(StrEnum):
    OK = "ok"
    MARGIN_CALL = "margin_call"
    LIQUIDATING = "liquidating"


class BookAction(StrEnum):
    """What happened to one resting order (the L3 ``order_event`` vocabulary)."""

    ADD = "add"
    CANCEL = "cancel"
    EXECUTE = "execute"
    AMEND = "amend"


class RejectCode(StrEnum):
    BAD_JSON = "BAD_JSON"
    UNKNOWN_TYPE = "UNKNOWN_TYPE"
    INVALID_FIELD = "INVALID_FIELD"
    NOT_LOGGED_IN = "NOT_LOGGED_IN"
    ALREADY_LOGGED_IN = "ALREADY_LOGGED_IN"
    AUTH_FAILED = "AUTH_FAILED"
    UNKNOWN_SYMBOL = "UNKNOWN_SYMBOL"
    DUPLICATE_CLIENT_ORDER_ID = "DUPLICATE_CLIENT_ORDER_ID"
    UNKNOWN_ORDER = "UNKNOWN_ORDER"
    POST_ONLY_WOULD_CROSS = "POST_ONLY_WOULD_CROSS"
    RISK_MAX_ORDER_QTY = "RISK_MAX_ORDER_QTY"
    RISK_MAX_POSITION = "RISK_MAX_POSITION"
    RISK_PRICE_BAND = "RISK_PRICE_BAND"
    RISK_MAX_OPEN_ORDERS = "RISK_MAX_OPEN_ORDERS"
    RISK_INSUFFICIENT_MARGIN = "RISK_INSUFFICIENT_MARGIN"
    RATE_LIMITED = "RATE_LIMITED"
    MARKET_CLOSED = "MARKET_CLOSED"
    TRADER_LIQUIDATING = "TRADER_LIQUIDATING"
    INTERNAL_ERROR = "INTERNAL_ERROR"  # a bug on the exchange's side; the input changed nothing
    # lockstep (simulated-time) mode; see the lockstep section below and API_SPEC.md
    LOCKSTEP_NOT_ENABLED = "LOCKSTEP_NOT_ENABLED"
    LOCKSTEP_PARTICIPANTS_MISMATCH = "LOCKSTEP_PARTICIPANTS_MISMATCH"
    LOCKSTEP_ALREADY_JOINED = "LOCKSTEP_ALREADY_JOINED"
    LOCKSTEP_NOT_JOINED = "LOCKSTEP_NOT_JOINED"
    LOCKSTEP_BAD_STEP = "LOCKSTEP_BAD_STEP"


# --------------------------------------------------------------------------- records
# Commands and events cross the engine's hot path, several per order. The compiled build
# (native_core.py) makes them native classes: an explicit ``__init__`` is compiled with
# them, where the one ``@dataclass`` would generate runs interpreted (it cost the compiled
# engine more than all its matching), and the engine reads their fields as C struct
# members. ``@dataclass`` still gives them their fields, ``__eq__`` and ``__repr__``;
# tests/test_native_core.py checks each ``__init__`` against the fields.


@mypyc_attr(acyclic=True)
class _Record:
    """What every command and event class shares: pickling and copying by its fields
    (snapshots hold the last command's events; see native_core.py for why a compiled
    class needs this)."""

    __slots__ = ()

    def __getnewargs__(self) -> tuple[Any, ...]:
        return tuple(getattr(self, field.name) for field in dataclasses.fields(self))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- commands


@mypyc_attr(acyclic=True)
@dataclass(slots=True)
class NewOrder(_Record):
    trader_id: str
    client_order_id: str
    symbol: str
    side: Side
    order_type: OrderType
    qty: int
    price: int | None = None
    stop_price: int | None = None
    tif: TimeInForce = TimeInForce.GTC
    post_only: bool = False
    stp: StpMode = StpMode.CANCEL_RESTING

    def __init__(self, trader_id: str, client_order_id: str, symbol: str, side: Side,
                 order_type: OrderType, qty: int, price: int | None = None,
                 stop_price: int | None = None, tif: TimeInForce = TimeInForce.GTC,
                 post_only: bool = False, stp: StpMode = StpMode.CANCEL_RESTING) -> None:
        self.trader_id = trader_id
        self.client_order_id = client_order_id
        self.symbol = symbol
        self.side = side
        self.order_type = order_type
        self.qty = qty
        self.price = price
        self.stop_price = stop_price
        self.tif = tif
        self.post_only = post_only
        self.stp = stp


@mypyc_attr(acyclic=True)
@dataclass(slots=True)
class CancelOrder(_Record):
    trader_id: str
    order_id: int | None = None
    client_order_id: str | None = None

    def __init__(self, trader_id: str, order_id: int | None = None,
                 client_order_id: str | None = None) -> None:
        self.trader_id = trader_id
        self.order_id = order_id
        self.client_order_id = client_order_id


@mypyc_attr(acyclic=True)
@dataclass(slots=True)
class AmendOrder(_Record):
    trader_id: str
    order_id: int | None = None
    client_order_id: str | None = None
    price: int | None = None
    qty: int | None = None  # the new total quantity

    def __init__(self, trader_id: str, order_id: int | None = None,
                 client_order_id: str | None = None, price: int | None = None,
                 qty: int | None = None) -> None:
        self.trader_id = trader_id
        self.order_id = order_id
        self.client_order_id = client_order_id
        self.price = price
        self.qty = qty


@mypyc_attr(acyclic=True)
@dataclass(slots=True)
class CancelAll(_Record):
    trader_id: str
    symbol: str | None = None
    reason: CancelReason = CancelReason.USER  # the gateway uses DISCONNECT

    def __init__(self, trader_id: str, symbol: str | None = None,
                 reason: CancelReason = CancelReason.USER) -> None:
        self.trader_id = trader_id
        self.symbol = symbol
        self.reason = reason


@mypyc_attr(acyclic=True)
@dataclass(slots=True)
class SetMarketOpen(_Record):
    """Open or close trading in a symbol (``None``: every symbol). Admin only."""

    is_open: bool
    symbol: str | None = None

    def __init__(self, is_open: bool, symbol: str | None = None) -> None:
        self.is_open = is_open
        self.symbol = symbol


Command = NewOrder | CancelOrder | AmendOrder | CancelAll | SetMarketOpen


# Session-level requests: answered by the gateway, never sequenced by the engine.


@mypyc_attr(native_class=False)
@dataclass(slots=True)
class Login:
    trader_id: str
    token: str | None = None


@mypyc_attr(native_class=False)
@dataclass(slots=True)
class GetPosition:
    symbol: str | None = None


@mypyc_attr(native_class=False)
@dataclass(slots=True)
class GetOpenOrders:
    symbol: str | None = None


@mypyc_attr(native_class=False)
@dataclass(slots=True)
class Ping:
    pass


# --------------------------------------------------------------------------- lockstep
# Session messages of lockstep (simulated-time) mode (``lockstep.py``): never sequenced.


@mypyc_attr(native_class=False)
@dataclass(slots=True)
class LockstepJoin:
    """Take part in the lockstep; ``participants`` is how many bots the battle runs."""

    participants: int


@mypyc_attr(native_class=False)
@dataclass(slots=True)
class StepDone:
    """The trader has sent all its inputs for step ``step``."""

    step: int


@mypyc_attr(native_class=False)
@dataclass(slots=True)
class LockstepLeave:
    """Leave the lockstep after the open step (the inputs sent before this are in it)."""


LockstepRequest = LockstepJoin | StepDone | LockstepLeave


def _parse_lockstep_join(msg: dict[str, Any], _trader: str, _default: str | None) -> LockstepJoin:
    participants = _positive_int(msg, "participants", None)
    assert participants is not None
    return LockstepJoin(participants)


def _parse_step_done(msg: dict[str, Any], _trader: str, _default: str | None) -> StepDone:
    step = _positive_int(msg, "step", None)
    assert step is not None
    return StepDone(step)


def _parse_lockstep_leave(msg: dict[str, Any], _trader: str,
                          _default: str | None) -> LockstepLeave:
    return LockstepLeave()


# --------------------------------------------------------------------------- requests

Request = (Login | GetPosition | GetOpenOrders | Ping | NewOrder | CancelOrder | AmendOrder
           | CancelAll | LockstepRequest)


# --------------------------------------------------------------------------- events


@mypyc_attr(acyclic=True)
@dataclass(slots=True)
class OrderAccepted(_Record):
    ts: int
    order_id: int
    trader_id: str
    client_order_id: str
    symbol: str
    side: Side
    order_type: OrderType
    price: int | None
    stop_price: int | None
    qty: int
    tif: TimeInForce
    post_only: bool
    liquidation: bool = False

    def __init__(self, ts: int, order_id: int, trader_id: str, client_order_id: str,
                 symbol: str, side: Side, order_type: OrderType, price: int | None,
                 stop_price: int | None, qty: int, tif: TimeInForce, post_only: bool,
                 liquidation: bool = False) -> None:
        self.ts = ts
        self.order_id = order_id
        self.trader_id = trader_id
        self.client_order_id = client_order_id
        self.symbol = symbol
        self.side = side
        self.order_type = order_type
        self.price = price
        self.stop_price = stop_price
        self.qty = qty
        self.tif = tif
        self.post_only = post_only
        self.liquidation = liquidation


@mypyc_attr(native_class=False)  # rare, and tests match their message with ANY
@dataclass(slots=True)
class OrderRejected:
    ts: int
    trader_id: str
    client_order_id: str
    code: RejectCode
    message: str


@mypyc_attr(native_class=False)  # rare, and tests match their message with ANY
@dataclass(slots=True)
class CancelRejected:
    ts: int
    trader_id: str
    order_id: int | None
    client_order_id: str | None
    code: RejectCode
    message: str


@mypyc_attr(native_class=False)  # rare, and tests match their message with ANY
@dataclass(slots=True)
class AmendRejected:
    ts: int
    trader_id: str
    order_id: int | None
    client_order_id: str | None
    code: RejectCode
    message: str


@mypyc_attr(acyclic=True)
@dataclass(slots=True)
class Trade(_Record):
    """One execution. Both sides' fills and the public print come from this one event."""

    ts: int
    trade_id: int
    symbol: str
    price: int
    qty: int
    aggressor: Side
    buy_order_id: int
    sell_order_id: int
    buy_trader: str
    sell_trader: str
    buy_client_order_id: str
    sell_client_order_id: str
    buy_leaves_qty: int
    sell_leaves_qty: int
    buy_fee: int  # money units; negative is a rebate
    sell_fee: int
    liquidation: bool = False

    def __init__(self, ts: int, trade_id: int, symbol: str, price: int, qty: int,
                 aggressor: Side, buy_order_id: int, sell_order_id: int, buy_trader: str,
                 sell_trader: str, buy_client_order_id: str, sell_client_order_id: str,
                 buy_leaves_qty: int, sell_leaves_qty: int, buy_fee: int, sell_fee: int,
                 liquidation: bool = False) -> None:
        self.ts = ts
        self.trade_id = trade_id
        self.symbol = symbol
        self.price = price
        self.qty = qty
        self.aggressor = aggressor
        self.buy_order_id = buy_order_id
        self.sell_order_id = sell_order_id
        self.buy_trader = buy_trader
        self.sell_trader = sell_trader
        self.buy_client_order_id = buy_client_order_id
        self.sell_client_order_id = sell_client_order_id
        self.buy_leaves_qty = buy_leaves_qty
        self.sell_leaves_qty = sell_leaves_qty
        self.buy_fee = buy_fee
        self.sell_fee = sell_fee
        self.liquidation = liquidation


@mypyc_attr(acyclic=True)
@dataclass(slots=True)
class OrderCanceled(_Record):
    ts: int
    order_id: int
    trader_id: str
    client_order_id: str
    symbol: str
    side: Side
    canceled_qty: int
    reason: CancelReason

    def __init__(self, ts: int, order_id: int, trader_id: str, client_order_id: str,
                 symbol: str, side: Side, canceled_qty: int, reason: CancelReason) -> None:
        self.ts = ts
        self.order_id = order_id
        self.trader_id = trader_id
        self.client_order_id = client_order_id
        self.symbol = symbol
        self.side = side
        self.canceled_qty = canceled_qty
        self.reason = reason


@mypyc_attr(acyclic=True)
@dataclass(slots=True)
class OrderAmended(_Record):
    ts: int
    order_id: int
    trader_id: str
    client_order_id: str
    symbol: str
    side: Side
    price: int | None
    qty: int  # new total quantity (filled + leaves)
    leaves_qty: int
    priority_kept: bool

    def __init__(self, ts: int, order_id: int, trader_id: str, client_order_id: str,
                 symbol: str, side: Side, price: int | None, qty: int, leaves_qty: int,
                 priority_kept: bool) -> None:
        self.ts = ts
        self.order_id = order_id
        self.trader_id = trader_id
        self.client_order_id = client_order_id
        self.symbol = symbol
        self.side = side
        self.price = price
        self.qty = qty
        self.leaves_qty = leaves_qty
        self.priority_kept = priority_kept


@mypyc_attr(acyclic=True)
@dataclass(slots=True)
class OrderTriggered(_Record):
    ts: int
    order_id: int
    trader_id: str
    client_order_id: str
    symbol: str

    def __init__(self, ts: int, order_id: int, trader_id: str, client_order_id: str,
                 symbol: str) -> None:
        self.ts = ts
        self.order_id = order_id
        self.trader_id = trader_id
        self.client_order_id = client_order_id
        self.symbol = symbol


@mypyc_attr(acyclic=True)
@dataclass(slots=True)
class BookChanged(_Record):
    """One resting order changed (L3) and the new total of its price level (L2)."""

    symbol: str
    action: BookAction
    order_id: int
    side: Side
    price: int
    order_qty: int  # the order's remaining quantity after the change
    level_qty: int  # the price level's total after the change; 0 removes the level

    def __init__(self, symbol: str, action: BookAction, order_id: int, side: Side, price: int,
                 order_qty: int, level_qty: int) -> None:
        self.symbol = symbol
        self.action = action
        self.order_id = order_id
        self.side = side
        self.price = price
        self.order_qty = order_qty
        self.level_qty = level_qty


@mypyc_attr(acyclic=True)
@dataclass(slots=True)
class PositionChanged(_Record):
    ts: int
    trader_id: str
    symbol: str
    position: int
    open_cost: int  # signed ticks*lots of the open position; avg price = open_cost/position
    cash: int  # money units
    realized_pnl: int  # money units, this symbol
    fees: int  # money units paid in this symbol

    def __init__(self, ts: int, trader_id: str, symbol: str, position: int, open_cost: int,
                 cash: int, realized_pnl: int, fees: int) -> None:
        self.ts = ts
        self.trader_id = trader_id
        self.symbol = symbol
        self.position = position
        self.open_cost = open_cost
        self.cash = cash
        self.realized_pnl = realized_pnl
        self.fees = fees


@mypyc_attr(acyclic=True)
@dataclass(slots=True)
class TraderStatusChanged(_Record):
    ts: int
    trader_id: str
    status: TraderStatus

    def __init__(self, ts: int, trader_id: str, status: TraderStatus) -> None:
        self.ts = ts
        self.trader_id = trader_id
        self.status = status


@mypyc_attr(acyclic=True)
@dataclass(slots=True)
class MarketStatusChanged(_Record):
    ts: int
    symbol: str
    is_open: bool

    def __init__(self, ts: int, symbol: str, is_open: bool) -> None:
        self.ts = ts
        self.symbol = symbol
        self.is_open = is_open


Event = (OrderAccepted | OrderRejected | CancelRejected | AmendRejected | Trade | OrderCanceled
         | OrderAmended | OrderTriggered | BookChanged | PositionChanged | TraderStatusChanged
         | MarketStatusChanged)

REJECT_EVENTS = (OrderRejected, CancelRejected, AmendRejected)


# --------------------------------------------------------------------------- parsing


class ProtocolError(Exception):
    """A request that cannot be acted on: a stable code, a message naming the problem,
    and the client's own id for the request where one could be read."""

    def __init__(self, code: RejectCode, message: str, ref: str | int | None = None):
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.ref = ref


TRADER_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
MAX_CLIENT_ORDER_ID_LEN = 64


def _invalid(field: str, problem: str, ref: str | int | None = None) -> ProtocolError:
    return ProtocolError(RejectCode.INVALID_FIELD, f"'{field}' {problem}", ref)


def _positive_int(msg: dict[str, Any], field: str, ref: str | int | None,
                  required: bool = True) -> int | None:
    value = msg.get(field)
    if value is None:
        if required:
            raise _invalid(field, "is required", ref)
        return None
    # bool is an int subclass in Python; JSON true must not pass as 1.
    if type(value) is not int:
        raise _invalid(field, f"must be a positive integer, got {type(value).__name__}", ref)
    if value <= 0:
        raise _invalid(field, f"must be a positive integer, got {value}", ref)
    return value


def _string(msg: dict[str, Any], field: str, ref: str | int | None, required: bool = True,
            max_len: int = MAX_CLIENT_ORDER_ID_LEN) -> str | None:
    value = msg.get(field)
    if value is None:
        if required:
            raise _invalid(field, "is required", ref)
        return None
    if not isinstance(value, str) or not value:
        raise _invalid(field, "must be a non-empty string", ref)
    if len(value) > max_len:
        raise _invalid(field, f"must be at most {max_len} characters", ref)
    return value


def _enum(msg: dict[str, Any], field: str, enum: type[StrEnum], default: Any,
          ref: str | int | None) -> Any:
    value = msg.get(field)
    if value is None:
        if default is None:
            raise _invalid(field, "is required", ref)
        return default
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(member.value for member in enum)
        raise _invalid(field, f"must be one of {allowed}; got {value!r}", ref) from None


def _bool(msg: dict[str, Any], field: str, ref: str | int | None) -> bool:
    value = msg.get(field, False)
    if type(value) is not bool:
        raise _invalid(field, "must be true or false", ref)
    return value


def _order_ref(msg: dict[str, Any]) -> tuple[int | None, str | None, str | int | None]:
    """The ``order_id`` / ``client_order_id`` pair a cancel or amend names."""
    client_order_id = msg.get("client_order_id")
    order_id = msg.get("order_id")
    ref = client_order_id if isinstance(client_order_id, str) else (
        order_id if type(order_id) is int else None)
    if order_id is None and client_order_id is None:
        raise _invalid("order_id", "or 'client_order_id' is required", ref)
    if order_id is not None:
        _positive_int(msg, "order_id", ref)
    if client_order_id is not None:
        _string(msg, "client_order_id", ref)
    return order_id, client_order_id, ref


def _symbol(msg: dict[str, Any], default_symbol: str | None, ref: str | int | None,
            required: bool) -> str | None:
    symbol = _string(msg, "symbol", ref, required=False, max_len=32)
    if symbol is None and required:
        if default_symbol is None:
            raise _invalid("symbol", "is required when the exchange trades several symbols",
                           ref)
        return default_symbol
    return symbol


def parse_new_order(msg: dict[str, Any], trader_id: str,
                    default_symbol: str | None = None) -> NewOrder:
    raw_ref = msg.get("client_order_id")
    ref = raw_ref if isinstance(raw_ref, str) else None
    client_order_id = _string(msg, "client_order_id", ref)
    assert client_order_id is not None
    symbol = _symbol(msg, default_symbol, ref, required=True)
    side = _enum(msg, "side", Side, None, ref)
    order_type = _enum(msg, "order_type", OrderType, OrderType.LIMIT, ref)
    qty = _positive_int(msg, "qty", ref)
    needs_price = order_type in (OrderType.LIMIT, OrderType.STOP_LIMIT)
    needs_stop = order_type in (OrderType.STOP, OrderType.STOP_LIMIT)
    price = _positive_int(msg, "price", ref, required=needs_price)
    stop_price = _positive_int(msg, "stop_price", ref, required=needs_stop)
    if price is not None and not needs_price:
        raise _invalid("price", f"is not allowed on a {order_type.value} order", ref)
    if stop_price is not None and not needs_stop:
        raise _invalid("stop_price", f"is not allowed on a {order_type.value} order", ref)
    tif = _enum(msg, "tif", TimeInForce, TimeInForce.GTC, ref)
    if order_type in (OrderType.MARKET, OrderType.STOP) and "tif" not in msg:
        tif = TimeInForce.IOC  # a market order is IOC by nature
    elif order_type in (OrderType.MARKET, OrderType.STOP) and tif is TimeInForce.GTC:
        raise _invalid("tif", "must be ioc or fok on a market order", ref)
    post_only = _bool(msg, "post_only", ref)
    if post_only and (order_type is not OrderType.LIMIT or tif is not TimeInForce.GTC):
        raise _invalid("post_only", "is only allowed on a gtc limit order", ref)
    stp = _enum(msg, "stp", StpMode, StpMode.CANCEL_RESTING, ref)
    return NewOrder(trader_id, client_order_id, symbol, side, order_type, qty,  # type: ignore[arg-type]
                    price, stop_price, tif, post_only, stp)


def parse_request(msg: Any, trader_id: str | None,
                  default_symbol: str | None = None) -> Request:
    """Turn a decoded JSON value into a validated request, or raise ``ProtocolError``.

    ``trader_id`` is the session's logged-in trader (``None`` before login).
    """
    if not isinstance(msg, dict):
        raise ProtocolError(RejectCode.BAD_JSON, "a message must be a JSON object")
    kind = msg.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(RejectCode.UNKNOWN_TYPE, "'type' is required and must be a string")
    if kind == "ping":
        return Ping()
    if kind == "login":
        if trader_id is not None:
            raise ProtocolError(RejectCode.ALREADY_LOGGED_IN, f"already logged in as {trader_id}")
        login_id = _string(msg, "trader_id", None, max_len=64)
        assert login_id is not None
        if not TRADER_ID_RE.fullmatch(login_id):
            raise _invalid("trader_id", "must be 1-32 characters of A-Za-z0-9_-")
        return Login(login_id, _string(msg, "token", None, required=False, max_len=256))
    if kind not in _PARSERS:
        raise ProtocolError(RejectCode.UNKNOWN_TYPE, f"unknown message type {kind!r}")
    if trader_id is None:
        raise ProtocolError(RejectCode.NOT_LOGGED_IN, f"log in before sending {kind!r}",
                            msg.get("client_order_id"))
    return _PARSERS[kind](msg, trader_id, default_symbol)


def parse_admin(msg: Any) -> SetMarketOpen:
    """A message from a trusted consumer of the internal event stream: today only
    ``set_market_open`` (``is_open`` required; no ``symbol``: every symbol)."""
    if not isinstance(msg, dict):
        raise ProtocolError(RejectCode.BAD_JSON, "a message must be a JSON object")
    kind = msg.get("type")
    if kind != "set_market_open":
        raise ProtocolError(RejectCode.UNKNOWN_TYPE, f"unknown message type {kind!r} on the "
                            "event stream: it takes only 'set_market_open'")
    if "is_open" not in msg:
        raise _invalid("is_open", "is required (true to open, false to close)")
    return SetMarketOpen(_bool(msg, "is_open", None), _symbol(msg, None, None, required=False))


def _parse_cancel(msg: dict[str, Any], trader_id: str, _default: str | None) -> CancelOrder:
    order_id, client_order_id, _ = _order_ref(msg)
    return CancelOrder(trader_id, order_id, client_order_id)


def _parse_amend(msg: dict[str, Any], trader_id: str, _default: str | None) -> AmendOrder:
    order_id, client_order_id, ref = _order_ref(msg)
    price = _positive_int(msg, "price", ref, required=False)
    qty = _positive_int(msg, "qty", ref, required=False)
    if price is None and qty is None:
        raise _invalid("price", "or 'qty' is required in an amend", ref)
    return AmendOrder(trader_id, order_id, client_order_id, price, qty)


def _parse_cancel_all(msg: dict[str, Any], trader_id: str, _default: str | None) -> CancelAll:
    return CancelAll(trader_id, _symbol(msg, None, None, required=False))


def _parse_get_position(msg: dict[str, Any], _trader: str, _default: str | None) -> GetPosition:
    return GetPosition(_symbol(msg, None, None, required=False))


def _parse_get_open_orders(msg: dict[str, Any], _trader: str,
                           _default: str | None) -> GetOpenOrders:
    return GetOpenOrders(_symbol(msg, None, None, required=False))


_PARSERS: dict[str, Callable[[dict[str, Any], str, str | None], Request]] = {
    "new_order": parse_new_order,
    "cancel_order": _parse_cancel,
    "amend_order": _parse_amend,
    "cancel_all": _parse_cancel_all,
    "get_position": _parse_get_position,
    "get_open_orders": _parse_get_open_orders,
    "lockstep_join": _parse_lockstep_join,  # lockstep mode (see the lockstep section)
    "step_done": _parse_step_done,
    "lockstep_leave": _parse_lockstep_leave,
}


# --------------------------------------------------------------------------- encoding

EVENT_TYPE_NAMES: dict[type, str] = {
    OrderAccepted: "order_accepted",
    OrderRejected: "order_rejected",
    CancelRejected: "cancel_rejected",
    AmendRejected: "amend_rejected",
    Trade: "trade",
    OrderCanceled: "order_canceled",
    OrderAmended: "order_amended",
    OrderTriggered: "order_triggered",
    BookChanged: "book_changed",
    PositionChanged: "position_changed",
    TraderStatusChanged: "trader_status_changed",
    MarketStatusChanged: "market_status_changed",
}
EVENT_TYPES_BY_NAME = {name: cls for cls, name in EVENT_TYPE_NAMES.items()}
# Every command's and event's fields in order, for the wire and the journal (the
# compiled build's classes have no ``__slots__`` to read them from).
FIELD_NAMES: dict[type, tuple[str, ...]] = {
    cls: tuple(field.name for field in dataclasses.fields(cls))
    for cls in (NewOrder, CancelOrder, AmendOrder, CancelAll, SetMarketOpen,
                *EVENT_TYPE_NAMES)}
_ENUM_FIELDS = {
    "side": Side, "order_type": OrderType, "tif": TimeInForce, "reason": CancelReason,
    "code": RejectCode, "aggressor": Side, "action": BookAction, "status": TraderStatus,
}


def event_to_dict(event: Event, seq: int | None = None) -> dict[str, Any]:
    """An engine event as a JSON-ready dict: ``type`` first, then ``seq``, then its
    fields by name (enums as their string values, money as integer units)."""
    message: dict[str, Any] = {"type": EVENT_TYPE_NAMES[type(event)]}
    if seq is not None:
        message["seq"] = seq
    for name in FIELD_NAMES[type(event)]:
        value = getattr(event, name)
        message[name] = value.value if isinstance(value, Enum) else value
    return message


def event_from_dict(message: dict[str, Any]) -> Event:
    """The inverse of ``event_to_dict`` (``type`` and ``seq`` are dropped)."""
    cls = EVENT_TYPES_BY_NAME[message["type"]]
    kwargs = {}
    for name in FIELD_NAMES[cls]:
        value = message[name]
        enum = _ENUM_FIELDS.get(name)
        kwargs[name] = enum(value) if enum is not None and value is not None else value
    return cls(**kwargs)
