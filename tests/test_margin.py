"""Margin: initial margin to open exposure, maintenance margin and liquidation.

Every trader starts with 1000.00 here, so 100 lots at 100.00 (10000 ticks) is a 10,000
notional that needs exactly the 1,000 of initial margin (10%) a trader has, and keeps it
while equity stays above 5% of the position's value at the mark.
"""

from __future__ import annotations

import random
from unittest.mock import ANY

import pytest

from config import MONEY_SCALE
from margin_risk_manager import MarginWatch, band_reach, exceeds
from models import (
    AmendOrder,
    AmendRejected,
    BookAction,
    BookChanged,
    CancelReason,
    OrderAccepted,
    OrderCanceled,
    OrderRejected,
    OrderType,
    RejectCode,
    SetMarketOpen,
    TimeInForce,
    Trade,
    TraderStatus,
    TraderStatusChanged,
)
from positions import Account, cash_headroom
from tests.conftest import (
    ALT,
    BUY,
    SELL,
    SYM,
    TICK_VALUE,
    Harness,
    limit,
    make_config,
    market,
    of_type,
    position,
    trade,
    two_symbol_config,
)

CASH = 1_000 * MONEY_SCALE
TV = TICK_VALUE
EXECUTE, CANCEL = BookAction.EXECUTE, BookAction.CANCEL


def margin_harness(**margin: object) -> Harness:
    return Harness(make_config(margin={"initial_cash": 1_000.0, **margin}))


