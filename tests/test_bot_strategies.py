"""Strategies against a fake context: deterministic given the seed, and sensible."""

from __future__ import annotations

import logging
import random
from typing import Any

import pytest

from bot_client import BotContext
from bot_strategies import (
    BUILTIN_STRATEGIES,
    Book,
    Depth,
    FillEvent,
    MarketMaker,
    MeanReversionTrader,
    MomentumTrader,
    NoiseTrader,
    OrderState,
    ParamError,
    Strategy,
    StrategyContext,
    TradeEvent,
    TWAPExecutor,
)

Action = tuple[Any, ...]


class FakeContext:
    """A StrategyContext whose exchange acks, cancels and amends at once.

    Tests set the market (best_bid, best_ask, last_trade_price, position, now)
    directly and read ``actions``; ``fill`` executes an order and returns the event.
    """

    def __init__(self, cls: type[Strategy], seed: int = 1, **params: Any) -> None:
        self.trader_id = "fake"
        self.symbol = "SIM"
        self.params = cls.resolve_params(params)
        self.rng = random.Random(seed)
        self.log = logging.getLogger("fake")
        self.reference_price = 10_000
        self.price_band_pct = 10.0
        self.now = 1_000_000
        self.position = 0
        self.cash: float | None = None
        self.equity: float | None = None
        self.realized_pnl: float | None = None
        self.best_bid: int | None = None
        self.best_ask: int | None = None
        self.last_trade_price: int | None = None
        self.orders: dict[str, OrderState] = {}
        self.actions: list[Action] = []
        self._next = 0

    @property
    def open_orders(self) -> dict[str, OrderState]:
        return dict(self.orders)

    def depth(self, n: int = 5) -> Depth:
        return Depth([], [])

    def buy(self, qty: int, price: int | None = None, tif: str | None = None,
            post_only: bool = False) -> str:
        return self._order("buy", qty, price, tif, post_only)

    def sell(self, qty: int, price: int | None = None, tif: str | None = None,
             post_only: bool = False) -> str:
        return self._order("sell", qty, price, tif, post_only)

    def _order(self, side: str, qty: int, price: int | None, tif: str | None,
               post_only: bool) -> str:
        self._next += 1
        coid = f"c{self._next}"
        tif = tif or "gtc"
        self.orders[coid] = OrderState(coid, side, qty, price, tif, post_only,
                                       leaves_qty=qty, status="open")
        self.actions.append(("new", side, qty, price, tif, post_only))
        return coid

    def cancel(self, client_order_id: str) -> bool:
        self.actions.append(("cancel", client_order_id))
        return self.orders.pop(client_order_id, None) is not None

    def cancel_all(self) -> None:
        self.actions.append(("cancel_all",))
        self.orders.clear()

    def amend(self, client_order_id: str, price: int | None = None,
              qty: int | None = None) -> bool:
        self.actions.append(("amend", client_order_id, price, qty))
        order = self.orders.get(client_order_id)
        if order is not None and price is not None:
            order.price = price
        return order is not None

    def fill(self, coid: str, qty: int | None = None) -> FillEvent:
        order = self.orders[coid]
        qty = order.leaves_qty if qty is None else qty
        order.leaves_qty -= qty
        order.filled_qty += qty
        self.position += qty if order.side == "buy" else -qty
        if order.leaves_qty == 0:
            del self.orders[coid]
        price = order.price or self.reference_price
        return FillEvent(coid, order.side, price, qty, order.leaves_qty)

    def expire_ioc(self) -> None:
        """What the exchange does with the unfilled rest of IOC orders."""
        for coid in [c for c, o in self.orders.items() if o.tif == "ioc"]:
            del self.orders[coid]

    def new_orders(self) -> list[Action]:
        return [a for a in self.actions if a[0] == "new"]


def test_fake_and_real_contexts_both_satisfy_the_strategy_api() -> None:
    assert isinstance(FakeContext(MarketMaker), StrategyContext)
    assert isinstance(BotContext("t1"), StrategyContext)


# --------------------------------------------------------------------------- determinism


def _price_path(step: int) -> int:
    """A market that trends up, then down, with a wobble: every strategy gets signals."""
    trend = step * 3 if step < 30 else 90 - (step - 30) * 4
    return 10_000 + trend + (7 if step % 3 == 0 else -5 if step % 3 == 1 else 0)


