"""A price-time priority limit order book for one instrument.

Layout, chosen for speed in CPython (see ../shared/PERFORMANCE_NOTES.md):
- each side is a ``dict`` of price -> ``PriceLevel`` plus a heap of the level prices
  (bids negated), so the best price is O(1) amortised;
- a level keeps its orders in a list in arrival order. Cancel is O(1) and lazy: the
  order's ``leaves_qty`` drops to 0 and the level total is adjusted at once, and the
  dead entry is dropped when it reaches the head or when the level compacts itself.

Matching lives here too, so the bare book can be benchmarked on its own; what an
execution *means* (events, fees, positions) is the caller's business, told through a
``MatchSink``.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterator
from typing import Any, Final

from mypy_extensions import mypyc_attr

from models import OrderType, Side, StpMode, TimeInForce

_BUY_SIDE: Final = Side.BUY  # a global read is much cheaper than an enum member lookup
_SELL_SIDE: Final = Side.SELL


# Only the compiled build (native_core.py) reads this: an Order refers to no container,
# so the cycle collector need not track the most numerous objects there are.
@mypyc_attr(acyclic=True)
class Order:
    """One order's live state. Mutable: the book and engine update it in place."""

    __slots__ = ("client_order_id", "is_buy", "leaves_qty", "liquidation", "order_id",
                 "order_type", "post_only", "price", "qty", "stop_price", "stp",
                 "symbol", "tif", "trader_id", "ts")

    def __init__(self, order_id: int, trader_id: str, client_order_id: str, symbol: str,
                 side: Side, order_type: OrderType, price: int | None, qty: int,
                 tif: TimeInForce = TimeInForce.GTC, post_only: bool = False,
                 stp: StpMode = StpMode.CANCEL_RESTING, stop_price: int | None = None,
                 ts: int = 0, liquidation: bool = False) -> None:
        self.order_id = order_id
        self.trader_id = trader_id
        self.client_order_id = client_order_id
        self.symbol = symbol
        self.order_type = order_type
        self.price = price  # None only for market orders, which never rest
        self.qty = qty  # current total quantity: filled + leaves
        self.leaves_qty = qty
        self.tif = tif
        self.stp = stp
        self.stop_price = stop_price
        self.ts = ts
        # the flags last: the compiled build lays fields out in the order __init__ first
        # sets them, and three one-byte flags together pad once, not three times. With
        # the side kept only as this flag an order fits the allocator's 128-byte class
        # (it was 160): the most numerous object there is, so the cache holds more
        self.is_buy = side is _BUY_SIDE
        self.post_only = post_only
        self.liquidation = liquidation

    def __getnewargs__(self) -> tuple[Any, ...]:  # see native_core.py
        return (self.order_id, self.trader_id, self.client_order_id, self.symbol, self.side,
                self.order_type, self.price, self.qty)

    @property
    def side(self) -> Side:
        return _BUY_SIDE if self.is_buy else _SELL_SIDE

    @property
    def filled_qty(self) -> int:
        return self.qty - self.leaves_qty

    def requeued(self, price: int | None, qty: int, leaves_qty: int, ts: int) -> Order:
        """A fresh copy for the back of a queue. A new object, because the old one may
        still sit (dead) in a level's queue."""
        order = Order(self.order_id, self.trader_id, self.client_order_id, self.symbol,
                      self.side, self.order_type, price, qty, self.tif, self.post_only,
                      self.stp, self.stop_price, ts, self.liquidation)
        order.leaves_qty = leaves_qty
        return order

    def __repr__(self) -> str:
        return (f"Order(#{self.order_id} {self.trader_id} {self.side.value} "
                f"{self.leaves_qty}/{self.qty} @ {self.price})")