class AnyStr(str):
    """``ANY`` for a str field: a compiled event accepts only a str there."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str)

    __hash__ = str.__hash__


ANY_STR = AnyStr()


def liquidation_ack(ts: int, order_id: int, trader: str, side: str, qty: int) -> OrderAccepted:
    # the exchange names its own liquidation orders; the name is not part of the contract
    return OrderAccepted(ts, order_id, trader, ANY_STR, SYM, BUY if side == "buy" else SELL,
                         OrderType.MARKET, None, None, qty, TimeInForce.IOC, False, True)


def go_long_100_at_100(h: Harness) -> None:
    """L buys 100 lots at 10000 from M and also rests a sell (orders 1, 2 and 3)."""
    h.send_all([limit("M", "m1", SELL, 100, 10_000), limit("L", "l1", BUY, 100, 10_000),
                limit("L", "l2", SELL, 50, 10_500)])
    assert h.engine.trader_status("L") is TraderStatus.OK


# ------------------------------------------------------------------ initial margin


def test_reject_order_when_it_needs_more_initial_margin_than_equity() -> None:
    h = margin_harness()
    assert h.send(limit("L", "l1", BUY, 101, 10_000)) == [
        OrderRejected(h.now, "L", "l1", RejectCode.RISK_INSUFFICIENT_MARGIN, ANY)]
    assert of_type(h.send(limit("L", "l2", BUY, 100, 10_000)), OrderAccepted) != []


def test_count_only_the_worse_side_when_orders_rest_on_both_sides() -> None:
    h = margin_harness()
    h.send(limit("L", "l1", BUY, 100, 9_900))
    # either side filling leaves at most 100 lots: the sell needs no extra margin
    assert of_type(h.send(limit("L", "l2", SELL, 100, 10_100)), OrderAccepted) != []
    assert of_type(h.send(limit("L", "l3", BUY, 1, 9_800)), OrderRejected)[0].code is \
        RejectCode.RISK_INSUFFICIENT_MARGIN


def test_value_new_exposure_at_the_mid_when_nothing_has_printed() -> None:
    h = margin_harness()
    h.send_all([limit("M", "m1", BUY, 1, 9_400), limit("M", "m2", SELL, 1, 9_600)])
    # marked at the 9500 mid, 1000 of equity carries 105 lots, not the 100 of the reference
    assert of_type(h.send(limit("L", "l1", BUY, 106, 9_000)), OrderRejected)[0].code is \
        RejectCode.RISK_INSUFFICIENT_MARGIN
    assert of_type(h.send(limit("L", "l2", BUY, 105, 9_000)), OrderAccepted) != []


def test_reject_amend_when_the_added_qty_needs_more_margin_than_equity() -> None:
    h = margin_harness()
    h.send(limit("L", "l1", BUY, 90, 9_900))
    assert h.send(AmendOrder("L", 1, None, None, 101)) == [
        AmendRejected(h.now, "L", 1, None, RejectCode.RISK_INSUFFICIENT_MARGIN, ANY)]
    assert h.queue(BUY) == [(9_900, 1, 90)]


def test_accept_any_size_when_margin_is_disabled() -> None:
    h = margin_harness(enabled=False)
    assert of_type(h.send(limit("L", "l1", BUY, 1_000, 10_000)), OrderAccepted) != []


def test_report_margin_used_when_a_position_is_open() -> None:
    h = margin_harness()
    go_long_100_at_100(h)
    assert h.engine.margin_used("L") == 100 * 10_000 * TV // 10


# ------------------------------------------------------------------ maintenance


def test_keep_the_trader_ok_when_the_mark_stays_above_maintenance() -> None:
    h = margin_harness()
    go_long_100_at_100(h)
    # at 9500 equity is 500 against 475 of maintenance
    h.send_all([limit("B", "b1", BUY, 1, 9_500), limit("S", "s1", SELL, 1, 9_500)])
    assert of_type(h.events, TraderStatusChanged) == []
    assert h.live_ids("L") == [3]


def test_liquidate_when_a_mark_move_takes_equity_below_maintenance() -> None:
    h = margin_harness()
    go_long_100_at_100(h)
    h.send_all([limit("B1", "b1", BUY, 1, 9_400), limit("B2", "b2", BUY, 100, 9_300)])
    # a print at 9400: equity 1000 - 600 = 400 < 470 of maintenance
    events = h.send(limit("S", "s1", SELL, 1, 9_400))
    ts = h.now
    liquidation = of_type(events, OrderAccepted)[1]
    assert events[5:] == [
        TraderStatusChanged(ts, "L", TraderStatus.MARGIN_CALL),
        OrderCanceled(ts, 3, "L", "l2", SYM, SELL, 50, CancelReason.LIQUIDATION),
        BookChanged(SYM, CANCEL, 3, SELL, 10_500, 0, 0),
        TraderStatusChanged(ts, "L", TraderStatus.LIQUIDATING),
        liquidation_ack(ts, 7, "L", "sell", 100),
        trade(ts, 3, 9_300, 100, SELL, buy=(5, "B2", "b2"),
              sell=(7, "L", liquidation.client_order_id), buy_leaves=0, sell_leaves=0,
              liquidation=True),
        BookChanged(SYM, EXECUTE, 5, BUY, 9_300, 0, 0),
        position(ts, "B2", 100, 930_000, CASH - 100 * 9_300 * TV),
        position(ts, "L", 0, 0, CASH - 100 * 700 * TV, -100 * 700 * TV),
        TraderStatusChanged(ts, "L", TraderStatus.OK),
    ]
    assert h.engine.trader_status("L") is TraderStatus.OK
    assert h.live_ids("L") == []


def test_liquidate_in_trader_id_order_when_one_print_breaches_several() -> None:
    """The checks after a match may run in any order until one fails; from there the
    liquidations must still follow the trader ids. L2 went long first, so its band
    comes first in the watch, and a print at 9400 breaches both longs."""
    h = margin_harness()
    h.send_all([limit("M1", "m1", SELL, 100, 10_000), limit("M2", "m2", SELL, 100, 10_000),
                limit("L2", "l2", BUY, 100, 10_000), limit("L1", "l1", BUY, 100, 10_000),
                limit("B1", "b1", BUY, 1, 9_400), limit("B2", "b2", BUY, 100, 9_300),
                limit("B3", "b3", BUY, 100, 9_300)])
    events = h.send(limit("S", "s1", SELL, 1, 9_400))
    margin_calls = [e.trader_id for e in of_type(events, TraderStatusChanged)
                    if e.status is TraderStatus.MARGIN_CALL]
    assert margin_calls == ["L1", "L2"]
    assert [(t.sell_trader, t.price, t.liquidation) for t in of_type(events, Trade)] \
        == [("S", 9_400, False), ("L1", 9_300, True), ("L2", 9_300, True)]
    assert h.engine.trader_status("L1") is h.engine.trader_status("L2") is TraderStatus.OK


def test_buy_back_a_short_when_a_rally_breaches_maintenance() -> None:
    h = margin_harness()
    h.send_all([limit("M", "m1", BUY, 100, 10_000), limit("L", "l1", SELL, 100, 10_000),
                limit("A", "a1", SELL, 100, 10_700)])
    # at 10600 equity is 1000 - 600 = 400 against 530 of maintenance
    h.send_all([limit("S", "s1", SELL, 1, 10_600), limit("B", "b1", BUY, 1, 10_600)])
    liquidations = [e for e in of_type(h.events, OrderAccepted) if e.liquidation]
    assert liquidations == [liquidation_ack(h.now, 6, "L", "buy", 100)]
    assert [(t.price, t.qty, t.liquidation) for t in of_type(h.events, Trade)][-1] == \
        (10_700, 100, True)
    assert h.engine.position_report("L", SYM).position == 0


def test_stay_liquidating_and_retry_on_the_next_print_when_no_liquidity_is_found() -> None:
    h = margin_harness()
    go_long_100_at_100(h)
    h.send(limit("B1", "b1", BUY, 1, 9_400))
    events = h.send(limit("S", "s1", SELL, 1, 9_400))
    ts = h.now
    assert events[-3:] == [
        TraderStatusChanged(ts, "L", TraderStatus.LIQUIDATING),
        liquidation_ack(ts, 6, "L", "sell", 100),
        OrderCanceled(ts, 6, "L", ANY_STR, SYM, SELL, 100, CancelReason.IOC),
    ]
    assert h.engine.trader_status("L") is TraderStatus.LIQUIDATING
    assert h.engine.position_report("L", SYM).position == 100
    # a liquidating trader may not trade its way out by itself
    assert h.send(limit("L", "l3", SELL, 100, 9_300)) == [
        OrderRejected(h.now, "L", "l3", RejectCode.TRADER_LIQUIDATING, ANY)]
    assert h.send(market("L", "l4", SELL, 1)) == [
        OrderRejected(h.now, "L", "l4", RejectCode.TRADER_LIQUIDATING, ANY)]
    # new bids alone are no print: nothing happens until the next trade
    assert h.send(limit("B2", "b2", BUY, 101, 9_300))[-1] == \
        BookChanged(SYM, BookAction.ADD, 7, BUY, 9_300, 101, 101)
    events = h.send(limit("S", "s2", SELL, 1, 9_300))
    ts = h.now
    assert [(t.sell_trader, t.qty, t.liquidation) for t in of_type(events, Trade)] == [
        ("S", 1, False), ("L", 100, True)]
    assert of_type(events, TraderStatusChanged) == [
        TraderStatusChanged(ts, "L", TraderStatus.OK)]
    assert h.engine.trader_status("L") is TraderStatus.OK
    assert h.engine.position_report("L", SYM).position == 0
    # and, back to ok, it trades again
    assert of_type(h.send(limit("L", "l5", BUY, 1, 9_200)), OrderAccepted) != []


def test_hold_the_liquidation_when_its_market_is_closed() -> None:
    h = Harness(two_symbol_config(margin={"initial_cash": 1_000.0}))
    go_long_100_at_100(h)
    h.send_all([limit("B1", "b1", BUY, 1, 9_400), limit("S", "s1", SELL, 1, 9_400)])
    assert h.engine.trader_status("L") is TraderStatus.LIQUIDATING  # no bids left to sell to
    h.send_all([limit("B2", "b2", BUY, 100, 9_300), SetMarketOpen(False, SYM)])
    # a print in another, open market must not make the closed one trade
    events = h.send_all([limit("x", "x1", SELL, 1, 5_000, symbol=ALT),
                         limit("y", "y1", BUY, 1, 5_000, symbol=ALT)])
    assert [t.symbol for t in of_type(events, Trade)] == [ALT]
    assert h.engine.trader_status("L") is TraderStatus.LIQUIDATING
    assert h.engine.position_report("L", SYM).position == 100
    assert h.depth(BUY) == [(9_300, 100)]
    # once it reopens, the next print resumes the liquidation
    h.send(SetMarketOpen(True, SYM))
    events = h.send_all([limit("x", "x2", SELL, 1, 5_000, symbol=ALT),
                         limit("y", "y2", BUY, 1, 5_000, symbol=ALT)])
    assert [(t.symbol, t.qty, t.liquidation) for t in of_type(events, Trade)] == [
        (ALT, 1, False), (SYM, 100, True)]
    assert h.engine.trader_status("L") is TraderStatus.OK


def test_watch_pops_exactly_the_traders_whose_band_a_mark_leaves() -> None:
    """The watch against a plain model (every armed band, scanned): a seeded mix of
    arming, re-arming with wider or narrower bands, disarming and marks moving in two
    symbols, where the watch's per-symbol bound goes stale on the safe side."""
    rng = random.Random(5)
    watch = MarginWatch()
    model: dict[str, dict[str, tuple[int, int]]] = {}  # trader -> symbol -> band
    traders, symbols = [f"t{i}" for i in range(12)], [SYM, ALT]
    popped = 0
    for _ in range(4_000):
        roll = rng.random()
        trader = rng.choice(traders)
        if roll < 0.45:
            bands = []
            for symbol in rng.sample(symbols, rng.randint(1, 2)):
                centre, reach = rng.randint(90, 110), rng.randint(0, 15)
                bands.append((symbol, centre - reach, centre + reach))
            watch.arm(trader, bands)
            model[trader] = {symbol: (low, high) for symbol, low, high in bands}
        elif roll < 0.55:
            watch.disarm(trader)
            model.pop(trader, None)
        else:
            symbol, mark = rng.choice(symbols), rng.randint(75, 125)
            expected = sorted(t for t, bands in model.items() if symbol in bands
                              and not bands[symbol][0] <= mark <= bands[symbol][1])
            assert sorted(watch.pop_outside(symbol, mark)) == expected
            for t in expected:
                del model[t]
            popped += len(expected)
    assert popped > 500, "the sequence must pop often enough to mean something"


