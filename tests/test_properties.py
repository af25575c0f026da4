"""Property tests: invariants of the engine over random command streams.

Each stream mixes several traders, every order type, time in force, STP mode and
post-only, cancels and amends by both ids, cancel-all and market open/close, on a
monotone clock. After every command the checker replays the events into its own model
(a book replica from ``book_changed``, a per-order quantity tally, the ledger sums) and
compares it with the engine; at the end the whole stream is replayed on a fresh engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from config import ExchangeConfig
from engine import Engine
from models import (
    REJECT_EVENTS,
    AmendOrder,
    BookAction,
    BookChanged,
    CancelAll,
    CancelOrder,
    Command,
    Event,
    MarketStatusChanged,
    NewOrder,
    OrderAccepted,
    OrderAmended,
    OrderCanceled,
    OrderTriggered,
    OrderType,
    SetMarketOpen,
    Side,
    StpMode,
    TimeInForce,
    Trade,
)
from tests.conftest import ALT, SYM, TS0, Harness, make_config
from tests.stack import ROOT

TRADERS = ("t1", "t2", "t3", "t4")
CLIENT_IDS = tuple(f"c{i}" for i in range(8))
MAX_ORDER_ID = 30

# Shrinking a failing stream of ~80 commands takes minutes, past the suite's timeout, so by
# default a failure reports the (seeded, so reproducible) stream as generated; set
# HYPOTHESIS_SHRINK=1 to have it shrunk to a minimal one while investigating.
_PHASES = tuple(Phase) if os.environ.get("HYPOTHESIS_SHRINK") else (
    Phase.explicit, Phase.reuse, Phase.generate)
PROPERTY_SETTINGS = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                             phases=_PHASES, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class Market:
    """What a stream trades: its configuration, and the price grid orders are drawn from."""

    config: ExchangeConfig
    mids: dict[str, int]
    step: int  # ticks between grid prices
    spread: int  # grid prices either side of the mid
    max_qty: int  # largest order quantity drawn


# Two symbols, a maker rebate, roomy limits: lots of matching, no liquidations.
BROAD = Market(
    make_config(instruments=[{"symbol": SYM}, {"symbol": ALT, "reference_price": 5_000}],
                fees={"maker_fee_bps": -0.5, "taker_fee_bps": 1.0}),
    {SYM: 10_000, ALT: 5_000}, step=1, spread=6, max_qty=12)

# One symbol, little cash and tight limits, prices spread over most of the band: margin
# rejects, rate limits, open-order caps and liquidations all happen.
TIGHT = Market(
    make_config(fees={"maker_fee_bps": 0.5, "taker_fee_bps": 2.0},
                margin={"initial_cash": 50.0, "initial_margin_pct": 5.0,
                        "maintenance_margin_pct": 5.0},
                risk={"max_order_qty": 4, "max_position": 8, "max_open_orders": 3,
                      "rate_limit_per_sec": 1.0, "rate_limit_burst": 5}),
    {SYM: 10_000}, step=100, spread=9, max_qty=5)


def _order_ref(draw: Any) -> dict[str, Any]:
    by = draw(st.sampled_from(("order_id", "client_order_id", "both")))
    order_id = draw(st.integers(1, MAX_ORDER_ID)) if by != "client_order_id" else None
    client_order_id = draw(st.sampled_from(CLIENT_IDS)) if by != "order_id" else None
    return {"order_id": order_id, "client_order_id": client_order_id}


@st.composite
def commands(draw: Any, market: Market) -> Command:
    trader = draw(st.sampled_from(TRADERS))
    symbol = draw(st.sampled_from(sorted(market.mids)))

    def price() -> int:
        return market.mids[symbol] + market.step * draw(
            st.integers(-market.spread, market.spread))

    kind = draw(st.sampled_from(("new",) * 12 + ("cancel", "cancel", "amend", "amend", "amend",
                                                   "cancel_all", "market_status")))
    if kind == "new":
        # resting liquidity is what makes the other rules reachable: mostly gtc limits
        order_type = draw(st.sampled_from((OrderType.LIMIT,) * 5 + tuple(OrderType)))
        is_market_like = order_type in (OrderType.MARKET, OrderType.STOP)
        tif = draw(st.sampled_from((TimeInForce.IOC, TimeInForce.FOK) if is_market_like
                                   else (TimeInForce.GTC,) * 3 + tuple(TimeInForce)))
        post_only = order_type is OrderType.LIMIT and tif is TimeInForce.GTC \
            and draw(st.booleans())
        return NewOrder(
            trader, draw(st.sampled_from(CLIENT_IDS)), symbol, draw(st.sampled_from(Side)),
            order_type, draw(st.integers(1, market.max_qty)),
            None if is_market_like else price(),
            price() if order_type in (OrderType.STOP, OrderType.STOP_LIMIT) else None,
            tif, post_only, draw(st.sampled_from(StpMode)))
    if kind == "cancel":
        return CancelOrder(trader, **_order_ref(draw))
    if kind == "amend":
        new_price = price() if draw(st.booleans()) else None
        new_qty = draw(st.integers(1, market.max_qty + 2)) \
            if new_price is None or draw(st.booleans()) else None
        return AmendOrder(trader, **_order_ref(draw), price=new_price, qty=new_qty)
    if kind == "cancel_all":
        return CancelAll(trader, draw(st.one_of(st.none(), st.just(symbol))))
    # mostly reopen, so that a stream does not spend its length closed
    return SetMarketOpen(draw(st.sampled_from((True, True, True, False))),
                         draw(st.one_of(st.none(), st.just(symbol))))


@st.composite
def streams(draw: Any, market: Market) -> list[tuple[Command, int]]:
    steps = draw(st.lists(st.tuples(commands(market), st.integers(0, 400_000)),
                          min_size=20, max_size=80))
    ts, stream = TS0, []
    for command, gap in steps:
        ts += gap
        stream.append((command, ts))
    return stream


@dataclass
class Tally:
    """One order's quantities as told by the events alone."""

    order_type: OrderType
    tif: TimeInForce
    post_only: bool
    liquidation: bool
    qty: int
    accepted_qty: int
    filled: int = 0
    canceled: int = 0
    triggered: bool = False
    done: bool = False

    @property
    def leaves(self) -> int:
        return self.qty - self.filled - self.canceled


