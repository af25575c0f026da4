"""Matching rules of the engine, one rule per test, with the exact events each must emit.

Fees are off here (see ``make_config``), so cash moves by price x qty x tick value only;
fee arithmetic is tested in ``test_positions.py``.
"""

from __future__ import annotations

from unittest.mock import ANY

from models import (
    AmendOrder,
    AmendRejected,
    BookAction,
    BookChanged,
    CancelAll,
    CancelReason,
    CancelRejected,
    MarketStatusChanged,
    OrderAccepted,
    OrderAmended,
    OrderCanceled,
    OrderRejected,
    OrderTriggered,
    PositionChanged,
    RejectCode,
    SetMarketOpen,
    StpMode,
    TimeInForce,
    Trade,
)
from tests.conftest import (
    ALT,
    BUY,
    INITIAL_CASH,
    SELL,
    SYM,
    TICK_VALUE,
    Harness,
    accepted,
    cancel,
    cancel_all,
    limit,
    market,
    of_type,
    position,
    stop,
    stop_limit,
    trade,
    two_symbol_config,
    without,
)

ADD, EXECUTE, CANCEL, AMEND = BookAction.ADD, BookAction.EXECUTE, BookAction.CANCEL, \
    BookAction.AMEND


def paid(qty: int, price: int) -> int:
    """Cash after buying ``qty`` at ``price`` from the initial cash, fees off."""
    return INITIAL_CASH - qty * price * TICK_VALUE


def received(qty: int, price: int) -> int:
    return INITIAL_CASH + qty * price * TICK_VALUE


def print_trade(h: Harness, price: int, buyer: str = "pb", seller: str = "ps") -> None:
    """Make the market print one lot at ``price`` between two bystanders."""
    h.send(limit(seller, f"{seller}{h.now}", SELL, 1, price))
    h.send(limit(buyer, f"{buyer}{h.now}", BUY, 1, price))


# ------------------------------------------------------------------ acceptance and ids


def test_ack_and_rest_when_a_limit_order_does_not_cross(h: Harness) -> None:
    cmd = limit("alice", "a1", BUY, 5, 9_990)
    events = h.send(cmd)
    assert events == [accepted(cmd, 1, h.now), BookChanged(SYM, ADD, 1, BUY, 9_990, 5, 5)]
    assert h.queue(BUY) == [(9_990, 1, 5)]
    assert h.live_ids("alice") == [1]


def test_assign_gapless_order_ids_when_a_reject_comes_between(h: Harness) -> None:
    first = h.send(limit("alice", "a1", BUY, 1, 9_990))
    rejected = h.send(limit("alice", "a2", BUY, 1, 9_990, symbol="NOPE"))
    second = h.send(limit("bob", "b1", SELL, 1, 10_010))
    assert of_type(first, OrderAccepted)[0].order_id == 1
    assert rejected == [OrderRejected(h.now - 1, "alice", "a2", RejectCode.UNKNOWN_SYMBOL, ANY)]
    assert of_type(second, OrderAccepted)[0].order_id == 2


def test_assign_sequential_trade_ids_when_trades_print(h: Harness) -> None:
    h.send_all([limit("m", "m1", SELL, 1, 10_000), limit("m", "m2", SELL, 1, 10_001)])
    h.send(limit("t", "t1", BUY, 2, 10_001))
    h.send_all([limit("m", "m3", BUY, 1, 9_990), limit("t", "t2", SELL, 1, 9_990)])
    assert [t.trade_id for t in of_type(h.events, Trade)] == [1, 2, 3]


# ------------------------------------------------------------------ price-time priority


def test_fill_in_price_time_priority_when_several_makers_rest(h: Harness) -> None:
    h.send_all([limit("m1", "x", SELL, 2, 10_010), limit("m2", "y", SELL, 3, 10_005),
                limit("m3", "z", SELL, 4, 10_005)])
    taker = limit("t", "t1", BUY, 6, 10_010)
    events = h.send(taker)
    ts = h.now
    assert events == [
        accepted(taker, 4, ts),
        trade(ts, 1, 10_005, 3, BUY, buy=(4, "t", "t1"), sell=(2, "m2", "y"), buy_leaves=3,
              sell_leaves=0),
        BookChanged(SYM, EXECUTE, 2, SELL, 10_005, 0, 4),
        position(ts, "t", 3, 30_015, paid(3, 10_005)),
        position(ts, "m2", -3, -30_015, received(3, 10_005)),
        trade(ts, 2, 10_005, 3, BUY, buy=(4, "t", "t1"), sell=(3, "m3", "z"), buy_leaves=0,
              sell_leaves=1),
        BookChanged(SYM, EXECUTE, 3, SELL, 10_005, 1, 1),
        position(ts, "t", 6, 60_030, paid(6, 10_005)),
        position(ts, "m3", -3, -30_015, received(3, 10_005)),
    ]
    assert h.queue(SELL) == [(10_005, 3, 1), (10_010, 1, 2)]


def test_print_at_the_resting_price_when_the_taker_price_is_better(h: Harness) -> None:
    h.send(limit("m", "m1", BUY, 2, 9_990))
    taker = limit("t", "t1", SELL, 2, 9_900)
    events = h.send(taker)
    assert of_type(events, Trade) == [
        trade(h.now, 1, 9_990, 2, SELL, buy=(1, "m", "m1"), sell=(2, "t", "t1"),
              buy_leaves=0, sell_leaves=0)]


def test_sweep_levels_and_rest_the_rest_when_a_limit_crosses_several(h: Harness) -> None:
    h.send_all([limit("m", "m1", SELL, 1, 10_001), limit("m", "m2", SELL, 1, 10_002),
                limit("m", "m3", SELL, 1, 10_005)])
    taker = limit("t", "t1", BUY, 5, 10_002)
    events = h.send(taker)
    ts = h.now
    assert without(events, PositionChanged) == [
        accepted(taker, 4, ts),
        trade(ts, 1, 10_001, 1, BUY, buy=(4, "t", "t1"), sell=(1, "m", "m1"), buy_leaves=4,
              sell_leaves=0),
        BookChanged(SYM, EXECUTE, 1, SELL, 10_001, 0, 0),
        trade(ts, 2, 10_002, 1, BUY, buy=(4, "t", "t1"), sell=(2, "m", "m2"), buy_leaves=3,
              sell_leaves=0),
        BookChanged(SYM, EXECUTE, 2, SELL, 10_002, 0, 0),
        BookChanged(SYM, ADD, 4, BUY, 10_002, 3, 3),
    ]
    assert (h.engine.books[SYM].best_bid(), h.engine.books[SYM].best_ask()) == (10_002, 10_005)


