"""The bare order book: resting, O(1) lazy cancels, L2/L3 views, matching and checks.

Every test runs against each book implementation in ``BOOK_IMPLEMENTATIONS``; an
alternative book (say a compiled one) joins the list and must pass the same suite.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from models import OrderType, Side, StpMode, TimeInForce
from orderbook import MatchSink, Order, OrderBook

BOOK_IMPLEMENTATIONS: list[type[OrderBook]] = [OrderBook]

BUY, SELL = Side.BUY, Side.SELL
Fill = tuple[str, int, int, int, int, int]  # kind, maker id, taker id, price, qty, level qty


@pytest.fixture(params=BOOK_IMPLEMENTATIONS, ids=lambda cls: cls.__name__)
def book_cls(request: pytest.FixtureRequest) -> type[OrderBook]:
    return request.param


@pytest.fixture
def book(book_cls: type[OrderBook]) -> OrderBook:
    return book_cls("SIM")


class RecordingSink(MatchSink):
    """Records what the book tells its owner while matching, in order."""

    def __init__(self) -> None:
        self.calls: list[Fill] = []

    def on_fill(self, maker: Order, taker: Order, price: int, qty: int,
                level_qty: int) -> None:
        self.calls.append(("fill", maker.order_id, taker.order_id, price, qty, level_qty))

    def on_self_trade_cancel(self, maker: Order, canceled_qty: int, level_qty: int) -> None:
        self.calls.append(("stp_cancel", maker.order_id, 0, maker.price or 0, canceled_qty,
                           level_qty))

    def on_decrement(self, maker: Order, taker: Order, qty: int, level_qty: int) -> None:
        self.calls.append(("decrement", maker.order_id, taker.order_id, maker.price or 0, qty,
                           level_qty))


def order(order_id: int, side: Side, price: int | None, qty: int, trader: str = "maker",
          stp: StpMode = StpMode.CANCEL_RESTING) -> Order:
    order_type = OrderType.MARKET if price is None else OrderType.LIMIT
    return Order(order_id, trader, f"c{order_id}", "SIM", side, order_type, price, qty,
                 TimeInForce.GTC, False, stp)


def rest(book: OrderBook, *orders: Order) -> list[Order]:
    for resting in orders:
        book.add(resting)
    book.validate()
    return list(orders)


def l3(book: OrderBook, side: Side) -> list[tuple[int | None, int, int]]:
    return [(o.price, o.order_id, o.leaves_qty) for o in book.iter_orders(side)]


def match(book: OrderBook, taker: Order, limit: int | None) -> tuple[bool, list[Fill]]:
    sink = RecordingSink()
    stopped = book.match(taker, limit, sink)
    book.validate()
    return stopped, sink.calls


# ------------------------------------------------------------------ resting and views


def test_report_nothing_when_the_book_is_empty(book: OrderBook) -> None:
    assert (book.best_bid(), book.best_ask()) == (None, None)
    assert book.depth(BUY) == book.depth(SELL) == []
    assert l3(book, BUY) == l3(book, SELL) == []
    assert not book.would_cross(True, None) and not book.would_cross(False, None)
    book.validate()


def test_track_best_bid_and_ask_when_orders_rest(book: OrderBook) -> None:
    rest(book, order(1, BUY, 9_990, 1), order(2, BUY, 10_000, 1), order(3, BUY, 9_980, 1),
         order(4, SELL, 10_020, 1), order(5, SELL, 10_010, 1))
    assert (book.best_bid(), book.best_ask()) == (10_000, 10_010)


def test_return_the_new_level_total_when_an_order_rests(book: OrderBook) -> None:
    assert book.add(order(1, SELL, 10_010, 4)) == 4
    assert book.add(order(2, SELL, 10_010, 6)) == 10
    assert book.add(order(3, SELL, 10_020, 1)) == 1
    assert book.level_qty(SELL, 10_010) == 10
    assert book.level_qty(SELL, 10_030) == 0
    book.validate()


def test_iterate_l3_best_first_and_fifo_when_levels_hold_several_orders(
        book: OrderBook) -> None:
    rest(book, order(1, BUY, 9_990, 5), order(2, BUY, 10_000, 1), order(3, BUY, 9_990, 2),
         order(4, BUY, 10_000, 7), order(5, SELL, 10_020, 3), order(6, SELL, 10_010, 8),
         order(7, SELL, 10_020, 4))
    assert l3(book, BUY) == [(10_000, 2, 1), (10_000, 4, 7), (9_990, 1, 5), (9_990, 3, 2)]
    assert l3(book, SELL) == [(10_010, 6, 8), (10_020, 5, 3), (10_020, 7, 4)]


@pytest.mark.parametrize(("n", "expected_bids"), [
    (None, [(10_000, 3), (9_999, 2), (9_995, 9), (9_900, 1)]),
    (0, []),
    (1, [(10_000, 3)]),
    (3, [(10_000, 3), (9_999, 2), (9_995, 9)]),
    (50, [(10_000, 3), (9_999, 2), (9_995, 9), (9_900, 1)]),
])
def test_aggregate_l2_best_first_when_any_depth_is_asked(
        book: OrderBook, n: int | None, expected_bids: list[tuple[int, int]]) -> None:
    rest(book, order(1, BUY, 9_995, 4), order(2, BUY, 10_000, 3), order(3, BUY, 9_900, 1),
         order(4, BUY, 9_995, 5), order(5, BUY, 9_999, 2), order(6, SELL, 10_001, 2),
         order(7, SELL, 10_003, 6))
    assert book.depth(BUY, n) == expected_bids
    assert book.depth(SELL, n) == [(10_001, 2), (10_003, 6)][:n]


def test_answer_would_cross_when_prices_meet_the_other_side(book: OrderBook) -> None:
    rest(book, order(1, BUY, 10_000, 1), order(2, SELL, 10_010, 1))
    assert book.would_cross(True, 10_010) and book.would_cross(True, 10_050)
    assert not book.would_cross(True, 10_009)
    assert book.would_cross(False, 10_000) and not book.would_cross(False, 10_001)
    assert book.would_cross(True, None) and book.would_cross(False, None)


@pytest.mark.parametrize(("side", "price", "rests"), [
    (BUY, 10_009, True), (BUY, 10_010, False), (BUY, 10_050, False),
    (SELL, 10_001, True), (SELL, 10_000, False), (SELL, 9_000, False),
])
def test_rest_only_a_non_crossing_order_when_adding_it_as_passive(
        book: OrderBook, side: Side, price: int, rests: bool) -> None:
    rest(book, order(1, BUY, 10_000, 1), order(2, SELL, 10_010, 1))
    if rests:
        rest(book, order(3, side, price, 2))
    before = book.state_hash()
    incoming = order(4, side, price, 5)
    level = book.add_passive(incoming)
    book.validate()
    if rests:
        # at the back of its level, behind order 3
        assert level is not None and level.total_qty == 7 == book.level_qty(side, price)
        assert book.resting_orders[4] is incoming
        assert [entry for entry in l3(book, side) if entry[0] == price] == [
            (price, 3, 2), (price, 4, 5)]
    else:
        # would trade on arrival: the caller matches it, so nothing may have changed
        assert level is None and book.state_hash() == before
        assert incoming.leaves_qty == 5 and 4 not in book.resting_orders


def test_rest_on_either_side_when_adding_passive_to_an_empty_book(book: OrderBook) -> None:
    bid = book.add_passive(order(1, BUY, 10_000, 3))
    assert bid is not None and (bid.price, bid.total_qty) == (10_000, 3)
    assert book.add_passive(order(2, SELL, 9_000, 2)) is None  # crosses the new bid
    ask = book.add_passive(order(3, SELL, 10_001, 2))
    assert ask is not None and (ask.price, ask.total_qty) == (10_001, 2)
    book.validate()
    assert (book.best_bid(), book.best_ask()) == (10_000, 10_001)


# ------------------------------------------------------------------ lazy O(1) cancel


def test_adjust_the_level_at_once_when_an_order_is_removed(book: OrderBook) -> None:
    first, middle, last = rest(book, order(1, SELL, 10_010, 2), order(2, SELL, 10_010, 5),
                               order(3, SELL, 10_010, 4))
    level = book.remove(2)
    assert level is book.asks.levels[10_010] and level.total_qty == 6
    assert middle.leaves_qty == 0  # what marks its queue entry dead
    assert book.level_qty(SELL, 10_010) == 6
    assert book.depth(SELL) == [(10_010, 6)]
    assert l3(book, SELL) == [(10_010, 1, 2), (10_010, 3, 4)]
    assert 2 not in book.resting_orders
    assert (first.leaves_qty, last.leaves_qty) == (2, 4)
    book.validate()


def test_return_none_when_removing_an_order_that_is_not_resting(book: OrderBook) -> None:
    rest(book, order(1, SELL, 10_010, 2))
    assert book.remove(99) is None
    assert book.remove(1) is not None
    assert book.remove(1) is None
    book.validate()


def test_take_out_a_held_order_as_remove_does_by_id(book: OrderBook) -> None:
    first, second = rest(book, order(1, BUY, 9_990, 2), order(2, BUY, 9_990, 5))
    level = book.take_out(second)
    assert level is book.bids.levels[9_990] and level.total_qty == 2
    assert second.leaves_qty == 0 and 2 not in book.resting_orders
    emptied = book.take_out(first)
    assert emptied.total_qty == 0 and 9_990 not in book.bids.levels
    assert book.resting_orders == {} and book.best_bid() is None
    book.validate()


def test_join_the_best_level_when_a_passive_order_comes_at_the_best_price(
        book: OrderBook) -> None:
    best = book.add_passive(order(1, SELL, 10_010, 1))
    assert book.add_passive(order(2, SELL, 10_010, 2)) is best
    behind = book.add_passive(order(3, SELL, 10_020, 4))
    assert behind is not None and behind is not best
    assert best is not None and best.total_qty == 3
    assert l3(book, SELL) == [(10_010, 1, 1), (10_010, 2, 2), (10_020, 3, 4)]
    book.validate()


def test_open_a_fresh_level_when_a_passive_order_comes_at_an_emptied_best_price(
        book: OrderBook) -> None:
    emptied = book.add_passive(order(1, BUY, 10_000, 1))
    book.add_passive(order(2, BUY, 9_990, 1))
    book.remove(1)  # the side still holds the emptied level as its best
    level = book.add_passive(order(3, BUY, 10_000, 6))
    assert level is not None and level is not emptied and level.total_qty == 6
    assert emptied is not None and emptied.total_qty == 0
    assert book.bids.levels[10_000] is level and book.best_bid() == 10_000
    book.validate()


def test_derive_an_orders_side_from_its_is_buy_flag() -> None:
    buy, sell = order(1, BUY, 9_990, 1), order(2, SELL, 10_010, 1)
    assert (buy.side, buy.is_buy, sell.side, sell.is_buy) == (BUY, True, SELL, False)
    assert buy.requeued(9_980, 1, 1, 5).side is BUY


def test_keep_each_book_to_its_own_orders_when_two_books_share_one_index(
        book_cls: type[OrderBook]) -> None:
    index: dict[int, Order] = {}
    sim, alt = book_cls("SIM", index), book_cls("ALT", index)
    rest(sim, order(1, BUY, 9_990, 5))
    alt_order = Order(2, "maker", "c2", "ALT", SELL, OrderType.LIMIT, 5_010, 3)
    alt.add(alt_order)
    assert sim.resting_orders is alt.resting_orders is index and set(index) == {1, 2}
    sim.validate()
    alt.validate()
    taker = Order(3, "taker", "c3", "ALT", BUY, OrderType.LIMIT, 5_010, 3)
    sink = RecordingSink()
    alt.match(taker, 5_010, sink)
    assert sink.calls == [("fill", 2, 3, 5_010, 3, 0)] and set(index) == {1}
    assert sim.remove(1) is not None and index == {}
    sim.validate()
    alt.validate()
    index[1] = order(1, BUY, 9_990, 5)  # indexed, but in no level of SIM's
    with pytest.raises(AssertionError, match="index disagrees"):
        sim.validate()
    alt.validate()  # another symbol's order in the index is not ALT's business


def test_skip_a_removed_order_when_it_reaches_the_head(book: OrderBook) -> None:
    rest(book, order(1, SELL, 10_010, 2), order(2, SELL, 10_010, 3), order(3, SELL, 10_020, 1))
    book.remove(1)
    taker = order(10, BUY, 10_020, 4, trader="taker")
    stopped, calls = match(book, taker, 10_020)
    assert not stopped
    assert calls == [("fill", 2, 10, 10_010, 3, 0), ("fill", 3, 10, 10_020, 1, 0)]
    assert taker.leaves_qty == 0
    assert book.best_ask() is None


def test_move_the_best_price_when_the_best_level_is_emptied_by_cancels(
        book: OrderBook) -> None:
    rest(book, order(1, BUY, 10_000, 1), order(2, BUY, 10_000, 1), order(3, BUY, 9_990, 1))
    book.remove(2)
    assert book.best_bid() == 10_000
    emptied = book.remove(1)
    assert emptied is not None and emptied.total_qty == 0  # the level is gone
    assert book.best_bid() == 9_990
    assert book.depth(BUY) == [(9_990, 1)]
    book.validate()


def test_move_the_best_price_when_a_better_level_arrives_and_when_it_empties(
        book: OrderBook) -> None:
    rest(book, order(1, BUY, 9_990, 1), order(2, SELL, 10_020, 1))
    assert (book.best_bid(), book.best_ask()) == (9_990, 10_020)
    rest(book, order(3, BUY, 10_000, 1), order(4, SELL, 10_010, 1),
         order(5, BUY, 9_980, 1), order(6, SELL, 10_030, 1))
    assert (book.best_bid(), book.best_ask()) == (10_000, 10_010)
    book.validate()
    book.remove(3)
    book.match(order(7, BUY, 10_010, 1, trader="taker"), 10_010, RecordingSink())
    assert (book.best_bid(), book.best_ask()) == (9_990, 10_020)
    book.validate()


def test_rest_again_at_a_price_when_its_level_was_emptied_before(book: OrderBook) -> None:
    rest(book, order(1, SELL, 10_010, 1), order(2, SELL, 10_020, 1))
    book.remove(1)
    assert book.best_ask() == 10_020
    rest(book, order(3, SELL, 10_010, 7))
    assert book.best_ask() == 10_010
    assert l3(book, SELL) == [(10_010, 3, 7), (10_020, 2, 1)]


def test_keep_memory_bounded_when_most_of_a_level_is_canceled(book: OrderBook) -> None:
    for order_id in range(1, 2_001):
        book.add(order(order_id, BUY, 10_000, 1))
    for order_id in range(1, 2_000):
        book.remove(order_id)
    book.validate()
    assert l3(book, BUY) == [(10_000, 2_000, 1)]
    # lazy entries are dropped before they can outnumber the live ones without bound
    assert len(book.bids.levels[10_000].orders) <= 32


def test_keep_memory_bounded_when_a_level_is_consumed_from_the_head(book: OrderBook) -> None:
    for order_id in range(1, 2_001):
        book.add(order(order_id, SELL, 10_010, 1))
    for taker_id in range(3_001, 4_990):  # one fill each: the queue is popped one by one
        book.match(order(taker_id, BUY, 10_010, 1, trader="taker"), 10_010, RecordingSink())
    book.validate()
    assert [entry[1] for entry in l3(book, SELL)] == list(range(1_990, 2_001))
    level = book.asks.levels[10_010]
    # the consumed prefix is dropped once it is most of the queue
    assert len(level.orders) <= max(2 * level.entries(), level.entries() + 16)


def test_keep_queue_position_when_reduce_lowers_leaves(book: OrderBook) -> None:
    first, _, _ = rest(book, order(1, SELL, 10_010, 5), order(2, SELL, 10_010, 3),
                       order(3, SELL, 10_010, 2))
    assert book.reduce(first, 1) == 6
    assert (first.qty, first.leaves_qty) == (1, 1)
    assert l3(book, SELL) == [(10_010, 1, 1), (10_010, 2, 3), (10_010, 3, 2)]
    book.validate()


# ------------------------------------------------------------------ matching


def test_fill_in_price_time_priority_when_a_taker_sweeps(book: OrderBook) -> None:
    rest(book, order(1, SELL, 10_020, 2), order(2, SELL, 10_010, 3), order(3, SELL, 10_010, 4),
         order(4, SELL, 10_030, 5))
    taker = order(10, BUY, 10_020, 8, trader="taker")
    stopped, calls = match(book, taker, 10_020)
    assert not stopped
    assert calls == [("fill", 2, 10, 10_010, 3, 4), ("fill", 3, 10, 10_010, 4, 0),
                     ("fill", 1, 10, 10_020, 1, 1)]
    assert taker.leaves_qty == 0
    assert l3(book, SELL) == [(10_020, 1, 1), (10_030, 4, 5)]
    assert 2 not in book.resting_orders and 3 not in book.resting_orders


def test_print_at_the_resting_price_when_the_taker_bids_higher(book: OrderBook) -> None:
    rest(book, order(1, BUY, 9_990, 2))
    taker = order(10, SELL, 9_900, 2, trader="taker")
    _, calls = match(book, taker, 9_900)
    assert calls == [("fill", 1, 10, 9_990, 2, 0)]


def test_stop_at_the_limit_when_the_book_is_deeper(book: OrderBook) -> None:
    rest(book, order(1, SELL, 10_010, 2), order(2, SELL, 10_011, 2))
    taker = order(10, BUY, 10_010, 5, trader="taker")
    stopped, calls = match(book, taker, 10_010)
    assert not stopped
    assert calls == [("fill", 1, 10, 10_010, 2, 0)]
    assert taker.leaves_qty == 3
    assert l3(book, SELL) == [(10_011, 2, 2)]


def test_sweep_every_level_when_no_limit_is_given(book: OrderBook) -> None:
    rest(book, order(1, BUY, 10_000, 1), order(2, BUY, 9_000, 1), order(3, BUY, 5_000, 1))
    taker = order(10, SELL, None, 5, trader="taker")
    _, calls = match(book, taker, None)
    assert [call[3] for call in calls] == [10_000, 9_000, 5_000]
    assert taker.leaves_qty == 2
    assert book.best_bid() is None


def test_leave_a_partial_maker_at_the_head_when_the_taker_is_smaller(book: OrderBook) -> None:
    rest(book, order(1, SELL, 10_010, 5), order(2, SELL, 10_010, 5))
    _, calls = match(book, order(10, BUY, 10_010, 3, trader="taker"), 10_010)
    assert calls == [("fill", 1, 10, 10_010, 3, 7)]
    assert l3(book, SELL) == [(10_010, 1, 2), (10_010, 2, 5)]


# ------------------------------------------------------------------ self-trade prevention


def test_cancel_own_maker_and_keep_matching_when_stp_is_cancel_resting(
        book: OrderBook) -> None:
    rest(book, order(1, SELL, 10_010, 2, trader="me"), order(2, SELL, 10_010, 3))
    taker = order(10, BUY, 10_010, 3, trader="me", stp=StpMode.CANCEL_RESTING)
    stopped, calls = match(book, taker, 10_010)
    assert not stopped
    assert calls == [("stp_cancel", 1, 0, 10_010, 2, 3), ("fill", 2, 10, 10_010, 3, 0)]
    assert taker.leaves_qty == 0
    assert 1 not in book.resting_orders


def test_stop_the_taker_and_keep_the_maker_when_stp_is_cancel_incoming(
        book: OrderBook) -> None:
    rest(book, order(1, SELL, 10_010, 2), order(2, SELL, 10_010, 3, trader="me"),
         order(3, SELL, 10_010, 4))
    taker = order(10, BUY, 10_010, 6, trader="me", stp=StpMode.CANCEL_INCOMING)
    stopped, calls = match(book, taker, 10_010)
    assert stopped
    assert calls == [("fill", 1, 10, 10_010, 2, 7)]
    assert taker.leaves_qty == 4
    assert l3(book, SELL) == [(10_010, 2, 3), (10_010, 3, 4)]


def test_cancel_the_maker_and_stop_the_taker_when_stp_is_cancel_both(book: OrderBook) -> None:
    rest(book, order(1, SELL, 10_010, 3, trader="me"), order(2, SELL, 10_010, 4))
    taker = order(10, BUY, 10_010, 6, trader="me", stp=StpMode.CANCEL_BOTH)
    stopped, calls = match(book, taker, 10_010)
    assert stopped
    assert calls == [("stp_cancel", 1, 0, 10_010, 3, 4)]
    assert taker.leaves_qty == 6
    assert l3(book, SELL) == [(10_010, 2, 4)]


def test_drop_the_level_when_cancel_both_takes_its_last_order(book: OrderBook) -> None:
    rest(book, order(1, SELL, 10_010, 3, trader="me"), order(2, SELL, 10_020, 4))
    stopped, _ = match(book, order(10, BUY, 10_020, 6, trader="me", stp=StpMode.CANCEL_BOTH),
                       10_020)
    assert stopped
    assert book.depth(SELL) == [(10_020, 4)]


def test_shrink_both_orders_when_stp_is_decrement(book: OrderBook) -> None:
    maker, other = rest(book, order(1, SELL, 10_010, 5, trader="me"),
                        order(2, SELL, 10_010, 4))
    taker = order(10, BUY, 10_010, 3, trader="me", stp=StpMode.DECREMENT)
    stopped, calls = match(book, taker, 10_010)
    assert not stopped
    assert calls == [("decrement", 1, 10, 10_010, 3, 6)]
    assert (maker.qty, maker.leaves_qty) == (2, 2)
    assert (taker.qty, taker.leaves_qty) == (0, 0)
    assert other.leaves_qty == 4
    assert l3(book, SELL) == [(10_010, 1, 2), (10_010, 2, 4)]


def test_remove_the_maker_and_trade_on_when_decrement_exhausts_it(book: OrderBook) -> None:
    rest(book, order(1, SELL, 10_010, 2, trader="me"), order(2, SELL, 10_010, 4))
    taker = order(10, BUY, 10_010, 5, trader="me", stp=StpMode.DECREMENT)
    _, calls = match(book, taker, 10_010)
    assert calls == [("decrement", 1, 10, 10_010, 2, 4), ("fill", 2, 10, 10_010, 3, 1)]
    assert (taker.qty, taker.leaves_qty) == (3, 0)
    assert l3(book, SELL) == [(10_010, 2, 1)]


# ------------------------------------------------------------------ fill-or-kill sizing


def test_count_fillable_quantity_up_to_the_limit_when_sizing_fok(book: OrderBook) -> None:
    rest(book, order(1, SELL, 10_010, 2), order(2, SELL, 10_010, 3), order(3, SELL, 10_020, 4))
    taker = order(10, BUY, 10_010, 9, trader="taker")
    assert book.fillable_qty(taker, 10_010, 9) == 5
    assert book.fillable_qty(taker, 10_020, 9) == 9
    assert book.fillable_qty(taker, None, 100) == 9
    assert book.fillable_qty(taker, 10_000, 9) == 0
    # sizing never touches the book
    assert l3(book, SELL) == [(10_010, 1, 2), (10_010, 2, 3), (10_020, 3, 4)]


def test_stop_counting_when_the_wanted_quantity_is_reached(book: OrderBook) -> None:
    rest(book, order(1, SELL, 10_010, 2), order(2, SELL, 10_010, 3), order(3, SELL, 10_020, 4))
    taker = order(10, BUY, 10_020, 4, trader="taker")
    # enough to tell that a fill-or-kill can fill, without walking the rest of the book
    assert 4 <= book.fillable_qty(taker, 10_020, 4) < 9


@pytest.mark.parametrize(("stp", "expected"), [
    (StpMode.CANCEL_RESTING, 6),  # the own order will be canceled: count past it
    (StpMode.CANCEL_INCOMING, 2),  # matching will stop at the own order
    (StpMode.CANCEL_BOTH, 2),
    (StpMode.DECREMENT, 2),
])
def test_honour_stp_when_sizing_fok(book: OrderBook, stp: StpMode, expected: int) -> None:
    rest(book, order(1, SELL, 10_010, 2), order(2, SELL, 10_010, 3, trader="me"),
         order(3, SELL, 10_010, 4))
    taker = order(10, BUY, 10_010, 6, trader="me", stp=stp)
    assert book.fillable_qty(taker, 10_010, 6) == expected


# ------------------------------------------------------------------ checks and hashing


CORRUPTIONS: dict[str, Callable[[OrderBook], None]] = {
    "level total": lambda b: setattr(b.asks.levels[10_010], "total_qty", 99),
    "live count": lambda b: setattr(b.asks.levels[10_010], "live_count", 5),
    "order leaves above qty": lambda b: setattr(b.resting_orders[1], "leaves_qty", 50),
    "unindexed order": lambda b: b.resting_orders.pop(2),
    "misfiled price": lambda b: setattr(b.resting_orders[3], "price", 10_011),
    "empty level kept": lambda b: b.bids.level_for_insert(9_000),
    "crossed book": lambda b: b.add(order(9, BUY, 10_020, 1)),
    "stale best level": lambda b: (b.add(order(8, BUY, 9_990, 1)),
                                   setattr(b.bids, "_best", b.bids.levels[9_990])),
}


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS.values()), ids=list(CORRUPTIONS))
def test_raise_when_validating_a_corrupted_book(book: OrderBook,
                                                corrupt: Callable[[OrderBook], None]) -> None:
    rest(book, order(1, SELL, 10_010, 2), order(2, SELL, 10_010, 3), order(3, BUY, 10_000, 1))
    corrupt(book)
    with pytest.raises(AssertionError):
        book.validate()


def build(book_cls: type[OrderBook], orders: list[Order], removed: tuple[int, ...] = ()
          ) -> OrderBook:
    book = book_cls("SIM")
    for resting in orders:
        book.add(resting)
    for order_id in removed:
        book.remove(order_id)
    book.validate()
    return book


def test_hash_equal_when_two_books_hold_the_same_queues(book_cls: type[OrderBook]) -> None:
    def orders() -> list[Order]:
        return [order(1, BUY, 10_000, 2), order(2, BUY, 10_000, 3), order(3, SELL, 10_010, 1)]

    assert build(book_cls, orders()).state_hash() == build(book_cls, orders()).state_hash()
    # a lazily removed order leaves no trace: the book is the same as if it never came
    with_cancel = build(book_cls, [*orders(), order(4, BUY, 9_990, 5)], removed=(4,))
    assert with_cancel.state_hash() == build(book_cls, orders()).state_hash()


@pytest.mark.parametrize("variant", ["queue order", "quantity", "price", "side", "trader"])
def test_hash_differs_when_the_books_differ(book_cls: type[OrderBook], variant: str) -> None:
    base = [order(1, BUY, 10_000, 2), order(2, BUY, 10_000, 3)]
    changed = {
        "queue order": [order(2, BUY, 10_000, 3), order(1, BUY, 10_000, 2)],
        "quantity": [order(1, BUY, 10_000, 2), order(2, BUY, 10_000, 4)],
        "price": [order(1, BUY, 10_000, 2), order(2, BUY, 9_999, 3)],
        "side": [order(1, BUY, 10_000, 2), order(2, SELL, 10_001, 3)],
        "trader": [order(1, BUY, 10_000, 2), order(2, BUY, 10_000, 3, trader="other")],
    }[variant]
    assert build(book_cls, base).state_hash() != build(book_cls, changed).state_hash()
