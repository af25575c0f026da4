"""Exact accounting: positions, average price, cash, realized/unrealized PnL, fees, marks."""

from __future__ import annotations

import pickle

import pytest

from config import MONEY_SCALE
from engine import Engine
from models import BookAction, BookChanged, PositionChanged, Trade
from positions import Ledger, PositionReport, to_currency
from tests.conftest import (
    ALT,
    BUY,
    INITIAL_CASH,
    SELL,
    SYM,
    TICK_VALUE,
    Harness,
    accepted,
    limit,
    make_config,
    of_type,
    position,
    trade,
    two_symbol_config,
)

START = 1_000 * MONEY_SCALE
TV = TICK_VALUE


@pytest.fixture
def ledger() -> Ledger:
    return Ledger(START, {SYM: TV})


def fills(ledger: Ledger, trader: str, *trades: tuple[bool, int, int]) -> None:
    for is_buy, price, qty in trades:
        ledger.apply_fill(trader, SYM, is_buy, price, qty, 0)


def assert_equity_identity(ledger: Ledger, trader: str, mark: int) -> None:
    """Realized is net of fees, so equity = start + realized + unrealized, exactly."""
    report = ledger.report(trader, SYM, {SYM: mark})
    assert report.equity == START + report.realized_pnl + report.unrealized_pnl


# ------------------------------------------------------------------ the ledger alone


def test_open_a_long_when_buying_from_flat(ledger: Ledger) -> None:
    held = ledger.apply_fill("a", SYM, True, 10_000, 3, 0)
    assert (held.qty, held.open_cost, held.realized, held.fees) == (3, 30_000, 0, 0)
    assert held.avg_price() == 10_000.0
    assert ledger.accounts["a"].cash == START - 3 * 10_000 * TV


def test_average_the_entry_when_adding_to_a_position(ledger: Ledger) -> None:
    fills(ledger, "a", (True, 100, 1), (True, 103, 2))
    held = ledger.accounts["a"].positions[SYM]
    assert (held.qty, held.open_cost) == (3, 306)
    assert held.avg_price() == 102.0


def test_realize_pnl_pro_rata_when_partially_closing(ledger: Ledger) -> None:
    fills(ledger, "a", (True, 100, 2), (True, 101, 2), (False, 110, 1))
    held = ledger.accounts["a"].positions[SYM]
    # the closed lot carries a quarter of the 402 cost (floored): 100, so 110 - 100 = 10
    assert (held.qty, held.open_cost, held.realized) == (3, 302, 10 * TV)
    report = ledger.report("a", SYM, {SYM: 105})
    assert report.unrealized_pnl == (3 * 105 - 302) * TV
    assert report.equity == ledger.accounts["a"].cash + 3 * 105 * TV
    assert_equity_identity(ledger, "a", 105)


@pytest.mark.parametrize("opening_side", [True, False])
def test_realize_the_exact_total_when_rounded_partial_closes_flatten(
        ledger: Ledger, opening_side: bool) -> None:
    # entries 100, 100, 101: a third of the cost is not a whole tick
    fills(ledger, "a", (opening_side, 100, 2), (opening_side, 101, 1),
          (not opening_side, 100, 1), (not opening_side, 100, 2))
    held = ledger.accounts["a"].positions[SYM]
    assert (held.qty, held.open_cost) == (0, 0)
    # bought 301 and sold 300 (long) or the reverse (short): exactly one tick either way
    assert held.realized == (-1 if opening_side else 1) * TV
    assert ledger.accounts["a"].cash == START + held.realized


def test_flip_to_short_when_a_sell_exceeds_the_long(ledger: Ledger) -> None:
    fills(ledger, "a", (True, 100, 5), (False, 110, 8))
    held = ledger.accounts["a"].positions[SYM]
    assert (held.qty, held.open_cost, held.realized) == (-3, -330, 50 * TV)
    assert held.avg_price() == 110.0
    assert_equity_identity(ledger, "a", 120)


def test_flip_to_long_when_a_buy_exceeds_the_short(ledger: Ledger) -> None:
    fills(ledger, "a", (False, 100, 2), (True, 90, 5))
    held = ledger.accounts["a"].positions[SYM]
    assert (held.qty, held.open_cost, held.realized) == (3, 270, 20 * TV)
    assert ledger.report("a", SYM, {SYM: 95}).unrealized_pnl == 15 * TV


def test_lose_on_a_short_when_buying_back_higher(ledger: Ledger) -> None:
    fills(ledger, "a", (False, 100, 4), (True, 104, 1))
    held = ledger.accounts["a"].positions[SYM]
    assert (held.qty, held.open_cost, held.realized) == (-3, -300, -4 * TV)
    assert ledger.report("a", SYM, {SYM: 90}).unrealized_pnl == 30 * TV
    assert_equity_identity(ledger, "a", 90)


