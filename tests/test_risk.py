"""Pre-trade risk: order size, worst-case position, price band, open orders, message rate."""

from __future__ import annotations

from unittest.mock import ANY

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from config import InstrumentConfig, RiskConfig
from engine import Market
from models import AmendOrder, AmendRejected, OrderAccepted, OrderRejected, RejectCode
from risk_manager import OpenQty, RiskManager, TraderState, check_price_band
from tests.conftest import (
    ALT,
    BUY,
    ONE_SECOND,
    SELL,
    Harness,
    cancel,
    limit,
    make_config,
    of_type,
    stop,
    two_symbol_config,
)


def is_accepted(events: list) -> bool:
    return bool(of_type(events, OrderAccepted))


def rejected_code(events: list) -> RejectCode | None:
    rejects = of_type(events, OrderRejected) + of_type(events, AmendRejected)
    return rejects[0].code if rejects else None


# ------------------------------------------------------------------ order size


def test_reject_order_when_qty_exceeds_max_order_qty() -> None:
    h = Harness(make_config(risk={"max_order_qty": 10}))
    assert h.send(limit("a", "a1", BUY, 11, 9_990)) == [
        OrderRejected(h.now, "a", "a1", RejectCode.RISK_MAX_ORDER_QTY, ANY)]
    assert is_accepted(h.send(limit("a", "a2", BUY, 10, 9_990)))


def test_reject_amend_when_the_new_qty_exceeds_max_order_qty() -> None:
    h = Harness(make_config(risk={"max_order_qty": 10}))
    h.send(limit("a", "a1", BUY, 5, 9_990))
    assert h.send(AmendOrder("a", 1, None, None, 11)) == [
        AmendRejected(h.now, "a", 1, None, RejectCode.RISK_MAX_ORDER_QTY, ANY)]
    assert h.queue(BUY) == [(9_990, 1, 5)]


# ------------------------------------------------------------------ worst-case position


def test_reject_buy_when_position_plus_open_buys_would_exceed_max_position() -> None:
    h = Harness(make_config(risk={"max_position": 10}))
    h.send_all([limit("m", "m1", SELL, 6, 10_000), limit("a", "a1", BUY, 6, 10_000),
                limit("a", "a2", BUY, 3, 9_990)])
    # long 6, 3 more could fill: 2 more would make 11
    assert rejected_code(h.send(limit("a", "a3", BUY, 2, 9_980))) is \
        RejectCode.RISK_MAX_POSITION
    assert is_accepted(h.send(limit("a", "a4", BUY, 1, 9_980)))


def test_count_sells_against_the_long_when_checking_max_position() -> None:
    h = Harness(make_config(risk={"max_position": 10}))
    h.send_all([limit("m", "m1", SELL, 6, 10_000), limit("a", "a1", BUY, 6, 10_000)])
    # selling 16 from long 6 reaches short 10 at worst; 17 would reach short 11
    assert rejected_code(h.send(limit("a", "a2", SELL, 17, 10_100))) is \
        RejectCode.RISK_MAX_POSITION
    assert is_accepted(h.send(limit("a", "a3", SELL, 16, 10_100)))


def test_count_waiting_stops_when_checking_max_position() -> None:
    h = Harness(make_config(risk={"max_position": 10}))
    h.send(stop("a", "a1", SELL, 8, 9_000))
    assert rejected_code(h.send(limit("a", "a2", SELL, 3, 10_100))) is \
        RejectCode.RISK_MAX_POSITION


def test_reject_amend_when_the_added_qty_would_exceed_max_position() -> None:
    h = Harness(make_config(risk={"max_position": 10}))
    h.send_all([limit("a", "a1", BUY, 6, 9_990), limit("a", "a2", BUY, 3, 9_980)])
    assert h.send(AmendOrder("a", 1, None, None, 8)) == [
        AmendRejected(h.now, "a", 1, None, RejectCode.RISK_MAX_POSITION, ANY)]
    assert rejected_code(h.send(AmendOrder("a", 1, None, None, 7))) is None


# ------------------------------------------------------------------ price band


@pytest.mark.parametrize(("price", "allowed"), [
    (11_000, True), (11_001, False), (9_000, True), (8_999, False), (10_000, True)])