# ------------------------------------------------------------------ market, IOC, FOK


def test_cancel_the_rest_when_a_market_order_runs_out_of_liquidity(h: Harness) -> None:
    h.send(limit("m", "m1", SELL, 2, 10_010))
    taker = market("t", "t1", BUY, 5)
    events = h.send(taker)
    ts = h.now
    assert events == [
        accepted(taker, 2, ts),
        trade(ts, 1, 10_010, 2, BUY, buy=(2, "t", "t1"), sell=(1, "m", "m1"), buy_leaves=3,
              sell_leaves=0),
        BookChanged(SYM, EXECUTE, 1, SELL, 10_010, 0, 0),
        position(ts, "t", 2, 20_020, paid(2, 10_010)),
        position(ts, "m", -2, -20_020, received(2, 10_010)),
        OrderCanceled(ts, 2, "t", "t1", SYM, BUY, 3, CancelReason.IOC),
    ]
    assert h.live_ids("t") == []


def test_cancel_a_market_order_whole_when_the_book_is_empty(h: Harness) -> None:
    taker = market("t", "t1", SELL, 4)
    assert h.send(taker) == [accepted(taker, 1, h.now),
                             OrderCanceled(h.now, 1, "t", "t1", SYM, SELL, 4, CancelReason.IOC)]


def test_stop_a_market_buy_at_the_band_edge_when_the_book_is_deeper(h: Harness) -> None:
    # asks rest inside the band around the configured reference (10000 +- 1000) ...
    h.send_all([limit("m", "m1", SELL, 1, 10_400), limit("m", "m2", SELL, 1, 10_500),
                limit("m", "m3", SELL, 1, 11_000)])
    # ... then a print at 9500 recentres the band on 9500 +- 950: 10500 and 11000 are out
    print_trade(h, 9_500)
    taker = market("t", "t1", BUY, 3)
    events = h.send(taker)
    assert [(t.price, t.qty) for t in of_type(events, Trade)] == [(10_400, 1)]
    assert of_type(events, OrderCanceled) == [
        OrderCanceled(h.now, 6, "t", "t1", SYM, BUY, 2, CancelReason.IOC)]
    assert h.depth(SELL) == [(10_500, 1), (11_000, 1)]


def test_trade_a_market_sell_down_to_the_band_edge_when_bids_reach_it(h: Harness) -> None:
    h.send_all([limit("m", "m1", BUY, 1, 9_000), limit("m", "m2", BUY, 1, 9_500)])
    taker = market("t", "t1", SELL, 3)
    events = h.send(taker)
    # the edge itself (10000 - 10%) is inside the band
    assert [(t.price, t.qty) for t in of_type(events, Trade)] == [(9_500, 1), (9_000, 1)]


def test_cancel_the_ioc_rest_when_a_limit_ioc_partially_fills(h: Harness) -> None:
    h.send_all([limit("m", "m1", SELL, 2, 10_000), limit("m", "m2", SELL, 2, 10_010)])
    taker = limit("t", "t1", BUY, 5, 10_000, tif=TimeInForce.IOC)
    events = h.send(taker)
    ts = h.now
    assert without(events, PositionChanged) == [
        accepted(taker, 3, ts),
        trade(ts, 1, 10_000, 2, BUY, buy=(3, "t", "t1"), sell=(1, "m", "m1"), buy_leaves=3,
              sell_leaves=0),
        BookChanged(SYM, EXECUTE, 1, SELL, 10_000, 0, 0),
        OrderCanceled(ts, 3, "t", "t1", SYM, BUY, 3, CancelReason.IOC),
    ]
    assert h.queue(BUY) == []


def test_fill_fok_completely_when_enough_rests_within_its_limit(h: Harness) -> None:
    h.send_all([limit("m", "m1", SELL, 2, 10_000), limit("n", "n1", SELL, 3, 10_010)])
    taker = limit("t", "t1", BUY, 5, 10_010, tif=TimeInForce.FOK)
    events = h.send(taker)
    assert [(t.price, t.qty, t.buy_leaves_qty) for t in of_type(events, Trade)] == [
        (10_000, 2, 3), (10_010, 3, 0)]
    assert of_type(events, OrderCanceled) == []
    assert h.queue(SELL) == []


def test_cancel_fok_with_nothing_filled_when_it_cannot_fill_completely(h: Harness) -> None:
    h.send_all([limit("m", "m1", SELL, 2, 10_000), limit("n", "n1", SELL, 3, 10_010),
                limit("n", "n2", SELL, 9, 10_020)])
    book_before = h.engine.books[SYM].state_hash()
    taker = limit("t", "t1", BUY, 6, 10_010, tif=TimeInForce.FOK)
    assert h.send(taker) == [accepted(taker, 4, h.now),
                             OrderCanceled(h.now, 4, "t", "t1", SYM, BUY, 6, CancelReason.FOK)]
    assert h.engine.books[SYM].state_hash() == book_before
    assert h.engine.last_prices[SYM] is None


def test_cancel_market_fok_when_the_book_is_too_thin(h: Harness) -> None:
    h.send(limit("m", "m1", BUY, 2, 9_990))
    taker = market("t", "t1", SELL, 3, tif=TimeInForce.FOK)
    assert h.send(taker) == [accepted(taker, 2, h.now),
                             OrderCanceled(h.now, 2, "t", "t1", SYM, SELL, 3, CancelReason.FOK)]
    assert h.queue(BUY) == [(9_990, 1, 2)]


# ------------------------------------------------------------------ post-only