@dataclass
class Checker:
    """Rebuilds the market from the events and checks it against the engine."""

    engine: Engine
    tallies: dict[int, Tally] = field(default_factory=dict)
    # (symbol, side, price) -> queue of [order_id, leaves], in the order the book must fill
    levels: dict[tuple[str, Side, int], list[list[int]]] = field(default_factory=dict)
    last_trade: Trade | None = None
    last_prices: dict[str, int] = field(default_factory=dict)
    # waiting stops: order id -> (symbol, side, stop price, a print has reached it)
    stops: dict[int, tuple[str, Side, int, bool]] = field(default_factory=dict)
    closed: set[str] = field(default_factory=set)
    next_order_id: int = 1
    next_trade_id: int = 1

    def apply(self, command: Command, ts: int, events: list[Event]) -> None:
        books_before = {s: b.state_hash() for s, b in self.engine.books.items()}
        for event in events:
            assert getattr(event, "ts", ts) == ts, f"{event} is not stamped with its command's ts"
            self._apply_event(event)
        if len(events) == 1 and isinstance(events[0], REJECT_EVENTS):
            assert {s: b.state_hash() for s, b in self.engine.books.items()} == books_before
        self._check_engine()

    def _apply_event(self, event: Event) -> None:
        if isinstance(event, OrderAccepted):
            assert event.order_id == self.next_order_id, "order ids must be sequential"
            self.next_order_id += 1
            assert event.liquidation or event.symbol not in self.closed, \
                f"{event}: accepted in a closed market"
            self.tallies[event.order_id] = Tally(event.order_type, event.tif, event.post_only,
                                                 event.liquidation, event.qty, event.qty)
            if event.stop_price is not None:
                # only a print after the stop arrived can reach it (PROTOCOL.md)
                self.stops[event.order_id] = (event.symbol, event.side, event.stop_price,
                                              False)
        elif isinstance(event, Trade):
            self._apply_trade(event)
        elif isinstance(event, OrderCanceled):
            tally = self.tallies[event.order_id]
            assert not tally.done and event.canceled_qty == tally.leaves > 0, \
                f"{event} does not cancel exactly the remaining {tally.leaves}"
            tally.canceled += event.canceled_qty
            tally.done = True
            self.stops.pop(event.order_id, None)
        elif isinstance(event, OrderAmended):
            tally = self.tallies[event.order_id]
            assert not tally.done
            assert event.qty == tally.filled + event.leaves_qty, \
                f"{event}: qty must be filled ({tally.filled}) + leaves"
            tally.qty = event.qty
        elif isinstance(event, OrderTriggered):
            tally = self.tallies[event.order_id]
            assert tally.order_type in (OrderType.STOP, OrderType.STOP_LIMIT)
            assert not tally.triggered and not tally.done
            tally.triggered = True
            self.stops.pop(event.order_id)
        elif isinstance(event, BookChanged):
            self._apply_book_change(event)
        elif isinstance(event, MarketStatusChanged):
            assert (event.symbol in self.closed) is event.is_open, f"{event} changes nothing"
            if event.is_open:
                self.closed.discard(event.symbol)
            else:
                self.closed.add(event.symbol)

    def _apply_trade(self, event: Trade) -> None:
        assert event.trade_id == self.next_trade_id, "trade ids must be sequential"
        self.next_trade_id += 1
        assert event.buy_trader != event.sell_trader, f"self-trade printed: {event}"
        assert event.qty > 0
        assert event.symbol not in self.closed, f"{event} printed in a closed market"
        for order_id, leaves in ((event.buy_order_id, event.buy_leaves_qty),
                                 (event.sell_order_id, event.sell_leaves_qty)):
            tally = self.tallies[order_id]
            assert not tally.done
            tally.filled += event.qty
            assert leaves == tally.leaves >= 0, f"{event}: leaves disagree with the tally"
            if not leaves:
                tally.done = True
        taker_id = event.buy_order_id if event.aggressor is Side.BUY else event.sell_order_id
        assert not self.tallies[taker_id].post_only, f"a post-only order took: {event}"
        assert event.liquidation is self.tallies[taker_id].liquidation, \
            f"{event}: flagged unlike its taking order"
        maker_side = event.aggressor.opposite
        prices = [p for (s, side, p) in self.levels if s == event.symbol and side is maker_side]
        best = max(prices) if maker_side is Side.BUY else min(prices)
        assert event.price == best, f"{event} did not trade at the best {maker_side} {best}"
        self.last_trade = event
        self.last_prices[event.symbol] = event.price
        for order_id, (symbol, side, stop_price, reached) in self.stops.items():
            if symbol == event.symbol and not reached and _reaches(side, event.price,
                                                                   stop_price):
                self.stops[order_id] = (symbol, side, stop_price, True)

    def _apply_book_change(self, event: BookChanged) -> None:
        key = (event.symbol, event.side, event.price)
        queue = self.levels.setdefault(key, [])
        ids = [entry[0] for entry in queue]
        tally = self.tallies[event.order_id]
        if event.action is BookAction.ADD:
            assert tally.tif is TimeInForce.GTC and tally.order_type in (
                OrderType.LIMIT, OrderType.STOP_LIMIT), f"{event}: only gtc limits rest"
            assert tally.order_type is OrderType.LIMIT or tally.triggered, \
                f"{event}: a stop entered the book before it triggered"
            assert event.order_id not in ids
            queue.append([event.order_id, event.order_qty])
        elif event.action is BookAction.EXECUTE:
            trade = self.last_trade
            assert trade is not None and trade.price == event.price
            assert event.order_id in (trade.buy_order_id, trade.sell_order_id)
            # FIFO: a level fills its oldest order first
            assert ids and ids[0] == event.order_id, \
                f"{event}: executed out of queue order {ids}"
            queue[0][1] = event.order_qty
            if not event.order_qty:
                queue.pop(0)
        elif event.action is BookAction.CANCEL:
            assert event.order_id in ids and event.order_qty == 0
            queue.pop(ids.index(event.order_id))
        else:  # an in-place reduction keeps the order where it was
            index = ids.index(event.order_id)
            assert 0 < event.order_qty <= queue[index][1], f"{event} grew in place"
            queue[index][1] = event.order_qty
        assert event.level_qty == sum(entry[1] for entry in queue), \
            f"{event}: level_qty disagrees with the replica {queue}"
        if not queue:
            del self.levels[key]

    def _check_engine(self) -> None:
        engine = self.engine
        for symbol, book in engine.books.items():
            bid, ask = book.best_bid(), book.best_ask()
            assert bid is None or ask is None or bid < ask, f"{symbol} crossed at rest"
            for side in Side:
                replica = [(price, order_id, leaves)
                           for (s, sd, price), queue in sorted(
                               self.levels.items(), reverse=side is Side.BUY)
                           if s == symbol and sd is side for order_id, leaves in queue]
                actual = [(o.price, o.order_id, o.leaves_qty) for o in book.iter_orders(side)]
                assert replica == actual, f"book_changed replica of {symbol} {side} is off"
            held = sum(account.positions[symbol].qty
                       for account in engine.ledger.accounts.values()
                       if symbol in account.positions)
            assert held == 0, f"{symbol} positions sum to {held}"
        ledger = engine.ledger
        assert sum(a.cash for a in ledger.accounts.values()) + ledger.fee_income == \
            len(ledger.accounts) * ledger.initial_cash, "cash was created or destroyed"
        for order_id, tally in self.tallies.items():
            live = engine.orders.get(order_id)
            if tally.done:
                assert live is None, f"order {order_id} is done but still live"
                assert tally.qty == tally.filled + tally.canceled
            else:
                assert live is not None, f"order {order_id} vanished without an event"
                assert (live.qty, live.leaves_qty) == (tally.qty, tally.leaves), \
                    f"order {order_id}: engine {live.qty}/{live.leaves_qty} != events"
            if tally.tif is TimeInForce.FOK and tally.done:
                assert tally.filled in (0, tally.accepted_qty), \
                    f"fill-or-kill order {order_id} filled {tally.filled} of {tally.qty}"
            if tally.tif is not TimeInForce.GTC or tally.order_type in (
                    OrderType.MARKET, OrderType.STOP):
                # immediate orders never outlive their command (stops only once triggered)
                assert tally.done or (not tally.triggered and tally.order_type in (
                    OrderType.STOP, OrderType.STOP_LIMIT))
        assert set(engine.orders) == {i for i, t in self.tallies.items() if not t.done}
        # a stop waits only until a trade prints at or through its stop price
        reached = [order_id for order_id, stop in self.stops.items() if stop[3]]
        assert not reached, f"stops {reached} still wait after a print reached them"