def test_check_the_band_around_the_configured_reference_when_nothing_printed(
        h: Harness, price: int, allowed: bool) -> None:
    side = BUY if price <= 10_000 else SELL
    events = h.send(limit("a", "a1", side, 1, price))
    if allowed:
        assert is_accepted(events)
    else:
        assert events == [OrderRejected(h.now, "a", "a1", RejectCode.RISK_PRICE_BAND, ANY)]


def test_recentre_the_band_on_the_last_trade_when_one_has_printed(h: Harness) -> None:
    h.send_all([limit("m", "m1", SELL, 1, 10_500), limit("t", "t1", BUY, 1, 10_500)])
    # 10500 +- 1050
    assert is_accepted(h.send(limit("a", "a1", SELL, 1, 11_550)))
    assert rejected_code(h.send(limit("a", "a2", SELL, 1, 11_551))) is RejectCode.RISK_PRICE_BAND
    assert rejected_code(h.send(limit("a", "a3", BUY, 1, 9_449))) is RejectCode.RISK_PRICE_BAND
    assert is_accepted(h.send(limit("a", "a4", BUY, 1, 9_450)))


def test_use_the_configured_width_when_the_band_is_narrow() -> None:
    h = Harness(make_config(instruments=[{"symbol": "SIM", "price_band_pct": 2.0}]))
    assert rejected_code(h.send(limit("a", "a1", SELL, 1, 10_201))) is \
        RejectCode.RISK_PRICE_BAND
    assert is_accepted(h.send(limit("a", "a2", SELL, 1, 10_200)))


# ------------------------------------------------------------------ open orders


def test_reject_order_when_max_open_orders_is_reached_across_symbols() -> None:
    h = Harness(two_symbol_config(risk={"max_open_orders": 3}))
    h.send_all([limit("a", "a1", BUY, 1, 9_990), limit("a", "a2", SELL, 1, 5_010, symbol=ALT),
                stop("a", "a3", BUY, 1, 10_500)])
    assert h.send(limit("a", "a4", BUY, 1, 9_980)) == [
        OrderRejected(h.now, "a", "a4", RejectCode.RISK_MAX_OPEN_ORDERS, ANY)]
    assert is_accepted(h.send(limit("b", "b1", BUY, 1, 9_980)))  # the cap is per trader
    h.send(cancel("a", order_id=3))
    assert is_accepted(h.send(limit("a", "a5", BUY, 1, 9_980)))


def test_free_a_slot_when_an_open_order_fills() -> None:
    h = Harness(make_config(risk={"max_open_orders": 1}))
    h.send(limit("a", "a1", SELL, 1, 10_010))
    assert rejected_code(h.send(limit("a", "a2", SELL, 1, 10_020))) is \
        RejectCode.RISK_MAX_OPEN_ORDERS
    h.send(limit("t", "t1", BUY, 1, 10_010))
    assert is_accepted(h.send(limit("a", "a3", SELL, 1, 10_020)))


# ------------------------------------------------------------------ message rate


def rate_harness(per_sec: float, burst: int) -> Harness:
    return Harness(make_config(risk={"rate_limit_per_sec": per_sec, "rate_limit_burst": burst}))