def test_reject_post_only_and_change_nothing_when_it_would_cross(h: Harness) -> None:
    h.send_all([limit("m", "m1", SELL, 2, 10_010), limit("a", "a1", BUY, 1, 9_990)])
    engine = h.engine

    def state() -> tuple:
        exposure = {(t, s): tuple(q) for t, trader in engine.traders.items()
                    for s, q in trader.exposure.items()}
        return (engine.books[SYM].state_hash(), sorted(engine.orders),
                engine.ledger.state_tuple(), exposure, engine.next_order_id)

    before = state()
    # from a trader with a resting order, and from one the exchange has never seen
    for trader in ("a", "newcomer"):
        events = h.send(limit(trader, "p1", BUY, 3, 10_010, post_only=True))
        assert events == [
            OrderRejected(h.now, trader, "p1", RejectCode.POST_ONLY_WOULD_CROSS, ANY)]
        assert state() == before
    assert "newcomer" not in engine.ledger.accounts


def test_rest_post_only_when_it_does_not_cross(h: Harness) -> None:
    h.send(limit("m", "m1", SELL, 2, 10_010))
    cmd = limit("b", "b1", BUY, 3, 10_009, post_only=True)
    assert h.send(cmd) == [accepted(cmd, 2, h.now), BookChanged(SYM, ADD, 2, BUY, 10_009, 3, 3)]


# ------------------------------------------------------------------ stops


def test_hold_a_stop_outside_the_book_when_its_price_has_not_printed(h: Harness) -> None:
    print_trade(h, 10_000)
    h.send(limit("m", "m1", SELL, 5, 10_060))
    book_before = h.engine.books[SYM].state_hash()
    cmd = stop("s", "s1", BUY, 2, 10_050)
    assert h.send(cmd) == [accepted(cmd, 4, h.now)]
    # invisible to the book and the feed, but live for its owner
    assert h.engine.books[SYM].state_hash() == book_before
    assert h.live_ids("s") == [4]


def test_trigger_a_buy_stop_when_a_trade_prints_at_its_stop_price(h: Harness) -> None:
    print_trade(h, 10_000)
    h.send_all([limit("m", "m1", SELL, 1, 10_050), limit("m", "m2", SELL, 5, 10_060)])
    h.send(stop("s", "s1", BUY, 2, 10_050))
    taker = limit("t", "t1", BUY, 1, 10_050)
    events = h.send(taker)
    ts = h.now
    assert events == [
        accepted(taker, 6, ts),
        trade(ts, 2, 10_050, 1, BUY, buy=(6, "t", "t1"), sell=(3, "m", "m1"), buy_leaves=0,
              sell_leaves=0),
        BookChanged(SYM, EXECUTE, 3, SELL, 10_050, 0, 0),
        position(ts, "t", 1, 10_050, paid(1, 10_050)),
        position(ts, "m", -1, -10_050, received(1, 10_050)),
        OrderTriggered(ts, 5, "s", "s1", SYM),
        trade(ts, 3, 10_060, 2, BUY, buy=(5, "s", "s1"), sell=(4, "m", "m2"), buy_leaves=0,
              sell_leaves=3),
        BookChanged(SYM, EXECUTE, 4, SELL, 10_060, 3, 3),
        position(ts, "s", 2, 20_120, paid(2, 10_060)),
        position(ts, "m", -3, -30_170, received(1, 10_050) + 2 * 10_060 * TICK_VALUE),
    ]
    assert h.live_ids("s") == []


def test_trigger_a_sell_stop_when_a_trade_prints_through_its_stop_price(h: Harness) -> None:
    print_trade(h, 10_000)
    h.send(stop("s", "s1", SELL, 3, 9_950))
    h.send(limit("b", "b1", BUY, 5, 9_900))
    taker = limit("t", "t1", SELL, 1, 9_900)
    events = h.send(taker)
    ts = h.now
    assert without(events, PositionChanged, BookChanged)[1:] == [
        trade(ts, 2, 9_900, 1, SELL, buy=(4, "b", "b1"), sell=(5, "t", "t1"), buy_leaves=4,
              sell_leaves=0),
        OrderTriggered(ts, 3, "s", "s1", SYM),
        trade(ts, 3, 9_900, 3, SELL, buy=(4, "b", "b1"), sell=(3, "s", "s1"), buy_leaves=1,
              sell_leaves=0),
    ]


def test_keep_a_stop_waiting_when_only_an_earlier_print_was_through_it(h: Harness) -> None:
    # PROTOCOL.md: a stop waits until a trade prints at or through its stop price; a print
    # from before the stop arrived does not count
    print_trade(h, 10_000)
    cmd = stop("s", "s1", BUY, 2, 9_990)
    assert h.send(cmd) == [accepted(cmd, 3, h.now)]
    assert h.live_ids("s") == [3]
    print_trade(h, 10_000)
    assert of_type(h.events, OrderTriggered) == [OrderTriggered(h.now, 3, "s", "s1", SYM)]


def test_trigger_a_stop_when_a_later_print_equals_its_stop(h: Harness) -> None:
    print_trade(h, 10_000)
    cmd = stop("s", "s1", SELL, 2, 10_000)
    assert of_type(h.send(cmd), OrderTriggered) == []
    print_trade(h, 10_000)
    assert of_type(h.events, OrderTriggered) == [OrderTriggered(h.now, 3, "s", "s1", SYM)]


def test_keep_a_stop_waiting_when_nothing_has_printed_yet(h: Harness) -> None:
    cmd = stop("s", "s1", BUY, 2, 9_000)
    assert h.send(cmd) == [accepted(cmd, 1, h.now)]
    assert h.live_ids("s") == [1]


def test_queue_a_triggered_stop_limit_behind_earlier_orders_when_it_rests(h: Harness) -> None:
    print_trade(h, 10_000)
    h.send(limit("m", "m1", SELL, 1, 10_050))
    h.send(stop_limit("s", "s1", BUY, 2, 10_050, 10_040))
    h.send(limit("w", "w1", BUY, 4, 10_040))  # later than the stop, earlier than its trigger
    events = h.send(limit("t", "t1", BUY, 1, 10_050))
    ts = h.now
    assert events[-2:] == [OrderTriggered(ts, 4, "s", "s1", SYM),
                           BookChanged(SYM, ADD, 4, BUY, 10_040, 2, 6)]
    assert h.queue(BUY) == [(10_040, 5, 4), (10_040, 4, 2)]