def _run_script(cls: type[Strategy], seed: int, **params: Any) -> list[Action]:
    ctx = FakeContext(cls, seed, **params)
    strategy = cls()
    strategy.on_start(ctx)
    for step in range(60):
        ctx.now += 500_000
        price = _price_path(step)
        ctx.best_bid, ctx.best_ask = price - 2, price + 2
        ctx.last_trade_price = price
        strategy.on_trade(ctx, TradeEvent("SIM", price, 3, "buy"))
        strategy.on_book(ctx, Book("SIM"))
        strategy.on_timer(ctx)
        # Fill every third live order, deterministically, so fills feed back in.
        for coid in sorted(ctx.orders)[::3]:
            strategy.on_fill(ctx, ctx.fill(coid))
        ctx.expire_ioc()
    strategy.on_stop(ctx)
    return ctx.actions


FAST_PARAMS: dict[str, dict[str, Any]] = {
    "TWAPExecutor": {"duration_s": 20.0, "slices": 10, "total_qty": 50},
    "MomentumTrader": {"fast_window": 3, "slow_window": 8},
    "MeanReversionTrader": {"window": 8, "entry_z": 1.0, "exit_z": 0.2},
}


@pytest.mark.parametrize("name", sorted(BUILTIN_STRATEGIES))
def test_same_seed_and_inputs_give_the_same_actions(name: str) -> None:
    cls = BUILTIN_STRATEGIES[name]
    params = FAST_PARAMS.get(name, {})
    first = _run_script(cls, 7, **params)
    second = _run_script(cls, 7, **params)
    assert len(first) > 3, "the script must make the strategy act, or this proves nothing"
    assert first == second


@pytest.mark.parametrize("cls", [NoiseTrader, MarketMaker])
def test_random_strategies_depend_on_their_seed(cls: type[Strategy]) -> None:
    runs = {tuple(_run_script(cls, seed)) for seed in range(5)}
    assert len(runs) > 1


def test_strategies_never_use_the_global_random() -> None:
    random.seed(1)
    first = _run_script(NoiseTrader, 5)
    random.seed(999)
    assert _run_script(NoiseTrader, 5) == first


# --------------------------------------------------------------------------- market maker


def _quotes(ctx: FakeContext) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {"buy": [], "sell": []}
    for order in ctx.orders.values():
        out[order.side].append(order.price)  # type: ignore[arg-type]
    return out


def test_market_maker_quotes_both_sides_into_an_empty_book() -> None:
    ctx = FakeContext(MarketMaker, levels=2, size=7, half_spread=5, spread_jitter=0)
    MarketMaker().on_start(ctx)
    quotes = _quotes(ctx)
    assert sorted(quotes["buy"]) == [9992, 9995]  # around the reference price 10000
    assert sorted(quotes["sell"]) == [10005, 10008]
    assert all(a[2] == 7 and a[5] is True for a in ctx.new_orders())  # size, post-only


def test_market_maker_skews_quotes_against_inventory() -> None:
    flat = FakeContext(MarketMaker, spread_jitter=0, skew_per_lot=0.1)
    long = FakeContext(MarketMaker, spread_jitter=0, skew_per_lot=0.1)
    long.position = 100
    MarketMaker().on_start(flat)
    MarketMaker().on_start(long)
    flat_q, long_q = _quotes(flat), _quotes(long)
    # Long 100 lots at 0.1 tick/lot: both quotes 10 ticks lower, to sell more, buy less.
    assert max(long_q["buy"]) == max(flat_q["buy"]) - 10
    assert min(long_q["sell"]) == min(flat_q["sell"]) - 10


def test_market_maker_stops_adding_to_a_full_inventory() -> None:
    ctx = FakeContext(MarketMaker, max_inventory=50)
    ctx.position = 50
    MarketMaker().on_start(ctx)
    assert _quotes(ctx)["buy"] == []
    assert len(_quotes(ctx)["sell"]) == 2


def test_market_maker_follows_trades_and_does_not_churn() -> None:
    ctx = FakeContext(MarketMaker, spread_jitter=0, fair_alpha=1.0)
    mm = MarketMaker()
    mm.on_start(ctx)
    before = len(ctx.actions)
    mm.on_book(ctx, Book("SIM"))
    mm.on_timer(ctx)
    assert len(ctx.actions) == before, "nothing changed, so nothing should be sent"
    mm.on_trade(ctx, TradeEvent("SIM", 10_050, 1, "buy"))
    amends = [a for a in ctx.actions[before:] if a[0] == "amend"]
    assert len(amends) == 4  # every quote moved up by 50 ticks, in place
    assert sorted(_quotes(ctx)["buy"]) == [10042, 10045]