def _reaches(side: Side, price: int, stop_price: int) -> bool:
    """Is a print at ``price`` at or through a ``side`` stop at ``stop_price``?"""
    return price >= stop_price if side is Side.BUY else price <= stop_price


def run_stream(market: Market, stream: list[tuple[Command, int]]) -> Harness:
    harness = Harness(market.config)
    checker = Checker(harness.engine)
    for command, ts in stream:
        checker.apply(command, ts, harness.send(command, ts))
    return harness


def assert_replay_is_identical(market: Market, harness: Harness) -> None:
    replay = Harness(market.config)
    for command, ts in harness.commands:
        replay.send(command, ts)
    assert replay.events == harness.events
    assert replay.engine.state_hash() == harness.engine.state_hash()


@PROPERTY_SETTINGS
@given(streams(BROAD))
def test_hold_every_invariant_when_streams_trade_two_symbols(
        stream: list[tuple[Command, int]]) -> None:
    harness = run_stream(BROAD, stream)
    assert_replay_is_identical(BROAD, harness)


@PROPERTY_SETTINGS
@given(streams(TIGHT))
def test_hold_every_invariant_when_limits_and_margin_bind(
        stream: list[tuple[Command, int]]) -> None:
    harness = run_stream(TIGHT, stream)
    assert_replay_is_identical(TIGHT, harness)