def test_cancel_a_triggered_stop_limit_for_risk_when_its_price_is_outside_the_band(
        h: Harness) -> None:
    print_trade(h, 10_000)
    h.send(limit("b", "b1", BUY, 1, 9_950))
    h.send(stop_limit("s", "s1", SELL, 2, 9_950, 8_000))
    events = h.send(limit("t", "t1", SELL, 1, 9_950))
    ts = h.now
    # the band is now 9950 +- 995: a limit at 8000 may not enter the book
    assert events[-2:] == [OrderTriggered(ts, 4, "s", "s1", SYM),
                           OrderCanceled(ts, 4, "s", "s1", SYM, SELL, 2, CancelReason.RISK)]
    assert h.live_ids("s") == []


def test_trigger_stops_nearest_the_market_first_when_one_print_reaches_several(
        h: Harness) -> None:
    print_trade(h, 10_000)
    h.send_all([stop("s", "far", BUY, 1, 10_030), stop("s", "near", BUY, 1, 10_020),
                stop("r", "near2", BUY, 1, 10_020)])
    h.send(limit("m", "m1", SELL, 1, 10_030))
    events = h.send(limit("t", "t1", BUY, 1, 10_030))
    assert [e.client_order_id for e in of_type(events, OrderTriggered)] == ["near", "near2",
                                                                            "far"]


def test_trigger_a_sell_stop_when_a_sweep_prints_through_it_before_ending_higher(
        h: Harness) -> None:
    print_trade(h, 10_000)
    h.send(stop("s", "s1", SELL, 3, 9_900))
    # an ask below the stop and one above: one buy sweeps both, printing 9800 then 10200
    h.send_all([limit("m", "m1", SELL, 1, 9_800), limit("m", "m2", SELL, 1, 10_200)])
    events = h.send(limit("t", "t1", BUY, 2, 10_200))
    assert [t.price for t in of_type(events, Trade)] == [9_800, 10_200]
    # the print at 9800 went through the stop at 9900: it must have triggered (and, with
    # no bids to sell into, its market order is canceled)
    assert events[-2:] == [OrderTriggered(h.now, 3, "s", "s1", SYM),
                           OrderCanceled(h.now, 3, "s", "s1", SYM, SELL, 3, CancelReason.IOC)]


def test_cancel_a_waiting_stop_when_its_owner_cancels_it(h: Harness) -> None:
    print_trade(h, 10_000)
    h.send(stop("s", "s1", BUY, 2, 10_050))
    events = h.send(cancel("s", client_order_id="s1"))
    # no book_changed: the stop never was in the book
    assert events == [OrderCanceled(h.now, 3, "s", "s1", SYM, BUY, 2, CancelReason.USER)]
    print_trade(h, 10_060)
    assert of_type(h.events, OrderTriggered) == []


# ------------------------------------------------------------------ cancel


def test_cancel_a_resting_order_when_its_owner_names_the_order_id(h: Harness) -> None:
    h.send_all([limit("a", "a1", BUY, 5, 9_990), limit("b", "b1", BUY, 2, 9_990)])
    events = h.send(cancel("a", order_id=1))
    assert events == [OrderCanceled(h.now, 1, "a", "a1", SYM, BUY, 5, CancelReason.USER),
                      BookChanged(SYM, CANCEL, 1, BUY, 9_990, 0, 2)]
    assert h.queue(BUY) == [(9_990, 2, 2)]


def test_cancel_a_resting_order_when_its_owner_names_the_client_order_id(h: Harness) -> None:
    h.send(limit("a", "a1", SELL, 5, 10_010))
    assert h.send(cancel("a", client_order_id="a1")) == [
        OrderCanceled(h.now, 1, "a", "a1", SYM, SELL, 5, CancelReason.USER),
        BookChanged(SYM, CANCEL, 1, SELL, 10_010, 0, 0)]
    assert h.queue(SELL) == []


def test_cancel_by_order_id_in_any_symbol_when_the_books_share_one_index() -> None:
    h = Harness(two_symbol_config())
    print_trade(h, 10_000)
    h.send_all([limit("a", "a1", BUY, 5, 9_990), limit("a", "a2", SELL, 4, 5_010, symbol=ALT),
                stop("a", "a3", BUY, 2, 10_050)])
    resting_sim, resting_alt, waiting = 3, 4, 5
    engine = h.engine
    # the books' one index holds both symbols' resting orders, the stop is apart
    assert engine.books[SYM].resting_orders is engine.books[ALT].resting_orders
    assert set(engine.resting_orders) == {resting_sim, resting_alt}
    assert set(engine.stop_orders) == {waiting}
    assert sorted(engine.orders) == [resting_sim, resting_alt, waiting]
    assert engine.orders[waiting].client_order_id == "a3"
    assert h.send(cancel("a", order_id=resting_alt)) == [
        OrderCanceled(h.now, resting_alt, "a", "a2", ALT, SELL, 4, CancelReason.USER),
        BookChanged(ALT, CANCEL, resting_alt, SELL, 5_010, 0, 0)]
    assert h.send(cancel("a", order_id=waiting)) == [
        OrderCanceled(h.now, waiting, "a", "a3", SYM, BUY, 2, CancelReason.USER)]
    assert h.send(cancel("a", order_id=resting_sim)) == [
        OrderCanceled(h.now, resting_sim, "a", "a1", SYM, BUY, 5, CancelReason.USER),
        BookChanged(SYM, CANCEL, resting_sim, BUY, 9_990, 0, 0)]
    assert not engine.orders and engine.open_orders("a") == []