def test_market_maker_never_crosses_the_opposite_touch() -> None:
    ctx = FakeContext(MarketMaker, spread_jitter=0)
    ctx.best_bid, ctx.best_ask = 9_990, 9_993  # someone else's market, below our fair
    ctx.last_trade_price = 10_000
    mm = MarketMaker()
    mm.fair = 10_000.0
    mm.half_spread = 5
    mm.requote(ctx)
    assert max(_quotes(ctx)["buy"]) <= 9_992


def test_market_maker_replaces_a_filled_quote() -> None:
    ctx = FakeContext(MarketMaker, levels=1)
    mm = MarketMaker()
    mm.on_start(ctx)
    bid = next(c for c, o in ctx.orders.items() if o.side == "buy")
    mm.on_fill(ctx, ctx.fill(bid))
    assert ctx.position == 10
    assert len(_quotes(ctx)["buy"]) == 1 and bid not in ctx.orders


# --------------------------------------------------------------------------- noise


def test_noise_trader_orders_stay_inside_the_price_band() -> None:
    ctx = FakeContext(NoiseTrader, trade_probability=1.0, max_offset=5000)
    noise = NoiseTrader()
    for _ in range(200):
        noise.on_timer(ctx)
        ctx.expire_ioc()
    prices = [a[3] for a in ctx.new_orders()]
    assert len(prices) == 200
    assert all(9_000 <= p <= 11_000 for p in prices)


def test_noise_trader_only_reduces_beyond_max_position() -> None:
    ctx = FakeContext(NoiseTrader, trade_probability=1.0, max_position=20)
    ctx.position = 25
    noise = NoiseTrader()
    for _ in range(30):
        noise.on_timer(ctx)
    assert {a[1] for a in ctx.new_orders()} == {"sell"}


def test_noise_trader_cancels_its_oldest_orders_beyond_the_limit() -> None:
    ctx = FakeContext(NoiseTrader, trade_probability=1.0, market_ratio=0.0, max_open_orders=3)
    noise = NoiseTrader()
    for _ in range(10):
        noise.on_timer(ctx)
    assert len(ctx.orders) <= 4  # 3 kept, plus the one placed this tick
    canceled = [a[1] for a in ctx.actions if a[0] == "cancel"]
    assert canceled[:2] == ["c1", "c2"]


# --------------------------------------------------------------------------- samplers


def _feed(strategy: Strategy, ctx: FakeContext, prices: list[int]) -> None:
    for price in prices:
        ctx.last_trade_price = price
        ctx.best_bid, ctx.best_ask = price - 1, price + 1
        strategy.on_timer(ctx)
        ctx.expire_ioc()


def test_momentum_buys_an_uptrend_and_sells_a_downtrend() -> None:
    up = FakeContext(MomentumTrader, fast_window=3, slow_window=6, cooldown_ticks=0)
    _feed(MomentumTrader(), up, [10_000 + 5 * i for i in range(12)])
    down = FakeContext(MomentumTrader, fast_window=3, slow_window=6, cooldown_ticks=0)
    _feed(MomentumTrader(), down, [10_000 - 5 * i for i in range(12)])
    assert up.new_orders() and {a[1] for a in up.new_orders()} == {"buy"}
    assert down.new_orders() and {a[1] for a in down.new_orders()} == {"sell"}
    assert all(a[4] == "ioc" for a in up.new_orders() + down.new_orders())


def test_momentum_respects_max_position() -> None:
    ctx = FakeContext(MomentumTrader, fast_window=3, slow_window=6, cooldown_ticks=0,
                      max_position=10)
    ctx.position = 10
    _feed(MomentumTrader(), ctx, [10_000 + 5 * i for i in range(12)])
    assert ctx.new_orders() == []


