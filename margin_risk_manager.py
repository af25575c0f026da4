"""Margin: initial margin for new exposure, maintenance margin for holding it.

- Initial: the worst case over each symbol (every open buy filling, or every open sell)
  valued at the mark, times ``initial_margin_pct``, must not exceed equity once the new
  order is counted.
- Maintenance: when equity falls below ``maintenance_margin_pct`` of the open
  positions' value at the mark, the engine liquidates the trader.

Checking every holder after every trade would cost O(traders) per trade. Instead a
trader that passes a check gets a *safe band* per held symbol: the marks within which
its slack (equity minus maintenance) cannot be used up. ``MarginWatch`` keeps the bands
with a per-symbol bound on them, so a trade re-checks only the traders whose band it
left (and the engine adds those whose account a fill changed).
"""

from __future__ import annotations

from typing import Any, Final

from config import MONEY_SCALE, MarginConfig
from models import RejectCode
from positions import Account, Ledger, Position, cash_headroom
from risk_manager import OpenQty, Reject, TraderState

# A machine int in the compiled build is below 2**62; a cash balance at realistic scales
# (1e12 currency is 1e20 units) is not, and so exceeds any such amount
_MACHINE_INT_MAX: Final = (1 << 62) - 1
# What a cash beyond machine ints, less a slack beyond the cash no lower than minus this,
# leaves at least (see band_reach)
_SPARE_FLOOR: Final = 1 << 61


def exceeds(amount: int, cash: int, headroom: int) -> bool:
    """``amount > cash``, for a cash of ``headroom`` (``positions.cash_headroom``, or an
    account's). Compared as is, a machine-int amount and a bignum cash make the compiled
    build box the amount into a new int object first, and comparing the cash with a
    bignum constant costs nearly as much; a headroom of 0 or more, a cash beyond machine
    ints, decides the common case in machine ints."""
    if headroom >= 0 and amount <= _MACHINE_INT_MAX:
        return False
    return amount > cash


def band_reach(cash: int, headroom: int, spare_beyond_cash: int, per_tick_cost: int) -> int:
    """The ticks a safe band reaches either side of the mark: never more than
    ``max(spare, 0) * 10_000 // per_tick_cost``, where ``spare = cash +
    spare_beyond_cash`` is at least -1, and exactly that while the cash is a machine int.

    A band narrower than the slack allows changes no outcome: the watch re-checks the
    trader sooner, a trader inside any band of its slack cannot be in breach, and the
    engine checks candidates in trader-id order. So a cash beyond machine ints, where
    the exact reach would cost bignum divisions on every check, counts as a spare of
    just ``2**61`` (it is at least that while ``spare_beyond_cash >= -2**61``): still
    millions of ticks at any realistic position, in machine ints. ``per_tick_cost``
    includes the factor ``10_000 + maintenance_bps``, so the result stays below 2**61.
    ``headroom`` is the cash's (see ``exceeds``)."""
    if headroom >= 0 and spare_beyond_cash >= -_SPARE_FLOOR:
        return _SPARE_FLOOR // per_tick_cost * 10_000
    # the cash divided alone, so that no product outgrows machine ints:
    # (q * d + r + s) * 10_000 // d == q * 10_000 + (r + s) * 10_000 // d
    whole, rest = divmod(cash, per_tick_cost)
    reach = whole * 10_000 + (rest + spare_beyond_cash) * 10_000 // per_tick_cost
    return reach if reach > 0 else 0  # a spare of -1 or 0 leaves no reach


def symbol_margin(held: int, open_buy: int, open_sell: int, mark: int,
                  rates: SymbolRates) -> tuple[int, int]:
    """One symbol's share of the initial margin check: the position ``held`` valued at
    ``mark``, and the worst case (every open buy filling, or every open sell) valued
    there times ``initial_bps``. (A tuple of ints is a C struct in the compiled build,
    not an object.)"""
    if held > 0:
        value = held * mark * rates.tick_value
    elif held < 0:
        value = -(-held * mark * rates.tick_value)
    else:
        value = 0
    long_worst, short_worst = held + open_buy, open_sell - held  # neither below 0
    return value, (long_worst if long_worst > short_worst else short_worst) * mark \
        * rates.initial