def test_index_a_triggered_stop_limit_as_resting_when_it_rests() -> None:
    h = Harness()
    print_trade(h, 10_000)
    h.send(stop_limit("s", "s1", BUY, 2, 10_050, 10_040))
    assert set(h.engine.stop_orders) == {3} and 3 not in h.engine.resting_orders
    print_trade(h, 10_060)  # triggers it; 10_040 does not cross the empty ask side
    assert 3 not in h.engine.stop_orders and h.engine.resting_orders[3].client_order_id == "s1"
    assert h.send(cancel("s", order_id=3)) == [
        OrderCanceled(h.now, 3, "s", "s1", SYM, BUY, 2, CancelReason.USER),
        BookChanged(SYM, CANCEL, 3, BUY, 10_040, 0, 0)]


def test_cancel_only_the_remainder_when_the_order_was_partially_filled(h: Harness) -> None:
    h.send_all([limit("a", "a1", SELL, 5, 10_010), limit("t", "t1", BUY, 2, 10_010)])
    assert of_type(h.send(cancel("a", order_id=1)), OrderCanceled) == [
        OrderCanceled(h.now, 1, "a", "a1", SYM, SELL, 3, CancelReason.USER)]


def test_reject_cancel_when_the_order_is_unknown(h: Harness) -> None:
    assert h.send(cancel("a", order_id=99)) == [
        CancelRejected(h.now, "a", 99, None, RejectCode.UNKNOWN_ORDER, ANY)]
    assert h.send(cancel("a", client_order_id="zz")) == [
        CancelRejected(h.now, "a", None, "zz", RejectCode.UNKNOWN_ORDER, ANY)]


def test_answer_like_an_unknown_order_when_cancelling_another_traders_order(
        h: Harness) -> None:
    h.send(limit("alice", "a1", BUY, 5, 9_990))
    theirs = h.send(cancel("bob", order_id=1))
    unknown = h.send(cancel("bob", order_id=2))
    assert theirs == [CancelRejected(h.now - 1, "bob", 1, None, RejectCode.UNKNOWN_ORDER, ANY)]
    # indistinguishable: the same code and the same words
    assert [e.message for e in of_type(theirs, CancelRejected)] == \
        [e.message for e in of_type(unknown, CancelRejected)]
    assert h.send(cancel("bob", client_order_id="a1")) == [
        CancelRejected(h.now, "bob", None, "a1", RejectCode.UNKNOWN_ORDER, ANY)]
    assert h.queue(BUY) == [(9_990, 1, 5)]


def test_reject_cancel_when_the_two_ids_name_different_orders(h: Harness) -> None:
    h.send_all([limit("a", "a1", BUY, 5, 9_990), limit("a", "a2", BUY, 1, 9_980)])
    assert h.send(cancel("a", order_id=1, client_order_id="a2")) == [
        CancelRejected(h.now, "a", 1, "a2", RejectCode.UNKNOWN_ORDER, ANY)]
    assert h.live_ids("a") == [1, 2]


def test_reject_cancel_when_the_order_is_already_done(h: Harness) -> None:
    h.send_all([limit("a", "a1", SELL, 1, 10_010), limit("t", "t1", BUY, 1, 10_010),
                limit("a", "a2", SELL, 1, 10_020), cancel("a", order_id=3)])
    for order_id in (1, 3):  # filled, canceled
        assert h.send(cancel("a", order_id=order_id)) == [
            CancelRejected(h.now, "a", order_id, None, RejectCode.UNKNOWN_ORDER, ANY)]


def test_cancel_every_open_order_when_cancel_all_names_no_symbol(h2: Harness) -> None:
    h = h2
    h.send_all([limit("a", "a1", BUY, 1, 9_990), limit("b", "b1", BUY, 1, 9_980),
                limit("a", "a2", SELL, 2, 5_010, symbol=ALT), stop("a", "a3", SELL, 3, 9_000)])
    events = h.send(cancel_all("a"))
    ts = h.now
    assert events == [
        OrderCanceled(ts, 1, "a", "a1", SYM, BUY, 1, CancelReason.USER),
        BookChanged(SYM, CANCEL, 1, BUY, 9_990, 0, 0),
        OrderCanceled(ts, 3, "a", "a2", ALT, SELL, 2, CancelReason.USER),
        BookChanged(ALT, CANCEL, 3, SELL, 5_010, 0, 0),
        OrderCanceled(ts, 4, "a", "a3", SYM, SELL, 3, CancelReason.USER),
    ]
    assert h.live_ids("a") == [] and h.live_ids("b") == [2]


def test_cancel_one_symbol_only_when_cancel_all_names_it(h2: Harness) -> None:
    h = h2
    h.send_all([limit("a", "a1", BUY, 1, 9_990), limit("a", "a2", SELL, 2, 5_010, symbol=ALT)])
    assert h.send(cancel_all("a", ALT)) == [
        OrderCanceled(h.now, 2, "a", "a2", ALT, SELL, 2, CancelReason.USER),
        BookChanged(ALT, CANCEL, 2, SELL, 5_010, 0, 0)]
    assert h.live_ids("a") == [1]


def test_reject_cancel_all_when_the_symbol_is_unknown(h: Harness) -> None:
    h.send(limit("a", "a1", BUY, 1, 9_990))
    assert h.send(cancel_all("a", "NOPE")) == [
        CancelRejected(h.now, "a", None, None, RejectCode.UNKNOWN_SYMBOL, ANY)]
    assert h.live_ids("a") == [1]


def test_emit_nothing_when_cancel_all_finds_no_open_orders(h: Harness) -> None:
    assert h.send(cancel_all("nobody")) == []


def test_use_the_given_reason_when_cancel_all_comes_from_a_disconnect(h: Harness) -> None:
    h.send(limit("a", "a1", BUY, 1, 9_990))
    events = h.send(CancelAll("a", None, CancelReason.DISCONNECT))
    assert of_type(events, OrderCanceled) == [
        OrderCanceled(h.now, 1, "a", "a1", SYM, BUY, 1, CancelReason.DISCONNECT)]


# ------------------------------------------------------------------ amend


def amend(trader: str, order_id: int | None = None, client_order_id: str | None = None, *,
          price: int | None = None, qty: int | None = None) -> AmendOrder:
    return AmendOrder(trader, order_id, client_order_id, price, qty)