def test_mean_reversion_fades_spikes_and_flattens() -> None:
    flat = [10_000, 10_002] * 5
    high = FakeContext(MeanReversionTrader, window=10, entry_z=1.5)
    _feed(MeanReversionTrader(), high, [*flat, 10_040])
    low = FakeContext(MeanReversionTrader, window=10, entry_z=1.5)
    _feed(MeanReversionTrader(), low, [*flat, 9_960])
    assert [a[1] for a in high.new_orders()] == ["sell"]
    assert [a[1] for a in low.new_orders()] == ["buy"]
    back = FakeContext(MeanReversionTrader, window=10, entry_z=1.5, exit_z=0.5)
    back.position = -5
    _feed(MeanReversionTrader(), back, [*flat, 10_001])
    assert [a[1:3] for a in back.new_orders()] == [("buy", 5)]


# --------------------------------------------------------------------------- TWAP


def _run_twap(fill_ratio: float, ticks: int, **params: Any) -> tuple[FakeContext, TWAPExecutor]:
    ctx = FakeContext(TWAPExecutor, **params)
    ctx.best_bid, ctx.best_ask = 9_999, 10_001
    twap = TWAPExecutor()
    twap.on_start(ctx)
    for _ in range(ticks):
        for coid in list(ctx.orders):
            qty = max(1, int(ctx.orders[coid].leaves_qty * fill_ratio))
            twap.on_fill(ctx, ctx.fill(coid, qty))
        ctx.expire_ioc()
        ctx.now += 1_000_000
        twap.on_timer(ctx)
    return ctx, twap


def test_twap_slices_add_up_to_the_parent_over_time() -> None:
    ctx, twap = _run_twap(1.0, 15, side="sell", total_qty=100, duration_s=10.0, slices=8)
    children = ctx.new_orders()
    assert sum(a[2] for a in children) == 100
    assert len(children) == 8
    assert {a[1] for a in children} == {"sell"}
    times = [t for t, _ in twap.children]
    assert times[0] == 1_000_000 and times[-1] - times[0] >= 8_000_000  # spread out
    # Never ahead of schedule: by slice k at most 100 * k / 8 lots.
    done = 0
    for k, (_, qty) in enumerate(twap.children, 1):
        done += qty
        assert done <= 100 * k // 8
    assert twap.done and ctx.position == -100


def test_twap_rolls_unfilled_quantity_forward_without_overshooting() -> None:
    ctx, twap = _run_twap(0.5, 40, total_qty=60, duration_s=10.0, slices=6)
    assert twap.filled == 60 and ctx.position == 60
    assert len(ctx.new_orders()) > 6  # half-filled children needed follow-ups
    assert twap.done


# --------------------------------------------------------------------------- params


def test_params_are_merged_with_defaults_and_type_checked() -> None:
    params = MarketMaker.resolve_params({"size": 3, "skew_per_lot": 1})
    assert params["size"] == 3 and params["skew_per_lot"] == 1.0
    assert params["levels"] == MarketMaker.PARAMS["levels"]
    with pytest.raises(ParamError) as err:
        MarketMaker.resolve_params({"halfspread": 3})
    assert err.value.key == "halfspread" and "unknown parameter" in str(err.value)
    with pytest.raises(ParamError, match="size: expected int, got '3'"):
        MarketMaker.resolve_params({"size": "3"})
    with pytest.raises(ParamError, match="side: must be 'buy' or 'sell'"):
        TWAPExecutor.resolve_params({"side": "hold"})


def test_a_strategy_without_declared_params_takes_any() -> None:
    class Mine(Strategy):
        pass

    assert Mine.resolve_params({"anything": [1, 2]}) == {"anything": [1, 2]}


# --------------------------------------------------------------------------- book


def test_book_replica_applies_snapshot_then_newer_updates_only() -> None:
    book = Book("SIM")
    assert not book.apply_update({"seq": 5, "bids": [[9_999, 1]], "asks": []})
    book.apply_snapshot({"seq": 10, "bids": [[9_999, 5], [9_998, 2]], "asks": [[10_001, 3]]})
    assert (book.best_bid, book.best_ask, book.mid) == (9_999, 10_001, 10_000.0)
    assert not book.apply_update({"seq": 10, "bids": [[9_999, 0]], "asks": []})
    assert book.apply_update({"seq": 11, "bids": [[9_999, 0], [9_997, 4]],
                              "asks": [[10_000, 1]]})
    assert book.depth(5) == Depth([(9_998, 2), (9_997, 4)], [(10_000, 1), (10_001, 3)])
    assert book.depth(1) == Depth([(9_998, 2)], [(10_000, 1)])