def test_compare_an_amount_with_the_cash_exactly_either_side_of_machine_ints() -> None:
    """``exceeds`` decides a machine-int amount against a bignum cash without comparing
    the two; it must still be ``amount > cash`` exactly, at and around every edge."""
    edges = [0, 1, 10**20, (1 << 62) - 1, 1 << 62, (1 << 62) + 1, 1 << 63, 1 << 64]
    values = sorted({sign * edge + delta for edge in edges for sign in (1, -1)
                     for delta in (-1, 0, 1)})
    for amount in values:
        for cash in values:
            # the cash's own headroom, and one not known (-1), which any cash may have
            for headroom in (cash_headroom(cash), -1):
                assert exceeds(amount, cash, headroom) is (amount > cash), (amount, cash)


def test_the_cash_headroom_stays_a_lower_bound_through_payments() -> None:
    """``Account.pay`` keeps ``cash_headroom`` in step: whenever it is 0 or more, the
    cash is at least 2**62 plus it, and a cash that starts or falls back beyond machine
    ints with a spent headroom has it worked out again rather than lost."""
    rng = random.Random(13)
    for start in (10**20, (1 << 62) + 5, (1 << 62) - 5, 10**6, -(10**20)):
        account = Account("t", start)
        for _ in range(5_000):
            outflow = rng.choice([1, -1]) * rng.choice([1, 10**6, 10**14, 1 << 60])
            account.pay(outflow)
            headroom = account.cash_headroom
            assert headroom < 1 << 62
            if headroom >= 0:
                assert account.cash >= (1 << 62) + headroom, (start, account.cash, headroom)
            elif account.cash >= 1 << 62:
                assert outflow < 0, "only an inflow may leave a vast cash unmarked"
    big = Account("b", (1 << 62) + 10)
    big.pay(11)  # spends more than the headroom: below machine ints now
    assert big.cash_headroom == -1
    vast = Account("v", 10**20)
    vast.pay((1 << 61) + 1)  # more than the capped headroom, far less than the cash's
    assert vast.cash_headroom == cash_headroom(10**20 - (1 << 61) - 1) == 1 << 61