def test_keep_priority_when_amend_lowers_qty_at_the_same_price(h: Harness) -> None:
    h.send_all([limit("a", "a1", BUY, 5, 10_000), limit("b", "b1", BUY, 3, 10_000)])
    events = h.send(amend("a", 1, qty=2))
    assert events == [OrderAmended(h.now, 1, "a", "a1", SYM, BUY, 10_000, 2, 2, True),
                      BookChanged(SYM, AMEND, 1, BUY, 10_000, 2, 5)]
    assert h.queue(BUY) == [(10_000, 1, 2), (10_000, 2, 3)]
    fills = of_type(h.send(limit("t", "t1", SELL, 2, 10_000)), Trade)
    assert [t.buy_order_id for t in fills] == [1]


def test_keep_priority_when_amend_lowers_qty_of_a_partially_filled_order(h: Harness) -> None:
    h.send_all([limit("a", "a1", SELL, 10, 10_010), limit("b", "b1", SELL, 1, 10_010),
                limit("t", "t1", BUY, 4, 10_010)])
    events = h.send(amend("a", client_order_id="a1", qty=6))
    # qty is the new total: 4 filled + 2 left
    assert events == [OrderAmended(h.now, 1, "a", "a1", SYM, SELL, 10_010, 6, 2, True),
                      BookChanged(SYM, AMEND, 1, SELL, 10_010, 2, 3)]
    assert h.queue(SELL) == [(10_010, 1, 2), (10_010, 2, 1)]


def test_requeue_at_the_back_when_amend_changes_the_price(h: Harness) -> None:
    h.send_all([limit("a", "a1", BUY, 5, 10_000), limit("b", "b1", BUY, 3, 9_995)])
    events = h.send(amend("a", 1, price=9_995))
    assert events == [OrderAmended(h.now, 1, "a", "a1", SYM, BUY, 9_995, 5, 5, False),
                      BookChanged(SYM, CANCEL, 1, BUY, 10_000, 0, 0),
                      BookChanged(SYM, ADD, 1, BUY, 9_995, 5, 8)]
    assert h.queue(BUY) == [(9_995, 2, 3), (9_995, 1, 5)]


def test_requeue_at_the_back_when_amend_raises_the_qty(h: Harness) -> None:
    h.send_all([limit("a", "a1", BUY, 5, 10_000), limit("b", "b1", BUY, 3, 10_000)])
    events = h.send(amend("a", 1, qty=7))
    assert events == [OrderAmended(h.now, 1, "a", "a1", SYM, BUY, 10_000, 7, 7, False),
                      BookChanged(SYM, CANCEL, 1, BUY, 10_000, 0, 3),
                      BookChanged(SYM, ADD, 1, BUY, 10_000, 7, 10)]
    assert h.queue(BUY) == [(10_000, 2, 3), (10_000, 1, 7)]


def test_trade_when_an_amended_price_crosses_the_book(h: Harness) -> None:
    h.send_all([limit("m", "m1", SELL, 2, 10_010), limit("a", "a1", BUY, 5, 10_000)])
    events = h.send(amend("a", 2, price=10_010))
    ts = h.now
    assert without(events, PositionChanged) == [
        OrderAmended(ts, 2, "a", "a1", SYM, BUY, 10_010, 5, 5, False),
        BookChanged(SYM, CANCEL, 2, BUY, 10_000, 0, 0),
        trade(ts, 1, 10_010, 2, BUY, buy=(2, "a", "a1"), sell=(1, "m", "m1"), buy_leaves=3,
              sell_leaves=0),
        BookChanged(SYM, EXECUTE, 1, SELL, 10_010, 0, 0),
        BookChanged(SYM, ADD, 2, BUY, 10_010, 3, 3),
    ]


def test_reject_amend_when_the_new_qty_does_not_exceed_the_filled_qty(h: Harness) -> None:
    h.send_all([limit("a", "a1", SELL, 10, 10_010), limit("t", "t1", BUY, 4, 10_010)])
    for qty in (4, 3):
        assert h.send(amend("a", 1, qty=qty)) == [
            AmendRejected(h.now, "a", 1, None, RejectCode.INVALID_FIELD, ANY)]
    assert h.queue(SELL) == [(10_010, 1, 6)]


def test_reject_amend_when_the_order_belongs_to_another_trader(h: Harness) -> None:
    h.send(limit("a", "a1", BUY, 5, 10_000))
    assert h.send(amend("b", 1, qty=1)) == [
        AmendRejected(h.now, "b", 1, None, RejectCode.UNKNOWN_ORDER, ANY)]
    assert h.send(amend("b", client_order_id="a1", qty=1)) == [
        AmendRejected(h.now, "b", None, "a1", RejectCode.UNKNOWN_ORDER, ANY)]
    assert h.queue(BUY) == [(10_000, 1, 5)]


def test_reject_amend_when_the_post_only_order_would_cross(h: Harness) -> None:
    h.send_all([limit("m", "m1", SELL, 2, 10_010),
                limit("a", "a1", BUY, 5, 10_000, post_only=True)])
    assert h.send(amend("a", 2, price=10_010)) == [
        AmendRejected(h.now, "a", 2, None, RejectCode.POST_ONLY_WOULD_CROSS, ANY)]
    assert h.queue(BUY) == [(10_000, 2, 5)]


def test_reject_amend_when_the_new_price_is_outside_the_band(h: Harness) -> None:
    h.send(limit("a", "a1", BUY, 5, 10_000))
    assert h.send(amend("a", 1, price=8_999)) == [
        AmendRejected(h.now, "a", 1, None, RejectCode.RISK_PRICE_BAND, ANY)]


def test_reject_amend_price_when_the_order_is_a_stop_market(h: Harness) -> None:
    h.send(stop("s", "s1", BUY, 2, 10_050))
    assert h.send(amend("s", 1, price=10_060)) == [
        AmendRejected(h.now, "s", 1, None, RejectCode.INVALID_FIELD, ANY)]


def test_amend_a_waiting_stop_in_place_when_its_qty_is_lowered(h: Harness) -> None:
    h.send(stop_limit("s", "s1", BUY, 5, 10_050, 10_060))
    assert h.send(amend("s", 1, qty=2)) == [
        OrderAmended(h.now, 1, "s", "s1", SYM, BUY, 10_060, 2, 2, True)]
    assert h.engine.books[SYM].resting_orders == {}