def _event_kinds_generated(market: Market) -> set[str]:
    seen: set[str] = set()

    @settings(max_examples=100, deadline=None, derandomize=True, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(streams(market))
    def collect(stream: list[tuple[Command, int]]) -> None:
        harness = Harness(market.config)
        for command, ts in stream:
            harness.send(command, ts)
        for event in harness.events:
            seen.add(type(event).__name__)
            if isinstance(event, OrderCanceled):
                seen.add(f"canceled:{event.reason.value}")
            if isinstance(event, OrderAccepted) and event.liquidation:
                seen.add("liquidation")
            if isinstance(event, REJECT_EVENTS):
                seen.add(f"code:{event.code.value}")

    collect()
    return seen


def test_cover_the_interesting_paths_when_streams_are_generated() -> None:
    """Guard against a generator that silently stops reaching the rules under test:
    seeded streams of both markets must still produce trades, every kind of reject,
    triggers, STP cancels, amends and liquidations."""
    # In a fresh interpreter: Hypothesis keeps process-wide state that shifts even
    # derandomized generation after other Hypothesis tests ran, so in-process the result
    # would depend on test order. On the pure core: generation also draws on constants
    # Hypothesis reads from the source of every local module imported, and a compiled
    # module (native_core.py) has none, so the streams would depend on the build. What
    # is checked here is the generator, and both builds obey the same rules.
    code = ("import json; from tests.test_properties import BROAD, TIGHT, "
            "_event_kinds_generated as kinds; "
            "print(json.dumps(sorted(kinds(BROAD) | kinds(TIGHT))))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=110, check=True,
                          env={**os.environ, "OPENMARKETSIM_CORE": "pure"})
    seen = set(json.loads(done.stdout.strip().splitlines()[-1]))
    wanted = {"Trade", "OrderAmended", "OrderTriggered", "OrderRejected", "AmendRejected",
              "CancelRejected", "MarketStatusChanged", "TraderStatusChanged", "liquidation",
              "canceled:self_trade", "canceled:fok", "canceled:ioc", "canceled:user",
              } | {f"code:{code}" for code in (
                  "POST_ONLY_WOULD_CROSS", "RATE_LIMITED", "RISK_INSUFFICIENT_MARGIN",
                  "UNKNOWN_ORDER", "DUPLICATE_CLIENT_ORDER_ID", "MARKET_CLOSED",
                  "RISK_MAX_POSITION", "RISK_MAX_OPEN_ORDERS", "RISK_MAX_ORDER_QTY",
                  "RISK_PRICE_BAND", "INVALID_FIELD", "TRADER_LIQUIDATING")}
    assert wanted <= seen, f"never generated: {sorted(wanted - seen)}"