def test_allow_a_burst_then_refill_over_time_when_the_rate_limit_applies() -> None:
    h = rate_harness(2.0, 3)
    t0 = h.now + 1
    for i in range(3):
        assert is_accepted(h.send(limit("a", f"b{i}", BUY, 1, 9_900 + i), t0))
    assert h.send(limit("a", "x1", BUY, 1, 9_950), t0) == [
        OrderRejected(t0, "a", "x1", RejectCode.RATE_LIMITED, ANY)]
    # 2 per second: 0.4 s buys 0.8 of a message, 0.5 s buys one
    assert rejected_code(h.send(limit("a", "x2", BUY, 1, 9_950), t0 + 400_000)) is \
        RejectCode.RATE_LIMITED
    assert is_accepted(h.send(limit("a", "x3", BUY, 1, 9_950), t0 + ONE_SECOND // 2))
    assert rejected_code(h.send(limit("a", "x4", BUY, 1, 9_951), t0 + ONE_SECOND // 2)) is \
        RejectCode.RATE_LIMITED
    # a long pause refills only up to the burst
    t1 = t0 + 60 * ONE_SECOND
    results = [is_accepted(h.send(limit("a", f"c{i}", SELL, 1, 10_100 + i), t1))
               for i in range(4)]
    assert results == [True, True, True, False]


def test_count_amends_against_the_rate_when_a_trader_amends() -> None:
    h = rate_harness(1.0, 2)
    t0 = h.now + 1
    h.send(limit("a", "a1", BUY, 5, 9_990), t0)
    assert rejected_code(h.send(AmendOrder("a", 1, None, None, 4), t0)) is None
    assert h.send(AmendOrder("a", 1, None, None, 3), t0) == [
        AmendRejected(t0, "a", 1, None, RejectCode.RATE_LIMITED, ANY)]


def test_limit_each_trader_separately_when_one_is_throttled() -> None:
    h = rate_harness(1.0, 1)
    t0 = h.now + 1
    assert is_accepted(h.send(limit("a", "a1", BUY, 1, 9_990), t0))
    assert rejected_code(h.send(limit("a", "a2", BUY, 1, 9_990), t0)) is RejectCode.RATE_LIMITED
    assert is_accepted(h.send(limit("b", "b1", BUY, 1, 9_990), t0))


def test_refill_slowly_when_the_sustained_rate_is_below_one_per_second() -> None:
    h = rate_harness(0.5, 1)  # one message every two seconds
    t0 = h.now + 1
    assert is_accepted(h.send(limit("a", "a1", BUY, 1, 9_990), t0))
    assert rejected_code(h.send(limit("a", "a2", BUY, 1, 9_991), t0 + ONE_SECOND)) is \
        RejectCode.RATE_LIMITED
    assert is_accepted(h.send(limit("a", "a3", BUY, 1, 9_992), t0 + 2 * ONE_SECOND))


def test_refill_at_the_configured_fraction_when_the_rate_is_not_a_whole_number() -> None:
    h = rate_harness(2.5, 1)  # one message every 0.4 s
    t0 = h.now + 1
    assert is_accepted(h.send(limit("a", "a1", BUY, 1, 9_990), t0))
    assert rejected_code(h.send(limit("a", "a2", BUY, 1, 9_991), t0 + 399_000)) is \
        RejectCode.RATE_LIMITED
    assert is_accepted(h.send(limit("a", "a3", BUY, 1, 9_992), t0 + 400_000))


@settings(max_examples=1_500, deadline=None, derandomize=True, database=None)
@given(per_us=st.sampled_from((0, 1, 400, 10**6, 10**9 - 1, 10**9, 10**9 + 1, 10**12)),
       burst=st.sampled_from((1, 2, 3, 10**9)),
       spent=st.sampled_from((0, 1, 10**9 - 1, 10**9, 10**9 + 1, 2 * 10**9))
       | st.integers(0, 3 * 10**9),
       elapsed=st.sampled_from((-5, 0, 1, 2)) | st.integers(1, 10**7))
def test_refill_the_bucket_to_elapsed_times_rate_capped_at_the_burst(
        per_us: int, burst: int, spent: int, elapsed: int) -> None:
    """The bucket skips its division when one microsecond's refill fills it; it must
    still hold exactly ``min(capacity, tokens + elapsed * refill)`` (nothing for a
    message no later than the last), less the token a message takes."""
    risk = RiskManager(RiskConfig(rate_limit_per_sec=per_us / 1_000, rate_limit_burst=burst))
    capacity = burst * 10**9
    tokens = max(capacity - spent, 0)
    trader = TraderState("a", burst)
    trader.rate_tokens, trader.rate_ts = tokens, 1_000
    reject = risk.take_rate_token(trader, 1_000 + elapsed)
    refilled = min(capacity, tokens + elapsed * per_us) if elapsed > 0 else tokens
    if refilled < 10**9:
        assert reject is not None and reject[0] is RejectCode.RATE_LIMITED
        assert trader.rate_tokens == refilled
    else:
        assert reject is None and trader.rate_tokens == refilled - 10**9
    assert trader.rate_ts == 1_000 + max(elapsed, 0)


# ------------------------------------------------------------------ the new-order fast path


def _trader_state(burst: int, live: int, exposure: tuple[int, int] | None,
                  rate: tuple[int, int | None]) -> TraderState:
    trader = TraderState("a", burst)
    trader.live_orders = {f"o{i}": None for i in range(live)}  # type: ignore[misc]
    if exposure is not None:
        trader.exposure["SIM"] = OpenQty(*exposure)
    trader.rate_tokens, trader.rate_ts = rate
    return trader


@settings(max_examples=800, deadline=None, derandomize=True, database=None)
@given(limits=st.tuples(st.integers(1, 10), st.integers(0, 10), st.integers(1, 8),
                        st.sampled_from((0.5, 1.0, 2.5, 1_000.0)), st.integers(1, 4)),
       live=st.integers(0, 6),
       exposure=st.none() | st.tuples(st.integers(0, 6), st.integers(0, 6)),
       # mostly tokens to spare, so that the later checks are reached too
       rate=st.tuples(st.sampled_from((4 * 10**9,) * 4 + (10**9, 10**9 - 1, 0)),
                      st.none() | st.integers(0, 3_000_000)),
       order=st.tuples(st.integers(0, 3_000_000), st.booleans(), st.integers(1, 8),
                       st.integers(-12, 12)))
def test_decide_like_the_named_rules_when_a_new_order_takes_the_inline_path(
        limits: tuple[int, int, int, float, int], live: int,
        exposure: tuple[int, int] | None, rate: tuple[int, int | None],
        order: tuple[int, bool, int, int]) -> None:
    """``check_new_order`` tests the limits inline for speed; whatever the state, it must
    decide exactly as the rules it inlines, applied one after another (rate token, then
    size / open orders / worst-case position), and leave the same bucket."""
    max_qty, max_position, max_open, per_sec, burst = limits
    risk = RiskManager(RiskConfig(max_order_qty=max_qty, max_position=max_position,
                                  max_open_orders=max_open, rate_limit_per_sec=per_sec,
                                  rate_limit_burst=burst))
    ts, is_buy, qty, position = order
    fast = _trader_state(burst, live, exposure, rate)
    named = _trader_state(burst, live, exposure, rate)
    got = risk.check_new_order(fast, ts, "SIM", fast.exposure.get("SIM"), is_buy, qty, position)
    expected = risk.take_rate_token(named, ts) or risk.check_order(
        named, "SIM", is_buy, qty, qty, position, 1)
    assert got == expected
    assert (fast.rate_tokens, fast.rate_ts) == (named.rate_tokens, named.rate_ts)


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(centres=st.lists(st.integers(1, 2_000_000), min_size=1, max_size=4),
       band_bps=st.integers(1, 10_000), offset=st.integers(-2_000, 2_000),
       near_edge=st.booleans())
def test_draw_the_band_edges_as_check_price_band_when_the_engine_caches_them(
        centres: list[int], band_bps: int, offset: int, near_edge: bool) -> None:
    """The engine tests a new limit order's price against its market's cached band
    edges, refreshed when the centre has moved: whatever the centres it saw before, the
    edges must decide exactly as ``check_price_band`` around the current one."""
    market = Market(InstrumentConfig(symbol="SIM", reference_price=10_000), 0, 0, {})
    market.band_bps = band_bps
    for centre in centres:
        market.band_centre = centre
        if market.edges_centre != market.band_centre:
            market.refresh_band_edges()
    centre = centres[-1]
    band = centre * band_bps // 10_000
    # a price at one of the edges (give or take a tick) or anywhere near the centre
    price = max(1, (centre + band if offset > 0 else centre - band) + offset % 3 - 1
                if near_edge else centre + offset)
    inside = market.band_low <= price <= market.band_high
    assert inside == (check_price_band(price, centre, band_bps) is None)


def test_reject_a_new_order_outside_the_band_with_the_named_rule_when_it_moved_back(
        h: Harness) -> None:
    h.send_all([limit("m", "m1", SELL, 1, 10_500), limit("t", "t1", BUY, 1, 10_500)])
    h.send_all([limit("m", "m2", SELL, 1, 10_000), limit("t", "t2", BUY, 1, 10_000)])
    # back to 10000 +- 1000 after 10500 +- 1050: the edges follow every move
    assert is_accepted(h.send(limit("a", "a1", SELL, 1, 11_000)))
    assert h.send(limit("a", "a2", SELL, 1, 11_001)) == [OrderRejected(
        h.now, "a", "a2", *check_price_band(11_001, 10_000, 1_000))]  # type: ignore[misc]