def test_reject_amend_when_the_market_is_closed(h: Harness) -> None:
    h.send(limit("a", "a1", BUY, 5, 10_000))
    h.send(SetMarketOpen(False, SYM))
    assert h.send(amend("a", 1, qty=2)) == [
        AmendRejected(h.now, "a", 1, None, RejectCode.MARKET_CLOSED, ANY)]


# ------------------------------------------------------------------ self-trade prevention


def test_cancel_the_resting_order_when_stp_is_the_default(h: Harness) -> None:
    h.send_all([limit("a", "a1", SELL, 5, 10_000), limit("b", "b1", SELL, 5, 10_000)])
    taker = limit("a", "a2", BUY, 5, 10_000)
    assert taker.stp is StpMode.CANCEL_RESTING
    events = h.send(taker)
    ts = h.now
    assert events == [
        accepted(taker, 3, ts),
        OrderCanceled(ts, 1, "a", "a1", SYM, SELL, 5, CancelReason.SELF_TRADE),
        BookChanged(SYM, CANCEL, 1, SELL, 10_000, 0, 5),
        trade(ts, 1, 10_000, 5, BUY, buy=(3, "a", "a2"), sell=(2, "b", "b1"), buy_leaves=0,
              sell_leaves=0),
        BookChanged(SYM, EXECUTE, 2, SELL, 10_000, 0, 0),
        position(ts, "a", 5, 50_000, paid(5, 10_000)),
        position(ts, "b", -5, -50_000, received(5, 10_000)),
    ]


def test_cancel_the_incoming_order_when_stp_is_cancel_incoming(h: Harness) -> None:
    h.send_all([limit("a", "a1", SELL, 5, 10_000), limit("b", "b1", SELL, 5, 10_000)])
    taker = limit("a", "a2", BUY, 5, 10_000, stp=StpMode.CANCEL_INCOMING)
    assert h.send(taker) == [
        accepted(taker, 3, h.now),
        OrderCanceled(h.now, 3, "a", "a2", SYM, BUY, 5, CancelReason.SELF_TRADE)]
    assert h.queue(SELL) == [(10_000, 1, 5), (10_000, 2, 5)]


def test_cancel_both_orders_when_stp_is_cancel_both(h: Harness) -> None:
    h.send_all([limit("a", "a1", SELL, 5, 10_000), limit("b", "b1", SELL, 5, 10_000)])
    taker = limit("a", "a2", BUY, 5, 10_000, stp=StpMode.CANCEL_BOTH)
    ts = h.now + 1
    assert h.send(taker, ts) == [
        accepted(taker, 3, ts),
        OrderCanceled(ts, 1, "a", "a1", SYM, SELL, 5, CancelReason.SELF_TRADE),
        BookChanged(SYM, CANCEL, 1, SELL, 10_000, 0, 5),
        OrderCanceled(ts, 3, "a", "a2", SYM, BUY, 5, CancelReason.SELF_TRADE)]
    assert h.queue(SELL) == [(10_000, 2, 5)]


def test_decrement_both_when_stp_is_decrement_and_the_taker_is_smaller(h: Harness) -> None:
    h.send_all([limit("a", "a1", SELL, 5, 10_000), limit("b", "b1", SELL, 5, 10_000)])
    taker = limit("a", "a2", BUY, 3, 10_000, stp=StpMode.DECREMENT)
    ts = h.now + 1
    assert h.send(taker, ts) == [
        accepted(taker, 3, ts),
        OrderAmended(ts, 1, "a", "a1", SYM, SELL, 10_000, 2, 2, True),
        BookChanged(SYM, AMEND, 1, SELL, 10_000, 2, 7),
        OrderCanceled(ts, 3, "a", "a2", SYM, BUY, 3, CancelReason.SELF_TRADE)]
    assert h.queue(SELL) == [(10_000, 1, 2), (10_000, 2, 5)]


def test_decrement_both_and_trade_on_when_stp_is_decrement_and_the_taker_is_larger(
        h: Harness) -> None:
    h.send_all([limit("a", "a1", SELL, 2, 10_000), limit("b", "b1", SELL, 5, 10_000)])
    taker = limit("a", "a2", BUY, 4, 10_000, stp=StpMode.DECREMENT)
    ts = h.now + 1
    assert without(h.send(taker, ts), PositionChanged) == [
        accepted(taker, 3, ts),
        OrderCanceled(ts, 1, "a", "a1", SYM, SELL, 2, CancelReason.SELF_TRADE),
        BookChanged(SYM, CANCEL, 1, SELL, 10_000, 0, 5),
        OrderAmended(ts, 3, "a", "a2", SYM, BUY, 10_000, 2, 2, True),
        trade(ts, 1, 10_000, 2, BUY, buy=(3, "a", "a2"), sell=(2, "b", "b1"), buy_leaves=0,
              sell_leaves=3),
        BookChanged(SYM, EXECUTE, 2, SELL, 10_000, 3, 3)]


def test_skip_own_resting_order_when_a_fok_can_fill_from_others(h: Harness) -> None:
    h.send_all([limit("a", "a1", SELL, 5, 10_000), limit("b", "b1", SELL, 3, 10_000)])
    taker = limit("a", "a2", BUY, 3, 10_000, tif=TimeInForce.FOK)
    events = h.send(taker)
    assert of_type(events, OrderCanceled) == [
        OrderCanceled(h.now, 1, "a", "a1", SYM, SELL, 5, CancelReason.SELF_TRADE)]
    assert [(t.sell_trader, t.qty) for t in of_type(events, Trade)] == [("b", 3)]


def test_leave_own_resting_order_alone_when_a_fok_cannot_fill(h: Harness) -> None:
    h.send_all([limit("a", "a1", SELL, 5, 10_000), limit("b", "b1", SELL, 3, 10_000)])
    taker = limit("a", "a2", BUY, 4, 10_000, tif=TimeInForce.FOK)
    # a fill-or-kill that is killed changes nothing, self-trade cancels included
    assert h.send(taker) == [accepted(taker, 3, h.now),
                             OrderCanceled(h.now, 3, "a", "a2", SYM, BUY, 4, CancelReason.FOK)]
    assert h.queue(SELL) == [(10_000, 1, 5), (10_000, 2, 3)]