def test_validate_fails_when_an_account_overstates_its_cash_headroom() -> None:
    """The headroom is derived state kept in step by ``pay``: the engine's ``validate``,
    run after every command in these tests, must catch it overstating the cash."""
    h = margin_harness(initial_cash=10.0**12)
    go_long_100_at_100(h)
    account = h.engine.traders["L"].account
    assert account is not None and account.cash_headroom >= 0  # a cash beyond machine ints
    account.cash_headroom = account.cash
    with pytest.raises(AssertionError, match="headroom overstates"):
        h.engine.validate()


def _exact_reach(spare: int, per_tick_cost: int) -> int:
    return max(spare, 0) * 10_000 // per_tick_cost


def test_band_reach_is_the_spare_over_the_per_tick_cost_exactly_for_machine_int_cash() -> None:
    """``band_reach`` splits the cash off the division; it must still be
    ``max(cash + spare_beyond_cash, 0) * 10_000 // per_tick_cost`` exactly, for a cash
    up to the edge of machine ints and a spare of -1, 0 and beyond."""
    rng = random.Random(11)
    for _ in range(20_000):
        cash = rng.choice([0, 1, 10**15, (1 << 62) - 1, -(1 << 62)]) \
            + rng.randint(-10**6, 10**6)
        cash = min(cash, (1 << 62) - 1)
        per_tick_cost = rng.choice([1, 7, 10_500, 10**10, (1 << 62) + 3]) \
            * rng.randint(1, 1_000)
        spare = rng.choice([-1, 0, 1, 2, rng.randint(3, 10**25)])
        assert band_reach(cash, cash_headroom(cash), spare - cash, per_tick_cost) == \
            _exact_reach(spare, per_tick_cost), (cash, spare, per_tick_cost)


