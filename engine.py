"""The matching engine: commands in, events out, nothing else.

``Engine.process(command, ts)`` applies one command at time ``ts`` (microseconds, given
by the caller: the engine never reads a clock) and returns the events it produced, in
order. The same commands with the same timestamps always give the same events and the
same ``state_hash()``; nothing here depends on wall time, hash order or randomness.

After a command's own work, the engine settles its consequences before returning:
stop orders whose trigger price printed enter the book one by one, as if just sent,
and traders whose equity fell below maintenance margin are liquidated.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import ChainMap, deque
from typing import Any, Final

from config import ExchangeConfig, InstrumentConfig
from margin_risk_manager import MarginRiskManager, SymbolRates
from models import (
    AmendOrder,
    AmendRejected,
    BookAction,
    BookChanged,
    CancelAll,
    CancelOrder,
    CancelReason,
    CancelRejected,
    Command,
    Event,
    MarketStatusChanged,
    NewOrder,
    OrderAccepted,
    OrderAmended,
    OrderCanceled,
    OrderRejected,
    OrderTriggered,
    OrderType,
    PositionChanged,
    RejectCode,
    SetMarketOpen,
    Side,
    StpMode,
    TimeInForce,
    Trade,
    TraderStatus,
    TraderStatusChanged,
)
from orderbook import MatchSink, Order, OrderBook
from positions import Account, Ledger, PositionReport
from risk_manager import (
    OpenQty,
    Reject,
    RiskManager,
    TraderState,
    band_limit,
    check_price_band,
)

_BUY: Final = 0  # indexes into the [buy, sell] lists validate() builds
_SELL: Final = 1
# Enum members as module constants: on the hot path a global read is several times
# cheaper than the class attribute lookup an enum member costs, and Final lets the
# compiled build (native_core.py) keep them in C statics instead of the module dict.
_BUY_SIDE: Final = Side.BUY
_LIMIT: Final = OrderType.LIMIT
_STOP_LIMIT: Final = OrderType.STOP_LIMIT
_GTC: Final = TimeInForce.GTC
_FOK: Final = TimeInForce.FOK
_OK: Final = TraderStatus.OK
_LIQUIDATING: Final = TraderStatus.LIQUIDATING
_ADD: Final = BookAction.ADD
_CANCEL: Final = BookAction.CANCEL
_EXECUTE: Final = BookAction.EXECUTE
_USER: Final = CancelReason.USER


class StopBook:
    """Stop orders waiting for a trade at or through their stop price, outside the book.

    Heaps keyed so the first to trigger is on top; canceled entries are skipped lazily
    (their ``leaves_qty`` is 0).
    """

    def __init__(self) -> None:
        self.buy_stops: list[tuple[int, int, Order]] = []  # (stop, id): trigger on >= stop
        self.sell_stops: list[tuple[int, int, Order]] = []  # (-stop, id): trigger on <= stop

    def add(self, order: Order) -> None:
        assert order.stop_price is not None
        if order.is_buy:
            heapq.heappush(self.buy_stops, (order.stop_price, order.order_id, order))
        else:
            heapq.heappush(self.sell_stops, (-order.stop_price, order.order_id, order))

    def pop_triggered(self, low: int, high: int) -> list[Order]:
        """Orders whose stop was reached by trades printed between ``low`` and ``high``,
        in trigger order: buy stops then sell stops, each nearest the market first, then
        by arrival."""
        triggered = []
        buys, sells = self.buy_stops, self.sell_stops
        while buys and buys[0][0] <= high:
            order = heapq.heappop(buys)[2]
            if order.leaves_qty:
                triggered.append(order)
        while sells and -sells[0][0] >= low:
            order = heapq.heappop(sells)[2]
            if order.leaves_qty:
                triggered.append(order)
        return triggered

    def live_orders(self) -> list[Order]:
        return sorted((entry[2] for entry in self.buy_stops + self.sell_stops
                       if entry[2].leaves_qty), key=lambda order: order.order_id)


class Market:
    """One symbol's state as the hot path needs it: a command finds its book, whether
    the market is open, the price band and the fee rates with one lookup by symbol
    instead of one per item."""

    __slots__ = ("band_bps", "band_centre", "band_high", "band_low", "book", "edges_centre",
                 "is_open", "maker_rate", "margin_rates", "reference_price", "stops", "symbol",
                 "taker_rate", "tick_value")

    def __init__(self, instrument: InstrumentConfig, maker_ppm: int, taker_ppm: int,
                 resting_orders: dict[int, Order]) -> None:
        self.symbol = symbol = instrument.symbol
        self.book = OrderBook(symbol, resting_orders)  # the index every book shares
        self.stops = StopBook()
        self.is_open = True
        self.band_bps = instrument.band_bps
        self.reference_price = instrument.reference_price  # the configured one
        # the price band's centre: the last trade, else the configured reference
        self.band_centre = instrument.reference_price
        # the band's edges and the centre they were computed for: every limit order is
        # tested against them, and the centre moves only when the market trades
        self.edges_centre = self.band_low = self.band_high = 0
        self.refresh_band_edges()
        # money units per tick x lot x 1e6 of fee: price * qty * rate stays in machine
        # ints under mypyc where price * qty * tick_value * ppm would not
        self.tick_value = tick_value = instrument.tick_value  # money units per tick x lot
        self.maker_rate = tick_value * maker_ppm
        self.taker_rate = tick_value * taker_ppm
        self.margin_rates: SymbolRates | None = None  # the margin's, from its first check

    def __getnewargs__(self) -> tuple[Any, ...]:  # see native_core.py
        return (InstrumentConfig(symbol=self.symbol), 0, 0, {})

    def refresh_band_edges(self) -> None:
        """Recompute the band's edges (as ``check_price_band`` draws them) for the
        current centre."""
        centre = self.edges_centre = self.band_centre
        band = centre * self.band_bps // 10_000
        self.band_low, self.band_high = centre - band, centre + band


class Engine(MatchSink):
    """All instruments, all traders; one command at a time. The books report their
    fills to it as their ``MatchSink``."""

    def __init__(self, config: ExchangeConfig | None = None) -> None:
        self.config = config = config or ExchangeConfig()
        self.symbols = [instrument.symbol for instrument in config.instruments]
        self.maker_ppm = config.fees.maker_ppm
        self.taker_ppm = config.fees.taker_ppm
        # every live order is either resting, indexed by id in the one dict all the books
        # share, or a stop waiting outside the book (and for both, in its trader's
        # live_orders): one index per order, not one more in the engine
        self.resting_orders: dict[int, Order] = {}
        self.stop_orders: dict[int, Order] = {}  # waiting or triggered but not yet run
        self.markets = {i.symbol: Market(i, self.maker_ppm, self.taker_ppm, self.resting_orders)
                        for i in config.instruments}
        # views by symbol for readers outside the hot path (the same objects)
        self.books = {symbol: market.book for symbol, market in self.markets.items()}
        self.stop_books = {symbol: market.stops for symbol, market in self.markets.items()}
        self.tick_values = {i.symbol: i.tick_value for i in config.instruments}
        self.last_prices: dict[str, int | None] = dict.fromkeys(self.symbols)
        self.ledger = Ledger(config.margin.initial_cash_units, self.tick_values)
        self.risk = RiskManager(config.risk)
        self.margin = MarginRiskManager(config.margin, self.ledger)
        self.traders: dict[str, TraderState] = {}
        self.next_order_id = 1
        self.next_trade_id = 1
        self._events: list[Any] = []
        self._ts = 0
        self._triggered: deque[Order] = deque()
        # per symbol to settle, the [low, high] printed since the last settle: a sweep can
        # print through a stop and end beyond it, and the stop must still trigger
        self._moved: dict[str, list[int]] = {}
        # by trader id, the traders being liquidated, and those a fill changed since the
        # last margin check: the checks need the traders themselves, not just their ids
        self._liquidating: dict[str, TraderState] = {}
        self._margin_dirty: dict[str, TraderState] = {}
        # the order being matched: its trader and market, which on_fill needs for every
        # fill, and whether it has filled yet, at which prices (low, high, last): what a
        # match changes beyond the fills themselves is recorded once, after it
        self._taker_trader: TraderState | None = None
        self._taker_market: Market | None = None
        self._taker_filled = False
        self._fill_low = self._fill_high = self._fill_last = 0
        self._all_traded = False  # once every symbol traded, marks() is last_prices itself

    # ================================================================= entry point

    def __getnewargs__(self) -> tuple[Any, ...]:  # see native_core.py
        return (self.config,)

    def process(self, command: Command, ts: int) -> list[Event]:
        """Apply one command at time ``ts``; return the events it caused, in order."""
        events: list[Event] = []
        self._events = events
        self._ts = ts
        # isinstance chains, not a dict of bound methods: in the compiled build each
        # branch is a direct native call, where a bound method goes through its Python
        # wrapper (argument parsing included)
        if isinstance(command, NewOrder):
            self._new_order(command)
        elif isinstance(command, CancelOrder):
            self._cancel(command)
        elif isinstance(command, AmendOrder):
            self._amend(command)
        elif isinstance(command, CancelAll):
            self._cancel_all(command)
        elif isinstance(command, SetMarketOpen):
            self._set_market_open(command)
        else:
            raise TypeError(f"not an engine command: {command!r}")
        # stops trigger only on a print (in _moved), and _settle drains the queue of
        # triggered ones before it returns: between commands that queue is empty, and
        # testing it (a deque: a generic truth test) cost every command
        if self._moved:
            self._settle()
        return events

    # ================================================================= queries

    @property
    def orders(self) -> ChainMap[int, Order]:
        """Every live order by id, resting or a waiting stop (a read-only view)."""
        return ChainMap(self.resting_orders, self.stop_orders)

    def trader(self, trader_id: str) -> TraderState:
        trader = self.traders.get(trader_id)
        if trader is None:
            trader = self.traders[trader_id] = self.risk.new_trader(trader_id)
        return trader

    def mark_price(self, symbol: str) -> int:
        """Last trade; before any trade the mid; with a one-sided book the reference."""
        last = self.last_prices[symbol]
        if last is not None:
            return last
        book = self.books[symbol]
        bid, ask = book.best_bid(), book.best_ask()
        if bid is not None and ask is not None:
            return (bid + ask) // 2
        return self.markets[symbol].reference_price

    def marks(self) -> dict[str, int]:
        """Every symbol's mark. Read-only: once every symbol has traded this is the
        engine's own ``last_prices`` dict, not a copy."""
        if self._all_traded:
            return self.last_prices  # type: ignore[return-value]
        return {symbol: self.mark_price(symbol) for symbol in self.symbols}

    @property
    def market_open(self) -> dict[str, bool]:
        """Whether each symbol trades (a fresh dict: ``SetMarketOpen`` changes it)."""
        return {symbol: market.is_open for symbol, market in self.markets.items()}

    def reference_price(self, symbol: str) -> int:
        """The price band's centre: the last trade, else the configured reference."""
        return self.markets[symbol].band_centre

    def open_orders(self, trader_id: str, symbol: str | None = None) -> list[Order]:
        trader = self.traders.get(trader_id)
        if trader is None:
            return []
        return sorted((o for o in trader.live_orders.values()
                       if symbol is None or o.symbol == symbol), key=lambda o: o.order_id)

    def position_report(self, trader_id: str, symbol: str) -> PositionReport:
        return self.ledger.report(trader_id, symbol, self.marks())

    def trader_status(self, trader_id: str) -> TraderStatus:
        trader = self.traders.get(trader_id)
        return trader.status if trader else TraderStatus.OK

    def margin_used(self, trader_id: str) -> int:
        return self.margin.margin_used(trader_id, self.marks())

    def leaderboard(self) -> list[dict[str, Any]]:
        """Every trader the engine has heard from, best equity first (ties by trader id);
        one that never traded stands at its initial cash."""
        marks = self.marks()
        rows: list[dict[str, Any]] = []
        for trader_id in self.traders:
            account = self.ledger.view(trader_id)
            rows.append({
                "trader_id": trader_id,
                "position": sum(p.qty for p in account.positions.values()),
                "cash": account.cash,
                "realized_pnl": sum(p.realized for p in account.positions.values()),
                "equity": self.ledger.equity(trader_id, marks),
            })
        rows.sort(key=lambda row: (-row["equity"], row["trader_id"]))
        return rows

    # ================================================================= checks

    def validate(self) -> None:
        """Assert the engine's invariants (every book's, and the indexes that tie
        orders, traders and exposure together)."""
        live_ids: set[int] = set()
        for symbol, book in self.books.items():
            book.validate()
            live_ids.update(book.resting_orders)
            stops = self.stop_books[symbol].live_orders()
            live_ids.update(order.order_id for order in stops)
        assert self.resting_orders.keys() | self.stop_orders.keys() == live_ids, \
            "engine order indexes disagree with the books"
        assert not self.resting_orders.keys() & self.stop_orders.keys()
        assert all(self.stop_orders.get(order.order_id) is order
                   for stops in self.stop_books.values()
                   for order in stops.live_orders()), "a stop is not indexed"
        for trader_id, trader in self.traders.items():
            assert trader.account is self.ledger.accounts.get(trader_id), \
                f"{trader_id}'s account is not its ledger account"
            account = trader.account
            assert account is None or account.cash_headroom < 0 or \
                account.cash >= (1 << 62) + account.cash_headroom, \
                f"{trader_id}'s cash headroom overstates its cash"
            exposure: dict[str, list[int]] = {}
            for client_order_id, order in trader.live_orders.items():
                assert order.trader_id == trader_id and order.client_order_id == client_order_id
                assert self.orders.get(order.order_id) is order, f"{order} is not indexed"
                side = exposure.setdefault(order.symbol, [0, 0])
                side[_BUY if order.is_buy else _SELL] += order.leaves_qty
            for symbol, open_qty in trader.exposure.items():
                buy, sell = open_qty.buy, open_qty.sell
                assert [buy, sell] == exposure.get(symbol, [0, 0]), \
                    f"{trader_id} {symbol} exposure {[buy, sell]} != open orders {exposure}"
        assert sum(len(t.live_orders) for t in self.traders.values()) == \
            len(self.resting_orders) + len(self.stop_orders)

    def state_tuple(self) -> tuple:
        traders = tuple(
            (trader_id, t.status.value, t.rate_tokens, t.rate_ts,
             tuple(sorted((s, (q.buy, q.sell)) for s, q in t.exposure.items())))
            for trader_id, t in sorted(self.traders.items()))
        stops = tuple(
            (symbol, tuple((o.order_id, o.trader_id, o.client_order_id, o.side.value,
                            o.order_type.value, o.stop_price, o.price, o.qty, o.leaves_qty)
                           for o in self.stop_books[symbol].live_orders()))
            for symbol in self.symbols)
        return (self.next_order_id, self.next_trade_id,
                tuple(self.books[s].state_tuple() for s in self.symbols), stops,
                tuple(sorted(self.last_prices.items())),
                tuple(sorted(self.market_open.items())),
                self.ledger.state_tuple(), traders)

    def state_hash(self) -> str:
        return hashlib.sha256(repr(self.state_tuple()).encode()).hexdigest()

    # ================================================================= new orders

    def _new_order(self, cmd: NewOrder) -> None:
        # each field read once, into locals
        trader_id, symbol, side, order_type, qty, price, tif = (
            cmd.trader_id, cmd.symbol, cmd.side, cmd.order_type, cmd.qty, cmd.price, cmd.tif)
        trader = self.traders.get(trader_id) or self.trader(trader_id)
        market = self.markets.get(symbol)
        exposure = trader.exposure.get(symbol)  # for the checks and the count, found once
        reject = self._check_new_order(cmd, trader, market, exposure, side is _BUY_SIDE,
                                       order_type, qty, price)
        if reject is not None:
            self._events.append(OrderRejected(self._ts, trader_id, cmd.client_order_id,
                                              reject[0], reject[1]))
            return
        order_id = self.next_order_id
        self.next_order_id = order_id + 1
        stop_price = cmd.stop_price
        order = Order(order_id, trader_id, cmd.client_order_id, symbol, side, order_type, price,
                      qty, tif, cmd.post_only, cmd.stp, stop_price, self._ts)
        self._accept(order, trader, exposure)
        assert market is not None  # checked
        if stop_price is not None:
            # waits for a trade printed after it arrived, even if the last one was through
            market.stops.add(order)
            self.stop_orders[order_id] = order
            return
        book = market.book
        if order_type is _LIMIT and tif is _GTC:
            # the common case, a passive order, goes straight into the book
            level = book.add_passive(order)
            if level is not None:
                self._events.append(BookChanged(symbol, _ADD, order_id, side, price,  # type: ignore[arg-type]
                                                qty, level.total_qty))
                return
        self._execute(order, trader, market)

    def _check_new_order(self, cmd: NewOrder, trader: TraderState, market: Market | None,
                         exposure: OpenQty | None, is_buy: bool, order_type: OrderType,
                         qty: int, price: int | None) -> Reject | None:
        symbol = cmd.symbol
        if market is None:
            return RejectCode.UNKNOWN_SYMBOL, f"unknown symbol {symbol!r}"
        if not market.is_open:
            return RejectCode.MARKET_CLOSED, f"{symbol} is closed for trading"
        if trader.status is not _OK:
            return RejectCode.TRADER_LIQUIDATING, "the trader is being liquidated"
        if cmd.client_order_id in trader.live_orders:
            return (RejectCode.DUPLICATE_CLIENT_ORDER_ID,
                    f"client_order_id {cmd.client_order_id!r} is already live")
        account = trader.account  # serves the position limit and the margin check
        # the position as the trader's open quantity holds it once a fill opened it
        position = exposure.position if exposure is not None else None
        if position is None and account is not None:
            position = account.positions.get(symbol)
        reject = self.risk.check_new_order(
            trader, self._ts, symbol, exposure, is_buy, qty, position.qty if position else 0)
        if reject is not None:
            return reject
        if order_type is _LIMIT and price is not None:  # a limit order has its price
            # the band as check_price_band draws it, from edges cached per centre
            if market.edges_centre != market.band_centre:
                market.refresh_band_edges()
            if price < market.band_low or price > market.band_high:
                # the named rule words the reject; should it ever disagree with the
                # edges, the order still meets every check below rather than skipping them
                reject = check_price_band(price, market.band_centre, market.band_bps)
                if reject is not None:
                    return reject
        margin = self.margin
        if margin.enabled:
            # once every symbol has traded, a mark is its market's band centre, the last
            # trade: no lookup by symbol
            marks = self.marks()
            rates = market.margin_rates
            if rates is None:  # the market's first margin check
                rates = market.margin_rates = margin.rates(symbol)
            reject = margin.check_exposure(
                trader, symbol, is_buy, qty, marks, account, position, exposure,
                market.band_centre if self._all_traded else marks[symbol], rates)
            if reject is not None:
                return reject
        if cmd.post_only and market.book.would_cross(is_buy, price):
            return (RejectCode.POST_ONLY_WOULD_CROSS,
                    f"post-only {cmd.side.value} at {price} would trade on arrival")
        return None

    def _accept(self, order: Order, trader: TraderState, exposure: OpenQty | None) -> None:
        """A new order is live: the trader's, with its open quantity counted (in
        ``exposure``, the trader's in the symbol, ``None`` if it has no entry yet). The
        book indexes the order if it rests, the engine if it is a stop."""
        trader.live_orders[order.client_order_id] = order
        symbol = order.symbol
        if exposure is None:
            exposure = trader.open_qty(symbol)
        exposure.add(order.is_buy, order.qty)
        self._events.append(OrderAccepted(
            self._ts, order.order_id, order.trader_id, order.client_order_id, symbol,
            order.side, order.order_type, order.price, order.stop_price, order.qty, order.tif,
            order.post_only, order.liquidation))

    def _execute(self, order: Order, trader: TraderState, market: Market) -> None:
        """Match an incoming (or re-entering) order of ``trader``'s in ``market``, then
        rest or cancel what is left."""
        book = market.book
        is_buy = order.is_buy
        is_limit = order.order_type is _LIMIT or order.order_type is _STOP_LIMIT
        # market orders trade no further than the band's edge: a thin book cannot fill
        # them at any price, and margin checks have a worst case to count on
        limit = order.price if is_limit else band_limit(is_buy, market.band_centre,
                                                        market.band_bps)
        tif = order.tif
        if tif is _FOK and \
                book.fillable_qty(order, limit, order.leaves_qty) < order.leaves_qty:
            self._cancel_unrested(order, CancelReason.FOK)
            return
        stopped = False
        if book.would_cross(is_buy, limit):
            self._taker_trader, self._taker_market, self._taker_filled = trader, market, False
            stopped = book.match(order, limit, self)
            if self._taker_filled:
                self._after_fills(trader, market)
        if not order.leaves_qty:
            self._forget(order, trader)
        elif stopped:
            self._cancel_unrested(order, CancelReason.SELF_TRADE)
        elif tif is _GTC and is_limit:
            self._events.append(BookChanged(order.symbol, _ADD, order.order_id, order.side,
                                            order.price, order.leaves_qty, book.add(order)))  # type: ignore[arg-type]
        else:
            self._cancel_unrested(order, CancelReason.IOC)

    # ================================================================= match sink

    def on_fill(self, maker: Order, taker: Order, price: int, qty: int, level_qty: int) -> None:
        ts = self._ts
        events = self._events
        symbol = maker.symbol
        market = self._taker_market
        assert market is not None
        trade_id = self.next_trade_id
        self.next_trade_id = trade_id + 1
        ticks = price * qty
        maker_fee = ticks * market.maker_rate // 1_000_000
        taker_fee = ticks * market.taker_rate // 1_000_000
        if taker.is_buy:
            buyer, seller, buy_fee, sell_fee = taker, maker, taker_fee, maker_fee
        else:
            buyer, seller, buy_fee, sell_fee = maker, taker, maker_fee, taker_fee
        events.append(Trade(ts, trade_id, symbol, price, qty, taker.side, buyer.order_id,
                            seller.order_id, buyer.trader_id, seller.trader_id,
                            buyer.client_order_id, seller.client_order_id, buyer.leaves_qty,
                            seller.leaves_qty, buy_fee, sell_fee, taker.liquidation))
        events.append(BookChanged(symbol, _EXECUTE, maker.order_id, maker.side,
                                  price, maker.leaves_qty, level_qty))
        tick_value = market.tick_value
        # the taker's trader is _execute's, marked for a margin check there, once
        maker_trader = self.traders[maker.trader_id]
        self._margin_dirty[maker.trader_id] = maker_trader
        taker_trader = self._taker_trader
        assert taker_trader is not None
        if not self._taker_filled:
            self._taker_filled = True
            self._fill_low = self._fill_high = price
        elif price < self._fill_low:
            self._fill_low = price
        elif price > self._fill_high:
            self._fill_high = price
        self._fill_last = price
        if taker.is_buy:
            self._book_fill(taker, taker_trader, True, price, qty, buy_fee, tick_value)
            self._book_fill(maker, maker_trader, False, price, qty, sell_fee, tick_value)
        else:
            self._book_fill(maker, maker_trader, True, price, qty, buy_fee, tick_value)
            self._book_fill(taker, taker_trader, False, price, qty, sell_fee, tick_value)
        if not maker.leaves_qty:  # the book has taken it out of its index
            del maker_trader.live_orders[maker.client_order_id]

    def _after_fills(self, taker_trader: TraderState, market: Market) -> None:
        """After a match that filled: the taker due a margin check, the last price and
        the band's centre, and the prices printed for the stops to settle."""
        self._margin_dirty[taker_trader.trader_id] = taker_trader
        symbol, price = market.symbol, self._fill_last
        last_prices = self.last_prices
        if not self._all_traded and last_prices[symbol] is None:
            last_prices[symbol] = price
            self._all_traded = None not in last_prices.values()
        last_prices[symbol] = price
        market.band_centre = price
        low, high = self._fill_low, self._fill_high
        printed = self._moved.get(symbol)
        if printed is None:
            self._moved[symbol] = [low, high]
        else:
            if low < printed[0]:
                printed[0] = low
            if high > printed[1]:
                printed[1] = high

    def _book_fill(self, order: Order, trader: TraderState, is_buy: bool, price: int,
                   qty: int, fee: int, tick_value: int) -> None:
        """One side of a fill, ``order`` of ``trader``'s: the ledger, the trader's open
        quantity and the position report."""
        trader_id = order.trader_id
        symbol = order.symbol
        account = trader.account or self._open_account(trader)
        open_qty = trader.exposure[symbol]
        position = open_qty.position
        if position is None:  # the first fill in the symbol: held from here on
            position = open_qty.position = account.position(symbol)
        self.ledger.book_position_fill(account, position, tick_value, is_buy, price, qty, fee)
        open_qty.add(is_buy, -qty)
        self._events.append(PositionChanged(self._ts, trader_id, symbol, position.qty,
                                            position.open_cost, account.cash,
                                            position.realized, position.fees))

    def _open_account(self, trader: TraderState) -> Account:
        """The trader's first fill opens its ledger account."""
        account = trader.account = self.ledger.account(trader.trader_id)
        return account

    def on_self_trade_cancel(self, maker: Order, canceled_qty: int, level_qty: int) -> None:
        self._report_cancel(maker, canceled_qty, CancelReason.SELF_TRADE, level_qty)

    def on_decrement(self, maker: Order, taker: Order, qty: int, level_qty: int) -> None:
        for order in (maker, taker):
            trader = self.traders[order.trader_id]
            trader.exposure[order.symbol].add(order.is_buy, -qty)
        if maker.leaves_qty:
            self._events.append(OrderAmended(self._ts, maker.order_id, maker.trader_id,
                                             maker.client_order_id, maker.symbol, maker.side,
                                             maker.price, maker.qty, maker.leaves_qty, True))
            self._events.append(BookChanged(maker.symbol, BookAction.AMEND, maker.order_id,
                                            maker.side, maker.price, maker.leaves_qty,  # type: ignore[arg-type]
                                            level_qty))
        else:
            self._report_cancel(maker, qty, CancelReason.SELF_TRADE, level_qty, counted=True)
        if taker.leaves_qty:
            self._events.append(OrderAmended(self._ts, taker.order_id, taker.trader_id,
                                             taker.client_order_id, taker.symbol, taker.side,
                                             taker.price, taker.qty, taker.leaves_qty, True))
        else:
            self._events.append(OrderCanceled(self._ts, taker.order_id, taker.trader_id,
                                              taker.client_order_id, taker.symbol, taker.side,
                                              qty, CancelReason.SELF_TRADE))

    # ================================================================= cancels

    def _find_own(self, trader_id: str, order_id: int | None,
                  client_order_id: str | None) -> Order | None:
        """The trader's live order by either id; another trader's looks unknown."""
        # the caller's int object as the key: narrowed to int by the None check, the
        # compiled build would unbox it and box a new one for each lookup
        key: Any = order_id
        if key is not None:
            order = self.resting_orders.get(key) or self.stop_orders.get(key)
            if order is None or order.trader_id != trader_id or (
                    client_order_id is not None and order.client_order_id != client_order_id):
                return None
            return order
        trader = self.traders.get(trader_id)
        return trader.live_orders.get(client_order_id) if trader else None  # type: ignore[arg-type]

    def _cancel(self, cmd: CancelOrder) -> None:
        order = self._find_own(cmd.trader_id, cmd.order_id, cmd.client_order_id)
        if order is None:
            self._events.append(CancelRejected(self._ts, cmd.trader_id, cmd.order_id,
                                               cmd.client_order_id, RejectCode.UNKNOWN_ORDER,
                                               "no such live order for this trader"))
            return
        self._cancel_live(order, _USER)

    def _cancel_all(self, cmd: CancelAll) -> None:
        if cmd.symbol is not None and cmd.symbol not in self.books:
            self._events.append(CancelRejected(self._ts, cmd.trader_id, None, None,
                                               RejectCode.UNKNOWN_SYMBOL,
                                               f"unknown symbol {cmd.symbol!r}"))
            return
        for order in self.open_orders(cmd.trader_id, cmd.symbol):
            self._cancel_live(order, cmd.reason)

    def _cancel_live(self, order: Order, reason: CancelReason) -> None:
        """Cancel a live order wherever it is: resting in the book or a waiting stop."""
        stop_orders = self.stop_orders
        if stop_orders and order.order_id in stop_orders:  # a stop waiting outside the book
            del stop_orders[order.order_id]
            self._cancel_unrested(order, reason)
            return
        canceled = order.leaves_qty
        level = self.markets[order.symbol].book.take_out(order)
        self._report_cancel(order, canceled, reason, level.total_qty)

    def _report_cancel(self, order: Order, canceled_qty: int, reason: CancelReason,
                       level_qty: int, counted: bool = False) -> None:
        """Events and bookkeeping for a resting order the book has already taken out."""
        trader = self.traders[order.trader_id]
        if not counted:
            trader.exposure[order.symbol].add(order.is_buy, -canceled_qty)
        order_id, symbol, side = order.order_id, order.symbol, order.side
        self._events.append(OrderCanceled(self._ts, order_id, order.trader_id,
                                          order.client_order_id, symbol, side,
                                          canceled_qty, reason))
        self._events.append(BookChanged(symbol, _CANCEL, order_id, side, order.price, 0,  # type: ignore[arg-type]
                                        level_qty))
        del trader.live_orders[order.client_order_id]

    def _cancel_unrested(self, order: Order, reason: CancelReason) -> None:
        """Cancel the remainder of an order that is in no index but its trader's: an
        incoming order that trades no further, or a stop already taken out of
        ``stop_orders``."""
        canceled = order.leaves_qty
        order.leaves_qty = 0
        trader = self.traders[order.trader_id]
        trader.exposure[order.symbol].add(order.is_buy, -canceled)
        self._events.append(OrderCanceled(self._ts, order.order_id, order.trader_id,
                                          order.client_order_id, order.symbol, order.side,
                                          canceled, reason))
        self._forget(order, trader)

    def _forget(self, order: Order, trader: TraderState) -> None:
        """An order of ``trader``'s that is in no index but the trader's is no longer
        live."""
        del trader.live_orders[order.client_order_id]

    # ================================================================= amends

    def _amend(self, cmd: AmendOrder) -> None:
        order = self._find_own(cmd.trader_id, cmd.order_id, cmd.client_order_id)
        reject = self._check_amend(cmd, order)
        if reject is not None:
            self._events.append(AmendRejected(self._ts, cmd.trader_id, cmd.order_id,
                                              cmd.client_order_id, reject[0], reject[1]))
            return
        assert order is not None
        new_price = order.price if cmd.price is None else cmd.price
        new_qty = order.qty if cmd.qty is None else cmd.qty
        new_leaves = new_qty - order.filled_qty
        added = new_leaves - order.leaves_qty
        trader = self.traders[order.trader_id]
        trader.exposure[order.symbol].add(order.is_buy, added)
        book = self.books[order.symbol]
        keeps_priority = new_price == order.price and added <= 0
        if order.order_id not in book.resting_orders:  # a waiting stop: no queue to keep
            order.price, order.qty, order.leaves_qty = new_price, new_qty, new_leaves
            self._report_amend(order, keeps_priority)
        elif keeps_priority:
            level_qty = book.reduce(order, new_leaves)
            self._report_amend(order, True)
            self._events.append(BookChanged(order.symbol, BookAction.AMEND, order.order_id,
                                            order.side, order.price, new_leaves, level_qty))  # type: ignore[arg-type]
        else:
            level_qty = book.take_out(order).total_qty
            requeued = order.requeued(new_price, new_qty, new_leaves, self._ts)
            trader.live_orders[order.client_order_id] = requeued
            self._report_amend(requeued, False)
            self._events.append(BookChanged(order.symbol, BookAction.CANCEL, order.order_id,
                                            order.side, order.price, 0, level_qty))  # type: ignore[arg-type]
            self._execute(requeued, trader, self.markets[order.symbol])

    def _check_amend(self, cmd: AmendOrder, order: Order | None) -> Reject | None:
        if order is None:
            return RejectCode.UNKNOWN_ORDER, "no such live order for this trader"
        symbol = order.symbol
        market = self.markets[symbol]
        if not market.is_open:
            return RejectCode.MARKET_CLOSED, f"{symbol} is closed for trading"
        if cmd.price is not None and order.price is None:
            return RejectCode.INVALID_FIELD, "'price' cannot be set on a stop (market) order"
        trader = self.traders[order.trader_id]
        reject = self.risk.take_rate_token(trader, self._ts)
        if reject is not None:
            return reject
        new_qty = order.qty if cmd.qty is None else cmd.qty
        if new_qty <= order.filled_qty:
            return (RejectCode.INVALID_FIELD,
                    f"'qty' {new_qty} must exceed the filled quantity {order.filled_qty}")
        added = new_qty - order.filled_qty - order.leaves_qty
        account = trader.account  # serves the position limit and the margin check
        position = account.positions.get(symbol) if account is not None else None
        reject = self.risk.check_order(trader, symbol, order.is_buy, new_qty, max(added, 0),
                                       position.qty if position else 0, 0)
        if reject is not None:
            return reject
        is_resting = order.order_id in market.book.resting_orders
        if cmd.price is not None and cmd.price != order.price and is_resting:
            reject = check_price_band(cmd.price, market.band_centre, market.band_bps)
            if reject is not None:
                return reject
            if order.post_only and market.book.would_cross(order.is_buy, cmd.price):
                return (RejectCode.POST_ONLY_WOULD_CROSS,
                        f"post-only order amended to {cmd.price} would trade")
        if added > 0 and self.margin.enabled:
            return self.margin.check_order(trader, symbol, order.is_buy, added, self.marks(),
                                           account, position)
        return None

    def _report_amend(self, order: Order, priority_kept: bool) -> None:
        self._events.append(OrderAmended(self._ts, order.order_id, order.trader_id,
                                         order.client_order_id, order.symbol, order.side,
                                         order.price, order.qty, order.leaves_qty,
                                         priority_kept))

    # ================================================================= market state

    def _set_market_open(self, cmd: SetMarketOpen) -> None:
        symbols = self.symbols if cmd.symbol is None else [cmd.symbol]
        for symbol in symbols:
            market = self.markets.get(symbol)
            if market is not None and market.is_open != cmd.is_open:
                market.is_open = cmd.is_open
                self._events.append(MarketStatusChanged(self._ts, symbol, cmd.is_open))

    # ================================================================= settling

    def _settle(self) -> None:
        """Run what the command set off: triggered stops, one at a time as if just sent,
        then margin checks where a price moved, until nothing more happens."""
        margin_due: dict[str, None] = {}
        while self._moved or self._triggered or margin_due:
            if self._triggered:
                self._run_triggered(self._triggered.popleft())
            elif self._moved:
                for symbol, (low, high) in self._moved.items():
                    triggered = self.stop_books[symbol].pop_triggered(low, high)
                    if triggered:  # rare: spares the deque's generic method call
                        self._triggered.extend(triggered)
                    margin_due[symbol] = None
                self._moved.clear()
            else:
                if self.margin.enabled:
                    self._check_margins(margin_due)
                margin_due.clear()

    def _run_triggered(self, order: Order) -> None:
        if not order.leaves_qty:
            return  # canceled while queued behind another trigger
        del self.stop_orders[order.order_id]  # from here on, an incoming order
        self._events.append(OrderTriggered(self._ts, order.order_id, order.trader_id,
                                           order.client_order_id, order.symbol))
        market = self.markets[order.symbol]
        if order.order_type is OrderType.STOP_LIMIT and check_price_band(
                order.price, market.band_centre, market.band_bps):  # type: ignore[arg-type]
            self._cancel_unrested(order, CancelReason.RISK)
            return
        self._execute(order, self.traders[order.trader_id], market)

    def _check_margins(self, moved: dict[str, None]) -> None:
        """Check the traders a price move or a fill may have put below maintenance: those
        whose safe band the new mark left, those whose account changed, and those still
        being liquidated. The outcome is that of checking them in trader-id order, so it
        never depends on history."""
        marks = self.marks()
        candidates = self._margin_dirty
        self._margin_dirty = {}
        candidates.update(self._liquidating)
        traders, margin = self.traders, self.margin
        watch = margin.watch
        for symbol in moved:
            for trader_id in watch.pop_outside(symbol, marks[symbol]):
                candidates[trader_id] = traders[trader_id]
        # a check that passes changes nothing but the trader's arming, which its next
        # check redoes: until one fails, the order cannot matter, so the trader-id order
        # (sorting costs more than a check) is only needed from a failure on, and then
        # the checks are run again in it
        if not self._liquidating:
            for candidate in candidates.values():
                if margin.in_breach(candidate, marks):
                    break
            else:
                return
        for trader_id in sorted(candidates):
            trader = candidates[trader_id]
            if trader.status is _LIQUIDATING:
                self._flatten(trader)
            elif margin.in_breach(trader, marks):
                self._liquidate(trader)

    def _liquidate(self, trader: TraderState) -> None:
        self._set_status(trader, TraderStatus.MARGIN_CALL)
        for order in self.open_orders(trader.trader_id):
            self._cancel_live(order, CancelReason.LIQUIDATION)
        self._set_status(trader, TraderStatus.LIQUIDATING)
        self._liquidating[trader.trader_id] = trader
        self._flatten(trader)

    def _flatten(self, trader: TraderState) -> None:
        """Send IOC market orders against the book for every open position; if the book
        cannot take them all, the rest waits for the next price move."""
        account = self.ledger.view(trader.trader_id)
        for symbol in sorted(account.positions):
            held = account.positions[symbol].qty
            if not held or not self.markets[symbol].is_open:
                continue  # a closed market trades nothing, liquidations included
            order = Order(self.next_order_id, trader.trader_id, f"~liq-{self.next_order_id}",
                          symbol, Side.SELL if held > 0 else Side.BUY, OrderType.MARKET, None,
                          abs(held), TimeInForce.IOC, False, StpMode.CANCEL_RESTING, None,
                          self._ts, liquidation=True)
            self.next_order_id += 1
            self._accept(order, trader, trader.exposure.get(symbol))
            self._execute(order, trader, self.markets[symbol])
        if not any(p.qty for p in account.positions.values()):
            self._liquidating.pop(trader.trader_id, None)
            self._set_status(trader, TraderStatus.OK)

    def _set_status(self, trader: TraderState, status: TraderStatus) -> None:
        trader.status = status
        self._events.append(TraderStatusChanged(self._ts, trader.trader_id, status))