class SymbolRates:
    """One symbol's factors in the margin sums, found with one lookup: money units per
    lot and tick, and that times the initial and the maintenance bps."""

    __slots__ = ("initial", "maintenance", "tick_value")

    def __init__(self, tick_value: int, initial_bps: int, maintenance_bps: int) -> None:
        self.tick_value = tick_value
        self.initial = tick_value * initial_bps
        self.maintenance = tick_value * maintenance_bps

    def __getnewargs__(self) -> tuple[Any, ...]:  # see native_core.py
        return (self.tick_value, 0, 0)


class MarginRiskManager:
    def __init__(self, config: MarginConfig, ledger: Ledger) -> None:
        self.enabled = config.enabled
        self.initial_bps = config.initial_bps
        self.maintenance_bps = config.maintenance_bps
        self.ledger = ledger
        self.initial_headroom = cash_headroom(ledger.initial_cash)  # before a first fill
        self.watch = MarginWatch()
        # per symbol, tick value x bps: with the sign kept out of products (see
        # positions.book_fill) the checks below stay in machine ints under mypyc, and the
        # trader's cash, a bignum at realistic scales, only meets them in one comparison
        self._rates = {symbol: SymbolRates(tick_value, self.initial_bps, self.maintenance_bps)
                       for symbol, tick_value in ledger.tick_values.items()}

    def __getnewargs__(self) -> tuple[Any, ...]:  # see native_core.py
        return (MarginConfig(), self.ledger)

    def rates(self, symbol: str) -> SymbolRates:
        """``symbol``'s factors in the margin sums (the engine keeps them on its market)."""
        return self._rates[symbol]

    def check_order(self, trader: TraderState, symbol: str, is_buy: bool, added_qty: int,
                    marks: dict[str, int], account: Account | None,
                    position_in_symbol: Position | None) -> Reject | None:
        """Would the trader's worst case, with ``added_qty`` more open on one side of
        ``symbol``, need more initial margin than its equity? ``account`` is the trader's
        ledger account (``None`` before its first fill) and ``position_in_symbol`` its
        position in ``symbol`` (``None``: none yet), both looked up once by the caller."""
        if not self.enabled or added_qty <= 0:
            return None
        return self.check_exposure(trader, symbol, is_buy, added_qty, marks, account,
                                   position_in_symbol, trader.exposure.get(symbol),
                                   marks[symbol], self._rates[symbol])

    def check_exposure(self, trader: TraderState, symbol: str, is_buy: bool,
                       added_qty: int, marks: dict[str, int], account: Account | None,
                       position_in_symbol: Position | None, open_in_symbol: OpenQty | None,
                       mark: int, rates: SymbolRates) -> Reject | None:
        """``check_order`` for a caller that also holds the trader's open quantity in
        ``symbol`` (``None``: no entry yet), its mark and its rates: a trader ordering in
        one symbol only, the common case, then costs no lookup by symbol at all."""
        if not self.enabled or added_qty <= 0:
            return None
        if account is None:
            positions: dict[str, Position] = {}
            cash, headroom = self.ledger.initial_cash, self.initial_headroom
        else:
            positions, cash, headroom = account.positions, account.cash, account.cash_headroom
        open_buy, open_sell = (0, 0) if open_in_symbol is None else (
            open_in_symbol.buy, open_in_symbol.sell)
        if is_buy:
            open_buy += added_qty
        else:
            open_sell += added_qty
        held = position_in_symbol.qty if position_in_symbol is not None else 0
        # the positions valued at the marks, and the worst-case value times initial_bps
        held_value, worst_margin = symbol_margin(held, open_buy, open_sell, mark, rates)
        # exposure has an entry for every symbol the trader ever ordered in, so for every
        # symbol it can hold: those besides ``symbol`` cover the rest of the account
        exposure = trader.exposure
        if len(exposure) > (0 if open_in_symbol is None else 1):
            all_rates = self._rates
            for sym, open_qty in exposure.items():
                if sym != symbol:
                    position = positions.get(sym)
                    value, margin = symbol_margin(
                        position.qty if position is not None else 0, open_qty.buy,
                        open_qty.sell, marks[sym], all_rates[sym])
                    held_value += value
                    worst_margin += margin
        required = worst_margin // 10_000
        # more than the equity, cash + held_value
        if exceeds(required - held_value, cash, headroom):
            return (RejectCode.RISK_INSUFFICIENT_MARGIN,
                    f"initial margin {required / MONEY_SCALE:.2f} would exceed equity "
                    f"{(cash + held_value) / MONEY_SCALE:.2f}")
        return None

    def margin_used(self, trader_id: str, marks: dict[str, int]) -> int:
        """Initial margin tied up by the open positions alone."""
        account = self.ledger.view(trader_id)
        tick_values = self.ledger.tick_values
        notional = sum(abs(p.qty) * marks[symbol] * tick_values[symbol]
                       for symbol, p in account.positions.items() if p.qty)
        return notional * self.initial_bps // 10_000

    def in_breach(self, trader: TraderState, marks: dict[str, int]) -> bool:
        """Equity below maintenance margin: the trader must be liquidated.

        A trader that passes is armed in ``watch`` with bands that split its slack over
        its positions: a one-tick move changes equity by at most the position's tick
        value and maintenance by ``maintenance_bps`` of that, plus 1 for rounding.
        """
        # a trader that passes with positions is re-armed, which replaces its arming;
        # every other outcome disarms it
        watch = self.watch
        trader_id = trader.trader_id
        account = trader.account if self.enabled else None  # its ledger account
        if account is None:
            watch.disarm(trader_id)
            return False
        all_rates = self._rates
        held_value = 0  # the positions valued at the marks
        maintenance = 0  # their notional times maintenance_bps
        held = 0
        # the last held position's symbol, mark, size and tick value: an account holding
        # one, the common case, is armed from them without a second pass
        held_symbol, held_mark, held_size, held_tick_value = "", 0, 0, 0
        positions = account.positions
        for symbol, position in positions.items():
            qty = position.qty
            if qty:
                mark = marks[symbol]
                rates = all_rates[symbol]
                size = qty if qty > 0 else -qty
                tick_value = rates.tick_value
                if qty > 0:
                    held_value += size * mark * tick_value
                else:
                    held_value -= size * mark * tick_value
                maintenance += size * mark * rates.maintenance
                held += 1
                held_symbol, held_mark, held_size, held_tick_value = \
                    symbol, mark, size, tick_value
        maintenance //= 10_000
        # the slack, equity - maintenance, is cash + slack_beyond_cash: the cash, a bignum
        # at realistic scales, is kept out of every sum
        slack_beyond_cash = held_value - maintenance
        cash, headroom = account.cash, account.cash_headroom
        if exceeds(-slack_beyond_cash, cash, headroom):  # the slack is negative
            watch.disarm(trader_id)
            return True
        if not held:
            watch.disarm(trader_id)
        else:
            divisor = held * (10_000 + self.maintenance_bps)
            armed = trader.arming
            if armed is None:  # its first arming: kept on the trader from here on
                armed = trader.arming = watch.begin_arming(trader_id)
            else:
                watch.arm_again(armed)
            if held == 1:
                reach = band_reach(cash, headroom, slack_beyond_cash - 1,
                                   divisor * (held_size * held_tick_value))
                watch.add_band(held_symbol, trader_id, held_mark - reach, held_mark + reach,
                               armed)
                return False
            for symbol, position in positions.items():
                qty = position.qty
                if qty:
                    mark = marks[symbol]
                    per_tick = (qty if qty > 0 else -qty) * all_rates[symbol].tick_value
                    reach = band_reach(cash, headroom, slack_beyond_cash - 1,
                                       divisor * per_tick)
                    watch.add_band(symbol, trader_id, mark - reach, mark + reach, armed)
        return False