def test_charge_a_fee_to_cash_and_realized_when_a_fill_pays_one(ledger: Ledger) -> None:
    held = ledger.apply_fill("a", SYM, True, 100, 2, 7)
    assert ledger.accounts["a"].cash == START - 200 * TV - 7
    assert (held.realized, held.fees) == (-7, 7)
    assert ledger.fee_income == 7
    assert_equity_identity(ledger, "a", 100)


def test_credit_a_rebate_when_the_fee_is_negative(ledger: Ledger) -> None:
    held = ledger.apply_fill("m", SYM, False, 100, 2, -3)
    assert ledger.accounts["m"].cash == START + 200 * TV + 3
    assert (held.realized, held.fees) == (3, -3)
    assert ledger.fee_income == -3


def test_report_a_flat_position_when_the_trader_never_traded(ledger: Ledger) -> None:
    assert ledger.report("z", SYM, {SYM: 100}) == PositionReport(
        "z", SYM, 0, 0.0, START, 0, 0, START, 0)


def test_convert_units_to_currency_when_leaving_the_core() -> None:
    assert to_currency(123_456_000_000) == 1234.56
    assert to_currency(-MONEY_SCALE // 4) == -0.25


# ------------------------------------------------------------------ through the engine


def test_charge_the_taker_and_rebate_the_maker_when_fees_are_configured() -> None:
    h = Harness(make_config(fees={"maker_fee_bps": -0.5, "taker_fee_bps": 1.0}))
    h.send(limit("m", "m1", SELL, 10, 10_000))
    taker = limit("t", "t1", BUY, 10, 10_000)
    events = h.send(taker)
    ts = h.now
    notional = 10 * 10_000 * TV
    taker_fee, maker_fee = notional // 10_000, -(notional // 20_000)  # 1 bp, -0.5 bp
    assert (taker_fee, maker_fee) == (10_000_000, -5_000_000)
    assert events == [
        accepted(taker, 2, ts),
        trade(ts, 1, 10_000, 10, BUY, buy=(2, "t", "t1"), sell=(1, "m", "m1"), buy_leaves=0,
              sell_leaves=0, buy_fee=taker_fee, sell_fee=maker_fee),
        BookChanged(SYM, BookAction.EXECUTE, 1, SELL, 10_000, 0, 0),
        position(ts, "t", 10, 100_000, INITIAL_CASH - notional - taker_fee, -taker_fee,
                 taker_fee),
        position(ts, "m", -10, -100_000, INITIAL_CASH + notional - maker_fee, -maker_fee,
                 maker_fee),
    ]
    assert h.engine.ledger.fee_income == taker_fee + maker_fee


def test_put_each_fee_on_its_side_when_the_seller_is_the_taker() -> None:
    h = Harness(make_config(fees={"maker_fee_bps": 0.2, "taker_fee_bps": 3.0}))
    h.send(limit("m", "m1", BUY, 3, 9_000))
    events = h.send(limit("t", "t1", SELL, 3, 9_000))
    notional = 3 * 9_000 * TV
    (printed,) = of_type(events, Trade)
    assert (printed.buy_fee, printed.sell_fee) == (notional * 20 // 1_000_000,
                                                   notional * 300 // 1_000_000)


def test_conserve_cash_plus_fee_income_when_many_trades_print() -> None:
    h = Harness(make_config(fees={"maker_fee_bps": -0.3, "taker_fee_bps": 1.7}))
    h.send_all([limit("a", "a1", SELL, 7, 10_003), limit("b", "b1", SELL, 5, 10_001),
                limit("c", "c1", BUY, 9, 10_003), limit("a", "a2", BUY, 4, 9_998),
                limit("b", "b2", SELL, 6, 9_998), limit("c", "c2", SELL, 2, 10_050),
                limit("a", "a3", BUY, 2, 10_050)])
    ledger = h.engine.ledger
    assert len(of_type(h.events, Trade)) == 4
    assert sum(a.cash for a in ledger.accounts.values()) + ledger.fee_income == \
        len(ledger.accounts) * INITIAL_CASH
    assert sum(a.positions[SYM].qty for a in ledger.accounts.values()
               if SYM in a.positions) == 0


def test_report_realized_and_unrealized_pnl_when_part_of_a_position_is_sold(
        h: Harness) -> None:
    h.send_all([limit("m", "m1", SELL, 10, 10_000), limit("t", "t1", BUY, 10, 10_000),
                limit("n", "n1", BUY, 4, 10_050), limit("t", "t2", SELL, 4, 10_050)])
    last = of_type(h.events, PositionChanged)[-1]  # the buyer reports first, then the seller
    assert last == position(h.now, "t", 6, 60_000, INITIAL_CASH - 100_000 * TV + 40_200 * TV,
                            200 * TV)
    report = h.engine.position_report("t", SYM)
    assert report == PositionReport("t", SYM, 6, 10_000.0, last.cash, 200 * TV, 300 * TV,
                                    INITIAL_CASH + 500 * TV, 0)


def test_mark_at_the_reference_when_the_book_is_empty_or_one_sided(h: Harness) -> None:
    assert h.engine.mark_price(SYM) == 10_000
    h.send(limit("a", "a1", BUY, 1, 9_500))
    assert h.engine.mark_price(SYM) == 10_000


def test_mark_at_the_mid_when_both_sides_rest_and_nothing_printed(h: Harness) -> None:
    h.send_all([limit("a", "a1", BUY, 1, 9_999), limit("b", "b1", SELL, 1, 10_102)])
    assert h.engine.mark_price(SYM) == 10_050  # floor of 10050.5: integer ticks


def test_mark_at_the_last_trade_when_one_has_printed(h: Harness) -> None:
    h.send_all([limit("m", "m1", SELL, 2, 10_020), limit("t", "t1", BUY, 1, 10_020),
                limit("b", "b1", BUY, 1, 9_900)])
    assert h.engine.mark_price(SYM) == 10_020  # not the 9960 mid of the book now
    report = h.engine.position_report("m", SYM)
    assert (report.unrealized_pnl, report.equity) == (0, INITIAL_CASH)
    h.send_all([limit("x", "x1", SELL, 1, 10_010), limit("y", "y1", BUY, 1, 10_010)])
    report = h.engine.position_report("m", SYM)
    assert report.unrealized_pnl == 10 * TV  # short 1 from 10020, marked at 10010
    assert report.equity == INITIAL_CASH + 10 * TV


def test_leave_the_state_unchanged_when_traders_are_only_queried(h: Harness) -> None:
    h.send_all([limit("m", "m1", SELL, 2, 10_020), limit("t", "t1", BUY, 1, 10_020)])
    before, board = h.engine.state_hash(), h.engine.leaderboard()
    for trader in ("t", "stranger"):
        h.engine.position_report(trader, SYM)
        h.engine.margin_used(trader)
        h.engine.open_orders(trader)
        h.engine.trader_status(trader)
    # queries are not sequenced: answering one must not open an account or move state
    assert h.engine.state_hash() == before
    assert h.engine.leaderboard() == board
    assert h.engine.position_report("stranger", SYM) == PositionReport(
        "stranger", SYM, 0, 0.0, INITIAL_CASH, 0, 0, INITIAL_CASH, 0)


def test_rank_the_leaderboard_by_equity_when_traders_have_pnl(h: Harness) -> None:
    h.send_all([limit("m", "m1", SELL, 2, 10_000), limit("t", "t1", BUY, 2, 10_000),
                limit("x", "x1", SELL, 1, 10_100), limit("y", "y1", BUY, 1, 10_100)])
    # marked at 10100: t gains 200 ticks, m loses 200; x and y are flat on the mark
    rows = h.engine.leaderboard()
    assert [(r["trader_id"], r["position"], r["equity"]) for r in rows] == [
        ("t", 2, INITIAL_CASH + 200 * TV), ("x", -1, INITIAL_CASH), ("y", 1, INITIAL_CASH),
        ("m", -2, INITIAL_CASH - 200 * TV)]
    assert rows[0]["cash"] == INITIAL_CASH - 20_000 * TV and rows[0]["realized_pnl"] == 0


def held_positions_agree(engine: Engine) -> None:
    """Every position a trader's open quantity holds is its ledger account's."""
    for trader_id, trader in engine.traders.items():
        for symbol, open_qty in trader.exposure.items():
            account = engine.ledger.accounts.get(trader_id)
            if open_qty.position is not None:
                assert account is not None and open_qty.position is account.positions[symbol]


def test_keep_the_position_the_open_quantity_holds_the_ledgers_across_a_snapshot() -> None:
    """The engine finds a trader's position through its open quantity in the symbol;
    that must be the ledger's own object, in both symbols, and stay so in a pickled
    copy, which must then trade on exactly like the original."""
    h = Harness(two_symbol_config())
    h.send_all([limit("m", "m1", SELL, 5, 10_000), limit("t", "t1", BUY, 2, 10_000),
                limit("m", "m2", BUY, 3, 4_990, symbol=ALT),
                limit("t", "t2", SELL, 1, 4_990, symbol=ALT)])
    t = h.engine.traders["t"]
    assert t.exposure[SYM].position is h.engine.ledger.accounts["t"].positions[SYM]
    assert t.exposure[ALT].position is h.engine.ledger.accounts["t"].positions[ALT]
    held_positions_agree(h.engine)
    copy = Harness(h.config)
    copy.engine = pickle.loads(pickle.dumps(h.engine, pickle.HIGHEST_PROTOCOL))
    copy.now = h.now
    held_positions_agree(copy.engine)
    more = [limit("t", "t3", BUY, 3, 10_000), limit("t", "t4", SELL, 2, 4_990, symbol=ALT),
            limit("m", "m3", BUY, 4, 10_000)]
    assert copy.send_all(more) == h.send_all(more)
    assert copy.engine.state_hash() == h.engine.state_hash()
    held_positions_agree(copy.engine)
    assert h.engine.position_report("t", SYM).position == 5
    assert h.engine.position_report("t", ALT).position == -3