# ------------------------------------------------------------------ client order ids


def test_reject_new_order_when_its_client_order_id_is_live(h: Harness) -> None:
    h.send(limit("a", "a1", BUY, 5, 9_990))
    assert h.send(limit("a", "a1", SELL, 1, 10_100)) == [
        OrderRejected(h.now, "a", "a1", RejectCode.DUPLICATE_CLIENT_ORDER_ID, ANY)]
    assert h.queue(BUY) == [(9_990, 1, 5)] and h.queue(SELL) == []


def test_reject_new_order_when_its_client_order_id_names_a_waiting_stop(h: Harness) -> None:
    h.send(stop("a", "a1", BUY, 5, 10_500))
    assert h.send(limit("a", "a1", BUY, 1, 9_990)) == [
        OrderRejected(h.now, "a", "a1", RejectCode.DUPLICATE_CLIENT_ORDER_ID, ANY)]


def test_reuse_a_client_order_id_when_its_order_is_done(h: Harness) -> None:
    h.send_all([limit("a", "a1", BUY, 5, 9_990), cancel("a", client_order_id="a1")])
    again = limit("a", "a1", SELL, 1, 10_010)
    assert of_type(h.send(again), OrderAccepted) == [accepted(again, 2, h.now)]
    h.send(limit("t", "t1", BUY, 1, 10_010))  # fills it
    third = limit("a", "a1", BUY, 2, 9_980)
    assert of_type(h.send(third), OrderAccepted) == [accepted(third, 4, h.now)]
    # cancel by client id reaches the live order, not the finished ones
    assert of_type(h.send(cancel("a", client_order_id="a1")), OrderCanceled)[0].order_id == 4


def test_accept_the_same_client_order_id_when_traders_differ(h: Harness) -> None:
    h.send(limit("a", "x", BUY, 5, 9_990))
    cmd = limit("b", "x", BUY, 5, 9_990)
    assert of_type(h.send(cmd), OrderAccepted) == [accepted(cmd, 2, h.now)]


# ------------------------------------------------------------------ symbols and sessions


def test_reject_new_order_when_the_symbol_is_unknown(h: Harness) -> None:
    assert h.send(limit("a", "a1", BUY, 1, 9_990, symbol="NOPE")) == [
        OrderRejected(h.now, "a", "a1", RejectCode.UNKNOWN_SYMBOL, ANY)]


def test_reject_new_orders_when_the_market_is_closed(h: Harness) -> None:
    h.send(limit("a", "a1", BUY, 1, 9_990))
    assert h.send(SetMarketOpen(False, SYM)) == [MarketStatusChanged(h.now, SYM, False)]
    assert h.send(limit("a", "a2", BUY, 1, 9_980)) == [
        OrderRejected(h.now, "a", "a2", RejectCode.MARKET_CLOSED, ANY)]
    assert h.send(stop("a", "a3", BUY, 1, 10_100)) == [
        OrderRejected(h.now, "a", "a3", RejectCode.MARKET_CLOSED, ANY)]
    # cancels still work, so nobody is trapped in a closed market
    assert of_type(h.send(cancel("a", order_id=1)), OrderCanceled) != []
    assert h.send(SetMarketOpen(True, SYM)) == [MarketStatusChanged(h.now, SYM, True)]
    cmd = limit("a", "a4", BUY, 1, 9_980)
    assert h.send(cmd)[0] == accepted(cmd, 2, h.now)


def test_emit_nothing_when_the_market_status_does_not_change(h: Harness) -> None:
    assert h.send(SetMarketOpen(True, SYM)) == []
    assert h.send(SetMarketOpen(True)) == []


def test_close_every_symbol_when_set_market_open_names_none(h2: Harness) -> None:
    h = h2
    h.send(SetMarketOpen(False, ALT))
    assert h.send(SetMarketOpen(False)) == [MarketStatusChanged(h.now, SYM, False)]
    assert h.send(SetMarketOpen(True)) == [MarketStatusChanged(h.now, SYM, True),
                                           MarketStatusChanged(h.now, ALT, True)]


def test_isolate_instruments_when_their_prices_would_cross(h2: Harness) -> None:
    h = h2
    # an ALT ask below a SIM bid: one shared book would trade them
    h.send_all([limit("a", "a1", BUY, 3, 9_990), limit("b", "b1", SELL, 3, 5_010, symbol=ALT)])
    assert of_type(h.events, Trade) == []
    assert h.depth(BUY) == [(9_990, 3)] and h.depth(SELL) == []
    assert h.depth(SELL, ALT) == [(5_010, 3)] and h.depth(BUY, ALT) == []
    # a print in ALT is not a print in SIM: it sets ALT's last price and triggers ALT stops
    h.send(stop("s", "s1", BUY, 1, 5_000))
    h.send(limit("t", "t1", BUY, 1, 5_010, symbol=ALT))
    assert h.engine.last_prices == {SYM: None, ALT: 5_010}
    assert of_type(h.events, OrderTriggered) == []
    assert h.live_ids("s") == [3]


def test_replay_to_identical_events_and_state_when_the_commands_repeat(h: Harness) -> None:
    print_trade(h, 10_000)
    h.send_all([limit("a", "a1", BUY, 5, 9_990), limit("b", "b1", SELL, 4, 10_020),
                stop("s", "s1", BUY, 2, 10_010), amend("a", 3, price=9_995),
                limit("t", "t1", BUY, 6, 10_020), cancel("a", order_id=3)])
    replay = Harness(h.config)
    for command, ts in h.commands:
        replay.send(command, ts)
    assert replay.events == h.events
    assert replay.engine.state_hash() == h.engine.state_hash()
    # and the hash does see state: one more command changes it
    replay.send(limit("z", "z1", BUY, 1, 9_000))
    assert replay.engine.state_hash() != h.engine.state_hash()