# Bounds of a symbol's bands before any is armed: every mark lies between them
_NO_FLOOR: Final = -(1 << 62)
_NO_CEILING: Final = (1 << 62) - 1


class Arming:
    """A trader's current arming number in the watch, 0 while it is disarmed: one
    object per trader, updated in place, so that re-arming writes an attribute rather
    than a new int into a dict. It also holds the band it last armed, which re-arming
    a trader that holds one symbol, the common case, updates without a lookup."""

    __slots__ = ("last_band", "number")

    def __init__(self) -> None:
        self.number = 0
        self.last_band: Band | None = None


class Band:
    """One trader's safe band in one symbol, from its arming number ``arming``; it is
    current while that is still ``armed.number``."""

    __slots__ = ("armed", "arming", "high", "listed", "low", "symbol", "symbol_bands")

    def __init__(self, low: int, high: int, armed: Arming, arming: int, symbol: str,
                 symbol_bands: SymbolBands) -> None:
        self.low = low
        self.high = high
        self.armed = armed
        self.arming = arming
        self.symbol = symbol
        self.symbol_bands = symbol_bands  # its symbol's, which lists it while ``listed``
        self.listed = True

    def __getnewargs__(self) -> tuple[Any, ...]:  # see native_core.py
        # a placeholder for the symbol's bands, which list this band: no cycle to pickle
        return (self.low, self.high, self.armed, self.arming, self.symbol, SymbolBands())