def test_band_reach_for_bignum_cash_is_a_wide_lower_bound_in_machine_ints() -> None:
    """Beyond machine ints the reach may be narrower than exact (only ever narrower,
    which is safe), stays a machine int while the slack leaves at least 2**61 spare, and
    still spans a million ticks for a
    position of 1,000 lots at a tick value of 10**6 units."""
    rng = random.Random(12)
    realistic = (10_000 + 50) * 1_000 * 10**6
    assert band_reach(10**20, cash_headroom(10**20), 0, realistic) >= 1_000_000
    for _ in range(20_000):
        cash = rng.choice([1 << 62, 10**20, 1 << 70, 10**30]) + rng.randint(0, 10**6)
        per_tick_cost = (10_000 + rng.choice([0, 50, 2_500])) * rng.choice(
            [1, 1_000, 10**6, 10**12, 10**20])
        spare = rng.choice([-1, 0, 1, 1 << 61, cash // 2, cash, cash + 10**9])
        reach = band_reach(cash, cash_headroom(cash), spare - cash, per_tick_cost)
        assert 0 <= reach <= _exact_reach(spare, per_tick_cost), (cash, spare, per_tick_cost)
        if spare - cash >= -(1 << 61):  # else the spare is exact, and may be a bignum
            assert reach < 1 << 61, (cash, spare, per_tick_cost)
