"""Matching-engine benchmark: one seeded stream, three paths, one process.

The stream (generated up front, never timed) is ~70% passive limit orders from maker
traders near a drifting mid, ~25% cancels of live maker orders, ~5% marketable IOC
orders from taker traders that never rest. It is replayed through:

1. ``reference``: a plain FIFO engine written here (dict of price -> deque, heapq for the
   best price, lazy O(1) cancel), the yardstick of ../shared/PERFORMANCE_NOTES.md;
2. ``bare book``: ``orderbook.OrderBook`` driven directly (add / remove / match);
3. ``full engine``: ``engine.Engine.process`` with pre-built commands, risk checks,
   accounting and margin all on (limits set high enough that nothing is rejected).

All three must agree on trades, traded volume, no-op cancels and the final book, or the
script exits 1. Throughput targets are reported PASS/MISS, never asserted: these
machines drift +-15% between runs, so ratios are taken per round of interleaved runs.

The core is whatever the environment loads: the mypyc-compiled build when it is fresh
(``make native``), else the Python sources; the header says which. To measure the pure
core, or a patched copy of the modules, bypass the compiled one:
``OPENMARKETSIM_CORE=pure PYTHONPATH=/tmp/patched .venv/bin/python bench/bench_engine.py``.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import hashlib
import heapq
import io
import platform
import pstats
import random
import statistics
import sys
import time
import tracemalloc
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

# Appended, not inserted: a PYTHONPATH copy of the modules takes precedence over the repo.
_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.append(_REPO)

import engine as engine_module  # noqa: E402
from config import (  # noqa: E402
    ExchangeConfig,
    InstrumentConfig,
    MarginConfig,
    RiskConfig,
)
from engine import Engine  # noqa: E402
from models import (  # noqa: E402
    CancelOrder,
    CancelRejected,
    Command,
    NewOrder,
    OrderRejected,
    OrderType,
    Side,
    TimeInForce,
    Trade,
)
from orderbook import MatchSink, Order, OrderBook  # noqa: E402

SYMBOL = "SIM"
REFERENCE_PRICE = 10_000  # ticks; also the engine's band centre before the first trade
BAND_BPS = 1_000  # the engine's default 10% band, mirrored so the stream stays inside it
N_MAKERS = 50
N_TAKERS = 10
LIMIT_SHARE = 0.70
CANCEL_SHARE = 0.25  # the rest (5%) is marketable
# A few cancels deliberately name an order that has already filled, so the paths must
# also agree that such a cancel is a no-op.
STALE_CANCEL_SHARE = 0.02
MAKER_MAX_QTY = 100
TAKER_MAX_QTY = 300
MEAN_OFFSET_TICKS = 8.0  # passive orders sit this far behind the mid on average
MAX_THROUGH_TICKS = 3  # marketable orders are priced this far through the touch, at most
DRIFT_TICKS = 0.3  # per-op standard deviation of the mid's random walk
MEAN_REVERSION = 1e-5  # keeps a 1M-op walk near the reference (std ~70 ticks)

LIMIT, IOC, CANCEL = 0, 1, 2
# (kind, order_id, trader_id, client_order_id, side, is_buy, price, qty, tif)
Op = tuple[int, int, str, str, Side, bool, int, int, TimeInForce]

MAKERS = [f"maker{i:02d}" for i in range(N_MAKERS)]
TAKERS = [f"taker{i:02d}" for i in range(N_TAKERS)]


# =========================================================================== reference


class RefLevel:
    __slots__ = ("live", "orders")

    def __init__(self) -> None:
        self.orders: deque[list] = deque()  # [qty, order_id]; qty 0 marks a canceled entry
        self.live = 0


class ReferenceBook:
    """The plain engine the notes measure: no events, no risk, no accounting.

    Orders are ``[qty, order_id, trader_id, is_buy, price]`` lists. A cancel zeroes the
    qty and leaves the entry in its deque until it reaches the head (O(1)); a level is
    dropped once it has no live order, and its heap entry is discarded lazily.
    """

    def __init__(self) -> None:
        self.bids: dict[int, RefLevel] = {}
        self.asks: dict[int, RefLevel] = {}
        self.bid_heap: list[int] = []  # negated prices
        self.ask_heap: list[int] = []
        self.orders: dict[int, list] = {}  # live orders by id
        self.trades = 0
        self.volume = 0
        self.last_price: int | None = None

    def best_bid(self) -> int | None:
        heap, levels = self.bid_heap, self.bids
        while heap:
            price = -heap[0]
            if price in levels:
                return price
            heapq.heappop(heap)
        return None

    def best_ask(self) -> int | None:
        heap, levels = self.ask_heap, self.asks
        while heap:
            price = heap[0]
            if price in levels:
                return price
            heapq.heappop(heap)
        return None

    def submit(self, order_id: int, trader_id: str, is_buy: bool, price: int, qty: int,
               rest: bool) -> None:
        """Match a limit order, then rest what is left if ``rest`` (GTC) or drop it (IOC)."""
        if is_buy:
            levels, best = self.asks, self.best_ask
        else:
            levels, best = self.bids, self.best_bid
        while qty:
            touch = best()
            if touch is None or (touch > price if is_buy else touch < price):
                break
            level = levels[touch]
            queue = level.orders
            while qty and level.live:
                maker = queue[0]
                maker_qty = maker[0]
                if not maker_qty:
                    queue.popleft()
                    continue
                fill = maker_qty if maker_qty < qty else qty
                maker[0] = maker_qty - fill
                qty -= fill
                self.trades += 1
                self.volume += fill
                if maker_qty == fill:
                    queue.popleft()
                    level.live -= 1
                    del self.orders[maker[1]]
            self.last_price = touch
            if not level.live:
                del levels[touch]
        if qty and rest:
            order = [qty, order_id, trader_id, is_buy, price]
            self.orders[order_id] = order
            side = self.bids if is_buy else self.asks
            level = side.get(price)
            if level is None:
                level = side[price] = RefLevel()
                heapq.heappush(self.bid_heap if is_buy else self.ask_heap,
                               -price if is_buy else price)
            level.orders.append(order)
            level.live += 1

    def cancel(self, order_id: int) -> bool:
        """False when the order is not live (filled or canceled already): a no-op."""
        order = self.orders.pop(order_id, None)
        if order is None:
            return False
        side = self.bids if order[3] else self.asks
        price = order[4]
        level = side[price]
        order[0] = 0
        level.live -= 1
        if not level.live:
            del side[price]
        return True

    def depth(self, is_bid: bool) -> list[tuple[int, int]]:
        side = self.bids if is_bid else self.asks
        return [(price, sum(order[0] for order in side[price].orders))
                for price in sorted(side, reverse=is_bid)]


# =========================================================================== workload


@dataclass
class Workload:
    ops: list[Op]
    commands: list[Command]
    limits: int
    iocs: int
    cancels: int
    stale_cancels: int
    expected_trades: int  # what the generator's own simulation saw


def _band(reference: int) -> tuple[int, int]:
    # the engine's check_price_band, so no order in the stream is rejected for the band
    band = reference * BAND_BPS // 10_000
    return reference - band, reference + band


def _new_order_command(op: Op) -> NewOrder:
    _kind, _, trader, cid, side, _, price, qty, tif = op
    return NewOrder(trader, cid, SYMBOL, side, OrderType.LIMIT, qty, price, None, tif)


def generate(n_ops: int, seed: int) -> Workload:
    """The stream, simulated with reference semantics as it is built, so every passive
    order is priced not to cross, every marketable one crosses, and cancels name orders
    the generator knows are live (or, deliberately, already filled)."""
    rng = random.Random(seed)
    sim = ReferenceBook()
    ops: list[Op] = []
    commands: list[Command] = []
    live_ids: list[int] = []  # maybe-live maker orders; filled ones are weeded out lazily
    filled_ids: list[int] = []  # found filled while picking cancels: stale-cancel material
    owner: dict[int, str] = {}
    next_id = 1
    mid = float(REFERENCE_PRICE)
    limits = iocs = cancels = stale = 0
    for _ in range(n_ops):
        mid += MEAN_REVERSION * (REFERENCE_PRICE - mid) + rng.gauss(0.0, DRIFT_TICKS)
        roll = rng.random()
        low, high = _band(sim.last_price or REFERENCE_PRICE)
        if roll >= LIMIT_SHARE and roll < LIMIT_SHARE + CANCEL_SHARE and live_ids:
            order_id = _pick_cancel(rng, sim, live_ids, filled_ids)
            stale += order_id not in sim.orders
            sim.cancel(order_id)
            op: Op = (CANCEL, order_id, owner[order_id], "", Side.BUY, False, 0, 0,
                      TimeInForce.GTC)
            ops.append(op)
            commands.append(CancelOrder(owner[order_id], order_id))
            cancels += 1
            continue
        is_buy = rng.random() < 0.5
        bid, ask = sim.best_bid(), sim.best_ask()
        if roll >= LIMIT_SHARE + CANCEL_SHARE:
            # marketable: through the touch, never past the band; an empty far side
            # leaves it at the mid, where it simply expires
            kind, trader, tif = IOC, TAKERS[rng.randrange(N_TAKERS)], TimeInForce.IOC
            through = rng.randint(0, MAX_THROUGH_TICKS) * (1 if is_buy else -1)
            touch = ask if is_buy else bid
            price = round(mid) if touch is None else touch + through
            price = min(max(price, low), high)
            qty = rng.randint(1, TAKER_MAX_QTY)
            iocs += 1
        else:
            kind, trader, tif = LIMIT, MAKERS[rng.randrange(N_MAKERS)], TimeInForce.GTC
            offset = 1 + int(rng.expovariate(1.0 / MEAN_OFFSET_TICKS))
            if is_buy:
                price = round(mid) - offset
                if ask is not None:
                    price = min(price, ask - 1)
            else:
                price = round(mid) + offset
                if bid is not None:
                    price = max(price, bid + 1)
            price = min(max(price, low), high)
            if (ask is not None and is_buy and price >= ask) or \
                    (bid is not None and not is_buy and price <= bid):
                raise SystemExit(f"generator bug: passive order at {price} would cross "
                                 f"{bid}/{ask}; the band clamp pushed it through")
            qty = rng.randint(1, MAKER_MAX_QTY)
            live_ids.append(next_id)
            owner[next_id] = trader
            limits += 1
        side = Side.BUY if is_buy else Side.SELL
        op = (kind, next_id, trader, str(next_id), side, is_buy, price, qty, tif)
        sim.submit(next_id, trader, is_buy, price, qty, kind == LIMIT)
        ops.append(op)
        commands.append(_new_order_command(op))
        next_id += 1
    return Workload(ops, commands, limits, iocs, cancels, stale, sim.trades)


def _pick_cancel(rng: random.Random, sim: ReferenceBook, live_ids: list[int],
                 filled_ids: list[int]) -> int:
    """A live maker order, chosen uniformly (swap-remove keeps this O(1)); sometimes an
    order that filled in the meantime instead."""
    if filled_ids and rng.random() < STALE_CANCEL_SHARE:
        return filled_ids.pop(rng.randrange(len(filled_ids)))
    while live_ids:
        index = rng.randrange(len(live_ids))
        order_id = live_ids[index]
        live_ids[index] = live_ids[-1]
        live_ids.pop()
        if order_id in sim.orders:
            return order_id
        filled_ids.append(order_id)
    # every tracked order had filled: cancel one of those, a no-op like any stale cancel
    return filled_ids.pop()


def bench_config() -> ExchangeConfig:
    """Every check stays on, with limits this workload never reaches: 50 makers each
    hold thousands of open orders and the book grows to hundreds of thousands."""
    return ExchangeConfig(
        instruments=[InstrumentConfig(symbol=SYMBOL, reference_price=REFERENCE_PRICE,
                                      price_band_pct=BAND_BPS / 100)],
        risk=RiskConfig(max_order_qty=10**6, max_position=10**12, max_open_orders=10**9,
                        rate_limit_per_sec=1e9, rate_limit_burst=10**9),
        margin=MarginConfig(enabled=True, initial_cash=1e12),
    )


# =========================================================================== paths


@dataclass(frozen=True)
class Outcome:
    """What a path must agree on with the others."""

    trades: int
    volume: int
    noop_cancels: int
    rejects: int
    resting: int
    depth_digest: str

    def row(self) -> str:
        return (f"trades {self.trades:>9,}  volume {self.volume:>12,}  "
                f"no-op cancels {self.noop_cancels:>6,}  rejects {self.rejects:>3}  "
                f"resting {self.resting:>8,}  L2 {self.depth_digest}")


def _digest(bids: list[tuple[int, int]], asks: list[tuple[int, int]]) -> str:
    return hashlib.sha256(repr((bids, asks)).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Elapsed:
    """Wall time, and this process's CPU time: on a shared machine the second shows how
    much of the wall time other processes took."""

    wall: float
    cpu: float

    def on(self, clock: str) -> float:
        return self.wall if clock == "wall" else self.cpu


def _clocks() -> Elapsed:
    return Elapsed(time.perf_counter(), time.process_time())


def _since(start: Elapsed) -> Elapsed:
    return Elapsed(time.perf_counter() - start.wall, time.process_time() - start.cpu)


class CountingSink(MatchSink):
    """A MatchSink that only counts, so the bare book can be cross-checked; the
    reference does the same two additions per fill."""

    __slots__ = ("trades", "volume")

    def __init__(self) -> None:
        self.trades = 0
        self.volume = 0

    def on_fill(self, maker: Order, taker: Order, price: int, qty: int,
                level_qty: int) -> None:
        self.trades += 1
        self.volume += qty

    def on_self_trade_cancel(self, maker: Order, canceled_qty: int, level_qty: int) -> None:
        pass

    def on_decrement(self, maker: Order, taker: Order, qty: int, level_qty: int) -> None:
        pass


def run_reference(work: Workload) -> tuple[Elapsed, Outcome]:
    book = ReferenceBook()
    submit, cancel = book.submit, book.cancel
    noop = 0
    start = _clocks()
    for kind, order_id, trader, _cid, _side, is_buy, price, qty, _tif in work.ops:
        if kind == CANCEL:
            if not cancel(order_id):
                noop += 1
        else:
            submit(order_id, trader, is_buy, price, qty, kind == LIMIT)
    elapsed = _since(start)
    return elapsed, Outcome(book.trades, book.volume, noop, 0, len(book.orders),
                            _digest(book.depth(True), book.depth(False)))


def run_book(work: Workload) -> tuple[Elapsed, Outcome]:
    book = OrderBook(SYMBOL)
    sink = CountingSink()
    add, remove, match, would_cross = book.add, book.remove, book.match, book.would_cross
    add_passive = book.add_passive
    limit_type = OrderType.LIMIT
    noop = 0
    start = _clocks()
    for kind, order_id, trader, cid, side, is_buy, price, qty, tif in work.ops:
        if kind == CANCEL:
            if remove(order_id) is None:
                noop += 1
            continue
        order = Order(order_id, trader, cid, SYMBOL, side, limit_type, price, qty, tif)
        if kind == LIMIT and add_passive(order) is not None:
            continue  # rested without trading, as the engine's passive path does
        if would_cross(is_buy, price):
            match(order, price, sink)
        if kind == LIMIT and order.leaves_qty:
            add(order)
    elapsed = _since(start)
    return elapsed, Outcome(sink.trades, sink.volume, noop, 0, len(book.resting_orders),
                            _digest(book.depth(Side.BUY), book.depth(Side.SELL)))


def _engine_outcome(engine: Engine, trades: int, volume: int, noop: int,
                    rejects: int) -> Outcome:
    book = engine.books[SYMBOL]
    return Outcome(trades, volume, noop, rejects, len(book.resting_orders),
                   _digest(book.depth(Side.BUY), book.depth(Side.SELL)))


def check_engine(work: Workload) -> Outcome:
    """An untimed full run that reads every event: the engine's side of the cross-check,
    and its warm-up. Timed runs only read counters, so they pay nothing for this."""
    engine = Engine(bench_config())
    process = engine.process
    trades = volume = noop = rejects = 0
    for ts, command in enumerate(work.commands):
        for event in process(command, ts):
            kind = type(event)
            if kind is Trade:
                trades += 1
                volume += event.qty
            elif kind is OrderRejected:
                rejects += 1
            elif kind is CancelRejected:
                noop += 1
    if trades != engine.next_trade_id - 1:
        raise SystemExit(f"FAIL: {trades} trade events but trade ids reached "
                         f"{engine.next_trade_id - 1}")
    engine.validate()
    return _engine_outcome(engine, trades, volume, noop, rejects)


def make_run_engine(checked: Outcome, n_new: int) -> Callable[[Workload], tuple[Elapsed, Outcome]]:
    def run_engine(work: Workload) -> tuple[Elapsed, Outcome]:
        engine = Engine(bench_config())
        process = engine.process
        start = _clocks()
        for ts, command in enumerate(work.commands):
            process(command, ts)
        elapsed = _since(start)
        # counters instead of events; the checked run supplies what they cannot
        # (volume, no-op cancels), and a deterministic engine must match it
        accepted = engine.next_order_id - 1
        return elapsed, _engine_outcome(engine, engine.next_trade_id - 1, checked.volume,
                                        checked.noop_cancels, n_new - accepted)
    return run_engine


# =========================================================================== memory


def _resting_stream(n_orders: int, seed: int) -> list[Op]:
    """Passive orders only, both sides of the reference price, none crossing."""
    rng = random.Random(seed ^ 0x5EED)
    ops: list[Op] = []
    for order_id in range(1, n_orders + 1):
        is_buy = rng.random() < 0.5
        offset = 1 + min(int(rng.expovariate(1.0 / MEAN_OFFSET_TICKS)), 900)
        price = REFERENCE_PRICE - offset if is_buy else REFERENCE_PRICE + offset
        side = Side.BUY if is_buy else Side.SELL
        ops.append((LIMIT, order_id, MAKERS[rng.randrange(N_MAKERS)], "", side, is_buy,
                    price, rng.randint(1, MAKER_MAX_QTY), TimeInForce.GTC))
    return ops


def _traced(build: Callable[[], object]) -> tuple[int, int, object]:
    gc.collect()
    tracemalloc.start()
    try:
        kept = build()
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return current, peak, kept


def measure_memory(n_orders: int, seed: int) -> list[tuple[str, int, int, int]]:
    """Bytes per resting order (current and peak) for each path. The client_order_id
    strings the engine and the bare book keep are built inside the traced region,
    because a gateway would allocate them per order too; the reference keeps none."""
    ops = _resting_stream(n_orders, seed)

    def build_reference() -> object:
        book = ReferenceBook()
        for _, order_id, trader, _cid, _side, is_buy, price, qty, _tif in ops:
            book.submit(order_id, trader, is_buy, price, qty, True)
        return book

    def build_book() -> object:
        book = OrderBook(SYMBOL)
        for _, order_id, trader, _cid, side, _is_buy, price, qty, tif in ops:
            book.add(Order(order_id, trader, str(order_id), SYMBOL, side, OrderType.LIMIT,
                           price, qty, tif))
        return book

    def build_engine() -> object:
        engine = Engine(bench_config())
        for ts, (_, order_id, trader, _cid, side, _is_buy, price, qty, tif) in enumerate(ops):
            engine.process(NewOrder(trader, str(order_id), SYMBOL, side, OrderType.LIMIT, qty,
                                    price, None, tif), ts)
        return engine

    rows = []
    for name, build, count in (
            ("reference", build_reference, lambda b: len(b.orders)),
            ("bare book", build_book, lambda b: len(b.resting_orders)),
            ("full engine", build_engine, lambda e: len(e.books[SYMBOL].resting_orders))):
        current, peak, kept = _traced(build)
        rows.append((name, count(kept), current, peak))
        del kept
    return rows


# =========================================================================== profile


def profile(work: Workload, target: str, top: int = 25) -> None:
    runners: dict[str, Callable[[Workload], tuple[Elapsed, Outcome]]] = {
        "engine": make_run_engine(check_engine(work), work.limits + work.iocs),
        "book": run_book,
        "reference": run_reference,
    }
    for name in (runners if target == "all" else [target]):
        profiler = cProfile.Profile()
        profiler.enable()
        runners[name](work)
        profiler.disable()
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats(pstats.SortKey.TIME).print_stats(top)
        print(f"\n=== cProfile: {name}, {len(work.ops):,} ops, top {top} by own time ===")
        # pstats opens with a header and the directory preamble; the table is the point
        text = out.getvalue()
        print(text[text.index("   ncalls"):] if "   ncalls" in text else text)


# =========================================================================== main


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report_throughput(runs: dict[str, list[Elapsed]], n_ops: int, clock: str) -> None:
    print(f"\nthroughput, ops/s ({len(runs['reference'])} interleaved rounds; targets "
          f"judged on {clock} time):")
    print(f"  {'path':<12} {'wall best':>11} {'wall median':>12} {'cpu best':>11} "
          f"{'cpu median':>11}  cpu/wall  runs ({clock})")
    busiest = 1.0
    for name, elapsed in runs.items():
        wall = [n_ops / e.wall for e in elapsed]
        cpu = [n_ops / e.cpu for e in elapsed]
        share = sum(e.cpu for e in elapsed) / sum(e.wall for e in elapsed)
        busiest = min(busiest, share)
        shown = wall if clock == "wall" else cpu
        print(f"  {name:<12} {max(wall):>11,.0f} {statistics.median(wall):>12,.0f} "
              f"{max(cpu):>11,.0f} {statistics.median(cpu):>11,.0f}  {share:>7.0%}  "
              f"{', '.join(f'{r:,.0f}' for r in shown)}")
    if busiest < 0.9:
        print(f"  note: a path got only {busiest:.0%} of a core while timed: other work "
              "shared the machine, so wall figures are low; --clock cpu is steadier")


def report_targets(runs: dict[str, list[Elapsed]], n_ops: int, clock: str) -> None:
    def ratio(name: str) -> float:
        # runs of the same round saw the same machine, so their ratio cancels its drift
        return statistics.median(r.on(clock) / x.on(clock)
                                 for r, x in zip(runs["reference"], runs[name], strict=True))

    full_rate = statistics.median(n_ops / e.on(clock) for e in runs["full engine"])
    full_ratio, book_ratio = ratio("full engine"), ratio("bare book")
    print(f"\ntargets ({clock} time; a ratio is the median of same-round ratios):")
    print(f"  full engine >= 500,000 ops/s:       {full_rate:>11,.0f}    "
          f"{_verdict(full_rate >= 500_000)}")
    print(f"  full engine >= 0.5x the reference:  {full_ratio:>11.2f}x   "
          f"{_verdict(full_ratio >= 0.5)}")
    print(f"  bare book >= 1.0x the reference:    {book_ratio:>11.2f}x   "
          f"{_verdict(book_ratio >= 1.0)}")
    print(f"engine: {full_rate:.0f} ops/s")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Replay one seeded order stream through a plain reference engine, "
                    "the bare OrderBook and the full Engine; print throughput, ratios, "
                    "a correctness cross-check and memory per resting order.",
        epilog="Exit status 1 means the three paths disagreed (a correctness bug); a "
               "missed throughput target is only reported. Prefix PYTHONPATH=DIR to "
               "benchmark a patched copy of the modules in DIR.")
    parser.add_argument("--ops", type=int, default=1_000_000,
                        help="operations in the stream (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1,
                        help="random seed of the stream (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed runs per path, interleaved (default: %(default)s)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="what the targets are judged on: wall time, or this process's "
                             "CPU time, steadier when other work shares the cores "
                             "(default: %(default)s)")
    parser.add_argument("--mem-orders", type=int, default=200_000,
                        help="resting orders for the memory measurement; 0 skips it "
                             "(default: %(default)s)")
    parser.add_argument("--profile", nargs="?", const="engine",
                        choices=("engine", "book", "reference", "all"),
                        help="instead of timing, run a path under cProfile and print the "
                             "top 25 functions by own time (default path: engine)")
    args = parser.parse_args(argv)
    if args.ops <= 0 or args.repeat <= 0 or args.mem_orders < 0:
        parser.error("--ops and --repeat must be positive, --mem-orders not negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    core = "compiled (mypyc)" if not engine_module.__file__.endswith(".py") else "pure Python"
    print(f"OpenMarketSim matching benchmark: python {platform.python_version()}, "
          f"{core} core from {Path(engine_module.__file__).parent}")
    start = time.perf_counter()
    work = generate(args.ops, args.seed)
    n_new = work.limits + work.iocs
    print(f"stream: {args.ops:,} ops, seed {args.seed}: {work.limits:,} passive limits, "
          f"{work.cancels:,} cancels ({work.stale_cancels:,} of already-filled orders), "
          f"{work.iocs:,} marketable IOC; {N_MAKERS} makers, {N_TAKERS} takers; "
          f"generated in {time.perf_counter() - start:.1f} s (not timed)")
    # The stream is millions of long-lived objects that are a harness artefact; frozen,
    # the collector stops rescanning them, while every path's own garbage still counts.
    gc.collect()
    gc.freeze()

    if args.profile:
        profile(work, args.profile)
        return 0

    # untimed full runs: the cross-check, and each path's warm-up
    print("\ncross-check (untimed warm-up runs):")
    checked = {"reference": run_reference(work)[1], "bare book": run_book(work)[1],
               "full engine": check_engine(work)}
    for name, outcome in checked.items():
        print(f"  {name:<12} {outcome.row()}")
    if len(set(checked.values())) != 1 or checked["reference"].trades != work.expected_trades:
        print("FAIL: the paths disagree (see above); the figures below would be meaningless")
        return 1
    if checked["full engine"].rejects:
        print(f"FAIL: the engine rejected {checked['full engine'].rejects} orders; the "
              "workload must pass every check")
        return 1
    print("  OK: all three paths agree")

    runners: dict[str, Callable[[Workload], tuple[Elapsed, Outcome]]] = {
        "reference": run_reference,
        "bare book": run_book,
        "full engine": make_run_engine(checked["full engine"], n_new),
    }
    names = list(runners)
    runs: dict[str, list[Elapsed]] = {name: [] for name in names}
    for round_no in range(args.repeat):
        # rotate the order so no path always runs first (or right after the slowest)
        for name in names[round_no % 3:] + names[:round_no % 3]:
            gc.collect()
            elapsed, outcome = runners[name](work)
            if outcome != checked[name]:
                print(f"FAIL: timed run {round_no + 1} of {name} gave {outcome}, "
                      f"the checked run {checked[name]}")
                return 1
            runs[name].append(elapsed)
    report_throughput(runs, args.ops, args.clock)
    report_targets(runs, args.ops, args.clock)

    if args.mem_orders:
        print(f"\nmemory per resting order ({args.mem_orders:,} passive orders, tracemalloc):")
        for name, resting, current, peak in measure_memory(args.mem_orders, args.seed):
            if resting != args.mem_orders:
                print(f"FAIL: {name} holds {resting:,} resting orders, expected "
                      f"{args.mem_orders:,}")
                return 1
            print(f"  {name:<12} current {current / resting:>6.0f} B/order   "
                  f"peak {peak / resting:>6.0f} B/order   "
                  f"({current / 2**20:,.1f} MiB, peak {peak / 2**20:,.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