class SymbolBands:
    """The traders' bands in one symbol, and a bound on them all: no band excludes a
    mark between ``floor`` (at least the highest low edge) and ``ceiling`` (at most the
    lowest high edge). The bound may be stale on the safe side (too narrow) after a
    re-arming or disarming; the next scan makes it exact."""

    __slots__ = ("ceiling", "entries", "floor")

    def __init__(self) -> None:
        self.entries: dict[str, Band] = {}  # by trader
        self.floor = _NO_FLOOR
        self.ceiling = _NO_CEILING


class MarginWatch:
    """Safe mark bands per trader and symbol.

    A trader is safe while every mark stays inside its band. Most marks move within
    every band, which the per-symbol bound answers in O(1); a mark past the bound scans
    that symbol's bands. Re-arming a trader replaces its entries; disarming it leaves
    them behind, skipped and dropped by the next scan, as they carry an arming number
    that is no longer the trader's.
    """

    def __init__(self) -> None:
        self._bands: dict[str, SymbolBands] = {}
        self._armed: dict[str, Arming] = {}  # trader -> its arming, once ever armed
        self._armings = 0

    def arm(self, trader_id: str, bands: list[tuple[str, int, int]]) -> None:
        """Arm ``trader_id`` with ``(symbol, low edge, high edge)`` bands."""
        armed = self.begin_arming(trader_id)
        for symbol, low, high in bands:
            self.add_band(symbol, trader_id, low, high, armed)

    def begin_arming(self, trader_id: str) -> Arming:
        """A new arming of ``trader_id``; its bands follow through ``add_band``."""
        armed = self._armed.get(trader_id)
        if armed is None:
            armed = self._armed[trader_id] = Arming()
        self._armings += 1
        armed.number = self._armings
        return armed

    def arm_again(self, armed: Arming) -> None:
        """``begin_arming`` for a caller that holds the trader's ``Arming``."""
        self._armings += 1
        armed.number = self._armings

    def add_band(self, symbol: str, trader_id: str, low: int, high: int,
                 armed: Arming) -> None:
        band = armed.last_band
        if band is not None and band.listed and band.symbol == symbol:
            symbol_bands = band.symbol_bands  # the entry found without a lookup
            band.low, band.high, band.arming = low, high, armed.number
        else:
            symbol_bands = self._symbol_bands(symbol)
            band = symbol_bands.entries.get(trader_id)
            if band is None:
                band = symbol_bands.entries[trader_id] = Band(low, high, armed, armed.number,
                                                              symbol, symbol_bands)
            else:  # re-armed: the one entry per trader and symbol is updated in place
                band.low, band.high, band.arming = low, high, armed.number
            armed.last_band = band
        if low > symbol_bands.floor:
            symbol_bands.floor = low
        if high < symbol_bands.ceiling:
            symbol_bands.ceiling = high

    def _symbol_bands(self, symbol: str) -> SymbolBands:
        symbol_bands = self._bands.get(symbol)
        if symbol_bands is None:
            symbol_bands = self._bands[symbol] = SymbolBands()
        return symbol_bands

    def disarm(self, trader_id: str) -> None:
        armed = self._armed.get(trader_id)
        if armed is not None:
            armed.number = 0

    def pop_outside(self, symbol: str, mark: int) -> list[str]:
        """Disarm and return the traders whose band in ``symbol`` excludes ``mark``."""
        symbol_bands = self._bands.get(symbol)
        if symbol_bands is None or symbol_bands.floor <= mark <= symbol_bands.ceiling:
            return []
        left: list[str] = []
        entries = symbol_bands.entries
        floor, ceiling = _NO_FLOOR, _NO_CEILING
        for trader_id, band in list(entries.items()):
            if band.armed.number != band.arming:
                del entries[trader_id]  # disarmed, or re-armed without this symbol
                band.listed = False
            elif band.low > mark or band.high < mark:
                del entries[trader_id]
                band.listed = False
                band.armed.number = 0
                left.append(trader_id)
            else:
                if band.low > floor:
                    floor = band.low
                if band.high < ceiling:
                    ceiling = band.high
        symbol_bands.floor, symbol_bands.ceiling = floor, ceiling
        return left