class PriceLevel:
    """One price's orders in arrival order: ``orders[head:]``, dead entries included.

    A list with a moving head rather than a deque: the compiled build (native_core.py)
    appends to and indexes a list natively, where every deque operation is a generic
    method call. The consumed prefix is dropped once it is most of the list, so a
    level's memory stays proportional to its entries at amortised O(1) per pop."""

    __slots__ = ("head", "live_count", "orders", "price", "total_qty")

    def __init__(self, price: int) -> None:
        self.price = price
        self.orders: list[Order] = []
        self.head = 0
        self.total_qty = 0
        self.live_count = 0

    def __getnewargs__(self) -> tuple[Any, ...]:  # see native_core.py
        return (self.price,)

    def entries(self) -> int:
        """Entries from the head on, live and dead."""
        return len(self.orders) - self.head

    def trim(self) -> None:
        """Drop the consumed prefix once it is most of the list (matching moves the head
        and trims once per visit to the level)."""
        head = self.head
        if head > 16 and 2 * head > len(self.orders):
            del self.orders[:head]
            self.head = 0

    def live_orders(self) -> Iterator[Order]:
        # a generator function, not a generator expression: mypyc would build the whole
        # level as a list for the latter, and fill-or-kill stops early
        orders = self.orders
        for i in range(self.head, len(orders)):
            order = orders[i]
            if order.leaves_qty:
                yield order

    def compact(self) -> None:
        """Drop dead entries. Lazy cancels leave them behind; the book compacts a level
        once they outnumber the live ones, which keeps memory proportional to resting
        orders at amortised O(1) per cancel."""
        orders = self.orders
        self.orders = [orders[i] for i in range(self.head, len(orders)) if orders[i].leaves_qty]
        self.head = 0


@mypyc_attr(allow_interpreted_subclasses=True)
class MatchSink:
    """What the book tells its owner while matching. ``level_qty`` is the maker's level
    total after the change (0: the level is gone).

    A base class to subclass, not a Protocol: in the compiled build (native_core.py) the
    book then calls a compiled sink (the engine) directly, with native ints, where a
    Protocol's method is looked up by name and called through its Python wrapper. An
    interpreted subclass (a test's, the benchmark's) still works, through the wrapper."""

    def on_fill(self, maker: Order, taker: Order, price: int, qty: int,
                level_qty: int) -> None:
        raise NotImplementedError

    def on_self_trade_cancel(self, maker: Order, canceled_qty: int, level_qty: int) -> None:
        raise NotImplementedError

    def on_decrement(self, maker: Order, taker: Order, qty: int, level_qty: int) -> None:
        raise NotImplementedError


class BookSide:
    """One side of the book: levels by price, best first via a heap of keys.

    The best level is also kept at hand: while it has live orders nothing can be
    better except a level created since, which replaces it. Once it empties, the next
    ``best_price`` finds the new best through the heap."""

    __slots__ = ("_best", "_heap", "_in_heap", "is_bid", "levels")

    def __init__(self, is_bid: bool) -> None:
        self.is_bid = is_bid
        self.levels: dict[int, PriceLevel] = {}
        self._heap: list[int] = []  # prices, negated for bids so heap[0] is the best
        self._in_heap: set[int] = set()
        self._best: PriceLevel | None = None  # the best level, unless emptied since

    def __getnewargs__(self) -> tuple[Any, ...]:  # see native_core.py
        return (self.is_bid,)

    def best_price(self) -> int | None:
        best = self.best_level()
        return None if best is None else best.price

    def best_level(self) -> PriceLevel | None:
        best = self._best
        if best is not None and best.live_count:
            return best
        heap, levels = self._heap, self.levels
        while heap:
            key = heap[0]
            best = levels.get(-key if self.is_bid else key)
            if best is not None:
                self._best = best
                return best
            heapq.heappop(heap)
            self._in_heap.discard(key)
        self._best = None
        return None

    def level_for_insert(self, price: int) -> PriceLevel:
        level = self.levels.get(price)
        if level is None:
            level = self.levels[price] = PriceLevel(price)
            key = -price if self.is_bid else price
            if key not in self._in_heap:
                self._in_heap.add(key)
                heapq.heappush(self._heap, key)
            best = self._best
            if best is not None and best.live_count and (
                    price > best.price if self.is_bid else price < best.price):
                self._best = level
        return level

    def prices_best_first(self) -> list[int]:
        return sorted(self.levels, reverse=self.is_bid)

    def depth(self, n: int | None = None) -> list[tuple[int, int]]:
        if n is None:
            prices = self.prices_best_first()
        elif self.is_bid:
            prices = heapq.nlargest(n, self.levels)
        else:
            prices = heapq.nsmallest(n, self.levels)
        levels = self.levels
        return [(price, levels[price].total_qty) for price in prices]


