"""Core test fixtures: a self-checking engine harness and builders for commands and events.

Every engine test goes through ``Harness.send``, which processes a command, asserts the
engine's invariants (``Engine.validate``) and records every event it produced, so a
rule that breaks an invariant fails in whichever test happens to exercise it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

import pytest

from config import MONEY_SCALE, ExchangeConfig, config_from_dict
from engine import Engine
from models import (
    CancelAll,
    CancelOrder,
    Command,
    Event,
    NewOrder,
    OrderAccepted,
    OrderType,
    PositionChanged,
    Side,
    StpMode,
    TimeInForce,
    Trade,
)

SYM = "SIM"
ALT = "ALT"
BUY, SELL = Side.BUY, Side.SELL
TS0 = 1_700_000_000_000_000  # an arbitrary epoch instant in microseconds
TICK_VALUE = 1_000_000  # money units per lot per tick at the default 0.01 tick and 1-lot size
INITIAL_CASH = 1_000_000 * MONEY_SCALE  # the default margin.initial_cash in money units
ONE_SECOND = 1_000_000

EventT = TypeVar("EventT")


def make_config(**sections: Any) -> ExchangeConfig:
    """The default configuration with fees switched off, so that matching tests read
    without fee arithmetic; each keyword overrides keys of one section
    (``instruments`` replaces the whole list)."""
    data: dict[str, Any] = {"fees": {"maker_fee_bps": 0.0, "taker_fee_bps": 0.0}}
    for name, values in sections.items():
        if isinstance(values, dict):
            data[name] = {**data.get(name, {}), **values}
        else:
            data[name] = values
    return config_from_dict(data)


def two_symbol_config(**sections: Any) -> ExchangeConfig:
    return make_config(instruments=[{"symbol": SYM}, {"symbol": ALT, "reference_price": 5_000}],
                       **sections)


class Harness:
    """An engine driven one command at a time on a monotone clock.

    ``send`` validates the engine after the command and appends its events to
    ``events`` (the recording sink); ``commands`` keeps what was sent, with its ``ts``,
    so a test can replay the exact stream on a fresh engine.
    """

    def __init__(self, config: ExchangeConfig | None = None, ts: int = TS0) -> None:
        self.config = config or make_config()
        self.engine = Engine(self.config)
        self.events: list[Event] = []
        self.commands: list[tuple[Command, int]] = []
        self.now = ts

    def send(self, command: Command, ts: int | None = None) -> list[Event]:
        # a fresh microsecond per command unless the test pins the time, so a test
        # can tell which command an event's ts came from
        self.now = self.now + 1 if ts is None else ts
        events = self.engine.process(command, self.now)
        self.engine.validate()
        self.commands.append((command, self.now))
        self.events.extend(events)
        return events

    def send_all(self, commands: Iterable[Command]) -> list[Event]:
        events: list[Event] = []
        for command in commands:
            events.extend(self.send(command))
        return events

    def queue(self, side: Side, symbol: str = SYM) -> list[tuple[int | None, int, int]]:
        """L3 of one side as ``(price, order_id, leaves_qty)``, best first, FIFO in a level."""
        return [(o.price, o.order_id, o.leaves_qty)
                for o in self.engine.books[symbol].iter_orders(side)]

    def depth(self, side: Side, symbol: str = SYM) -> list[tuple[int, int]]:
        return self.engine.books[symbol].depth(side)

    def live_ids(self, trader_id: str) -> list[int]:
        return [order.order_id for order in self.engine.open_orders(trader_id)]


def of_type(events: Iterable[Any], kind: type[EventT]) -> list[EventT]:
    return [event for event in events if isinstance(event, kind)]


def without(events: Iterable[Event], *kinds: type) -> list[Event]:
    """The events minus some kinds, for tests about the others (still whole dataclasses)."""
    return [event for event in events if not isinstance(event, kinds)]


# ------------------------------------------------------------------ command builders


def limit(trader: str, client_order_id: str, side: Side, qty: int, price: int, *,
          symbol: str = SYM, tif: TimeInForce = TimeInForce.GTC, post_only: bool = False,
          stp: StpMode = StpMode.CANCEL_RESTING) -> NewOrder:
    return NewOrder(trader, client_order_id, symbol, side, OrderType.LIMIT, qty, price, None,
                    tif, post_only, stp)


def market(trader: str, client_order_id: str, side: Side, qty: int, *, symbol: str = SYM,
           tif: TimeInForce = TimeInForce.IOC,
           stp: StpMode = StpMode.CANCEL_RESTING) -> NewOrder:
    return NewOrder(trader, client_order_id, symbol, side, OrderType.MARKET, qty, None, None,
                    tif, False, stp)


def stop(trader: str, client_order_id: str, side: Side, qty: int, stop_price: int, *,
         symbol: str = SYM, tif: TimeInForce = TimeInForce.IOC) -> NewOrder:
    return NewOrder(trader, client_order_id, symbol, side, OrderType.STOP, qty, None,
                    stop_price, tif)


def stop_limit(trader: str, client_order_id: str, side: Side, qty: int, stop_price: int,
               price: int, *, symbol: str = SYM,
               tif: TimeInForce = TimeInForce.GTC) -> NewOrder:
    return NewOrder(trader, client_order_id, symbol, side, OrderType.STOP_LIMIT, qty, price,
                    stop_price, tif)


def cancel(trader: str, order_id: int | None = None,
           client_order_id: str | None = None) -> CancelOrder:
    return CancelOrder(trader, order_id, client_order_id)


def cancel_all(trader: str, symbol: str | None = None) -> CancelAll:
    return CancelAll(trader, symbol)


# ------------------------------------------------------------------ expected events


def accepted(cmd: NewOrder, order_id: int, ts: int, liquidation: bool = False) -> OrderAccepted:
    """The acknowledgement an accepted ``cmd`` must produce."""
    return OrderAccepted(ts, order_id, cmd.trader_id, cmd.client_order_id, cmd.symbol,
                         cmd.side, cmd.order_type, cmd.price, cmd.stop_price, cmd.qty, cmd.tif,
                         cmd.post_only, liquidation)


def trade(ts: int, trade_id: int, price: int, qty: int, aggressor: Side, *,
          buy: tuple[int, str, str], sell: tuple[int, str, str], buy_leaves: int,
          sell_leaves: int, buy_fee: int = 0, sell_fee: int = 0, symbol: str = SYM,
          liquidation: bool = False) -> Trade:
    """A trade between ``buy`` and ``sell``, each given as (order_id, trader, client id)."""
    return Trade(ts, trade_id, symbol, price, qty, aggressor, buy[0], sell[0], buy[1], sell[1],
                 buy[2], sell[2], buy_leaves, sell_leaves, buy_fee, sell_fee, liquidation)


def position(ts: int, trader: str, qty: int, open_cost: int, cash: int, realized: int = 0,
             fees: int = 0, symbol: str = SYM) -> PositionChanged:
    return PositionChanged(ts, trader, symbol, qty, open_cost, cash, realized, fees)


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def h() -> Harness:
    """One instrument (SIM, reference 100.00), no fees, default risk and margin."""
    return Harness()


@pytest.fixture
def h2() -> Harness:
    """Two instruments: SIM (reference 10000 ticks) and ALT (reference 5000 ticks)."""
    return Harness(two_symbol_config())