class OrderBook:
    """The resting orders of one symbol, and the matching of incoming orders against them.

    ``resting_orders`` indexes them by id. Books may share one index (the engine's do,
    so that it finds any resting order by id alone); a book then holds other symbols'
    orders in it too, and ``remove`` must only be given ids of its own orders."""

    def __init__(self, symbol: str, resting_orders: dict[int, Order] | None = None) -> None:
        self.symbol = symbol
        self.bids = BookSide(is_bid=True)
        self.asks = BookSide(is_bid=False)
        self.resting_orders: dict[int, Order] = {} if resting_orders is None else resting_orders

    # ----------------------------------------------------------------- queries

    def __getnewargs__(self) -> tuple[Any, ...]:  # see native_core.py
        return (self.symbol,)

    def best_bid(self) -> int | None:
        return self.bids.best_price()

    def best_ask(self) -> int | None:
        return self.asks.best_price()

    def depth(self, side: Side, n: int | None = None) -> list[tuple[int, int]]:
        """L2: ``[(price, total_qty)]`` best first, ``n`` levels (all when ``None``)."""
        return (self.bids if side is Side.BUY else self.asks).depth(n)

    def level_qty(self, side: Side, price: int) -> int:
        level = (self.bids if side is Side.BUY else self.asks).levels.get(price)
        return level.total_qty if level else 0

    def iter_orders(self, side: Side) -> Iterator[Order]:
        """L3: live orders best price first, FIFO within each price."""
        book_side = self.bids if side is Side.BUY else self.asks
        for price in book_side.prices_best_first():
            yield from book_side.levels[price].live_orders()

    def would_cross(self, is_buy: bool, price: int | None) -> bool:
        """Would an order at ``price`` (``None``: market) trade on arrival?"""
        if is_buy:
            best = self.asks.best_price()
            return best is not None and (price is None or price >= best)
        best = self.bids.best_price()
        return best is not None and (price is None or price <= best)

    def fillable_qty(self, taker: Order, limit: int | None, wanted: int) -> int:
        """How much of ``wanted`` would fill at once, honouring the taker's STP mode.

        Used for fill-or-kill, before anything is touched; stops counting at ``wanted``.
        """
        book_side = self.asks if taker.is_buy else self.bids
        available = 0
        for price in book_side.prices_best_first():
            if limit is not None and (price > limit if taker.is_buy else price < limit):
                break
            for maker in book_side.levels[price].live_orders():
                if maker.trader_id == taker.trader_id:
                    if taker.stp is StpMode.CANCEL_RESTING:
                        continue
                    return available  # every other mode stops filling here
                available += maker.leaves_qty
                if available >= wanted:
                    return available
        return available

    # ----------------------------------------------------------------- mutations

    def add(self, order: Order) -> int:
        """Rest ``order`` at the back of its price level; returns the level's new total.

        The caller has already matched it: resting a crossing order is a bug.
        """
        side = self.bids if order.is_buy else self.asks
        level = side.levels.get(order.price) or side.level_for_insert(order.price)  # type: ignore[arg-type]
        level.orders.append(order)
        level.live_count += 1
        level.total_qty += order.leaves_qty
        self.resting_orders[order.order_id] = order
        return level.total_qty

    def add_passive(self, order: Order) -> PriceLevel | None:
        """``would_cross`` and ``add`` in one step, for the most common order of all, a
        limit order that does not trade on arrival: rest it and return its level, or
        return ``None`` and change nothing if it would trade.

        Levels, not prices, are compared and returned: in the compiled build an int
        that leaves a native variable becomes a new int object."""
        price: int = order.price  # type: ignore[assignment]  # a limit order has one
        if order.is_buy:
            best = self.asks.best_level()
            if best is not None and price >= best.price:
                return None
            side = self.bids
        else:
            best = self.bids.best_level()
            if best is not None and price <= best.price:
                return None
            side = self.asks
        # a third of passive orders join the best level: that one needs no lookup
        level = side._best
        if level is None or not level.live_count or level.price != price:
            # the key as the order holds it, already an int object
            level = side.levels.get(order.price) or side.level_for_insert(price)  # type: ignore[arg-type]
        level.orders.append(order)
        level.live_count += 1
        level.total_qty += order.leaves_qty
        self.resting_orders[order.order_id] = order
        return level

    def remove(self, order_id: int) -> PriceLevel | None:
        """Take a resting order out of the book in O(1).

        Returns the level it left, or ``None`` if the order is not resting here; see
        ``take_out``."""
        order = self.resting_orders.get(order_id)
        return None if order is None else self.take_out(order)

    def take_out(self, order: Order) -> PriceLevel:
        """Take ``order``, resting in this book, out of it in O(1).

        Returns the level it left (its ``total_qty`` is the level's new total, 0 if the
        level is gone). The order's ``leaves_qty`` becomes 0, which is what marks its
        entry in the level's queue dead: a caller that needs the canceled quantity reads
        it first. (A level rather than a tuple of ints: the compiled build would box each
        int.) ``del``, not ``dict.pop``: the compiled build calls the latter by name, as
        a generic method, at twice the cost.
        """
        del self.resting_orders[order.order_id]
        side = self.bids if order.is_buy else self.asks
        level = side.levels[order.price]  # type: ignore[index]
        canceled = order.leaves_qty
        order.leaves_qty = 0
        level.total_qty -= canceled
        level.live_count -= 1
        if level.live_count == 0:
            del side.levels[order.price]  # type: ignore[arg-type]
        elif len(level.orders) - level.head > 2 * level.live_count + 16:
            level.compact()
        return level

    def reduce(self, order: Order, new_leaves: int) -> int:
        """Lower a resting order's leaves in place, keeping its priority; returns the
        level's new total."""
        level = (self.bids if order.is_buy else self.asks).levels[order.price]  # type: ignore[index]
        level.total_qty -= order.leaves_qty - new_leaves
        order.qty -= order.leaves_qty - new_leaves
        order.leaves_qty = new_leaves
        return level.total_qty

    def match(self, taker: Order, limit: int | None, sink: MatchSink) -> bool:
        """Execute ``taker`` against the opposite side while the price is at or better
        than ``limit`` (``None``: any price). Trades print at the maker's price.

        Returns ``True`` when self-trade prevention stopped the taker (modes
        ``cancel_incoming`` and ``cancel_both``): the caller cancels the remainder.
        """
        is_buy = taker.is_buy
        book_side = self.asks if is_buy else self.bids
        levels = book_side.levels
        resting = self.resting_orders
        while taker.leaves_qty:
            # the level itself, not its price: no lookup by a boxed price to find it
            level = book_side.best_level()
            if level is None:
                return False
            price = level.price
            if limit is not None and (price > limit if is_buy else price < limit):
                return False
            orders = level.orders
            while taker.leaves_qty and level.live_count:
                maker = orders[level.head]
                if not maker.leaves_qty:
                    level.head += 1  # a lazily canceled order reached the head
                    continue
                if maker.trader_id == taker.trader_id:
                    if self._prevent_self_trade(maker, taker, level, sink):
                        if not level.live_count:
                            del levels[price]
                        else:
                            level.trim()
                        return True
                    continue  # the maker is gone, or the taker was decremented to nothing
                qty = maker.leaves_qty if maker.leaves_qty < taker.leaves_qty \
                    else taker.leaves_qty
                maker.leaves_qty -= qty
                taker.leaves_qty -= qty
                level.total_qty -= qty
                if not maker.leaves_qty:
                    level.head += 1
                    level.live_count -= 1
                    del resting[maker.order_id]
                sink.on_fill(maker, taker, price, qty, level.total_qty)
            if not level.live_count:
                del levels[price]
            else:
                level.trim()
        return False

    def _prevent_self_trade(self, maker: Order, taker: Order, level: PriceLevel,
                            sink: MatchSink) -> bool:
        """Apply the taker's STP mode to a maker of the same trader at the level head.
        Returns ``True`` when the taker must stop."""
        mode = taker.stp
        if mode is StpMode.CANCEL_INCOMING:
            return True
        if mode is StpMode.DECREMENT:
            qty = min(maker.leaves_qty, taker.leaves_qty)
            maker.leaves_qty -= qty
            maker.qty -= qty
            taker.leaves_qty -= qty
            taker.qty -= qty
            level.total_qty -= qty
            if not maker.leaves_qty:
                level.head += 1
                level.live_count -= 1
                del self.resting_orders[maker.order_id]
            sink.on_decrement(maker, taker, qty, level.total_qty)
            return False
        # cancel_resting and cancel_both both take the maker out
        canceled = maker.leaves_qty
        level.head += 1
        level.live_count -= 1
        level.total_qty -= canceled
        maker.leaves_qty = 0
        del self.resting_orders[maker.order_id]
        sink.on_self_trade_cancel(maker, canceled, level.total_qty)
        return mode is StpMode.CANCEL_BOTH

    # ----------------------------------------------------------------- checks

    def validate(self) -> None:
        """Assert every invariant of the book; raises ``AssertionError`` naming the first
        broken one. For tests and recovery checks, not the hot path."""
        seen: set[int] = set()
        for book_side in (self.bids, self.asks):
            side = Side.BUY if book_side.is_bid else Side.SELL
            for price, level in book_side.levels.items():
                live = list(level.live_orders())
                assert live, f"{self.symbol} {side} level {price} is empty but kept"
                assert level.live_count == len(live), f"level {price} live_count is off"
                assert level.total_qty == sum(o.leaves_qty for o in live), \
                    f"level {price} total_qty {level.total_qty} != sum of its orders"
                key = -price if book_side.is_bid else price
                assert key in book_side._in_heap, f"level {price} missing from the heap"
                for order in live:
                    assert order.price == price and order.side is side, f"{order} misfiled"
                    assert 0 < order.leaves_qty <= order.qty, f"{order} has bad quantities"
                    assert self.resting_orders.get(order.order_id) is order, \
                        f"{order} not indexed"
                    assert order.order_id not in seen, f"{order} rests twice"
                    seen.add(order.order_id)
            best = book_side._best
            if best is not None and best.live_count:
                top = max(book_side.levels) if book_side.is_bid else min(book_side.levels)
                assert best is book_side.levels[top], f"{side} best level is not {top}"
        indexed = {order_id for order_id, order in self.resting_orders.items()
                   if order.symbol == self.symbol}  # the index may be shared
        assert seen == indexed, "resting_orders index disagrees with levels"
        bid, ask = self.best_bid(), self.best_ask()
        assert bid is None or ask is None or bid < ask, f"book crossed: {bid} >= {ask}"

    def state_tuple(self) -> tuple:
        """A canonical, comparable picture of the book (order of every queue included)."""
        def side_state(side: Side) -> tuple:
            return tuple((o.order_id, o.trader_id, o.client_order_id, o.price, o.qty,
                          o.leaves_qty) for o in self.iter_orders(side))
        return (self.symbol, side_state(Side.BUY), side_state(Side.SELL))

    def state_hash(self) -> str:
        return hashlib.sha256(repr(self.state_tuple()).encode()).hexdigest()
