"""Exact accounting: positions, cash, fees, realized and unrealized PnL per trader.

All money is an integer count of ``1 / MONEY_SCALE`` currency units and all prices are
integer ticks, so every sum is exact; nothing here is a running float. A position's cost
is kept as ``open_cost`` (signed ticks x lots). Closing part of a position moves a
floored share of that cost into realized PnL; the rounding stays inside ``open_cost``
and vanishes when the position is flat, so realized + unrealized is always exact.

``realized_pnl`` is net of fees, so ``equity = initial cash + realized + unrealized``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from config import MONEY_SCALE

# A machine int in the compiled build is below 2**62; a cash balance at realistic scales
# (1e12 currency is 1e20 units) is not
_MACHINE_INT_MAX: Final = (1 << 62) - 1
_HEADROOM_CAP: Final = 1 << 61  # keeps the headroom itself a machine int


def to_currency(units: int) -> float:
    """Money units to currency for the wire (the only place a float appears)."""
    return units / MONEY_SCALE


class Position:
    __slots__ = ("fees", "open_cost", "qty", "realized")

    def __init__(self) -> None:
        self.qty = 0  # signed lots: long > 0, short < 0
        self.open_cost = 0  # signed ticks x lots paid for the open position
        self.realized = 0  # money units, net of fees
        self.fees = 0  # money units paid (negative: rebates earned)

    def avg_price(self) -> float:
        """Average entry price in ticks (0 when flat)."""
        return self.open_cost / self.qty if self.qty else 0.0

    def unrealized(self, mark: int, tick_value: int) -> int:
        return (self.qty * mark - self.open_cost) * tick_value


def cash_headroom(cash: int) -> int:
    """How far ``cash`` can fall and stay beyond machine ints (at least 2**62), at most
    2**61; -1 for a cash not beyond them."""
    if cash <= _MACHINE_INT_MAX:  # a machine-int constant: no bignum comparison then
        return -1
    headroom = cash - (_MACHINE_INT_MAX + 1)
    return headroom if headroom < _HEADROOM_CAP else _HEADROOM_CAP


class Account:
    __slots__ = ("cash", "cash_headroom", "positions", "trader_id")

    def __init__(self, trader_id: str, cash: int) -> None:
        self.trader_id = trader_id
        self.cash = cash
        # while >= 0, the cash is at least 2**62 + cash_headroom: a fact kept in step
        # with the cash (see pay) that settles, in machine ints, that a bignum cash
        # exceeds a machine-int amount (margin_risk_manager.exceeds)
        self.cash_headroom = cash_headroom(cash)
        self.positions: dict[str, Position] = {}

    def __getnewargs__(self) -> tuple[Any, ...]:  # see native_core.py
        return (self.trader_id, self.cash)

    def pay(self, outflow: int) -> None:
        """Take ``outflow`` from the cash (a negative one adds to it). Only an outflow
        uses up headroom; one that uses it all up has it worked out again."""
        self.cash -= outflow
        if outflow > 0:
            headroom = self.cash_headroom - outflow
            self.cash_headroom = headroom if headroom >= 0 else cash_headroom(self.cash)

    def position(self, symbol: str) -> Position:
        position = self.positions.get(symbol)
        if position is None:
            position = self.positions[symbol] = Position()
        return position


@dataclass(slots=True)
class PositionReport:
    """A trader's standing in one symbol, valued at a mark price (money in units)."""

    trader_id: str
    symbol: str
    position: int
    avg_price: float  # ticks
    cash: int
    realized_pnl: int
    unrealized_pnl: int
    equity: int
    fees: int


class Ledger:
    """Every trader's account, and the fees the exchange collected."""

    def __init__(self, initial_cash: int, tick_values: dict[str, int]) -> None:
        self.initial_cash = initial_cash
        self.tick_values = tick_values
        self.accounts: dict[str, Account] = {}
        self.fee_income = 0  # money units; cash + fee_income over all accounts is conserved

    def __getnewargs__(self) -> tuple[Any, ...]:  # see native_core.py
        return (self.initial_cash, self.tick_values)

    def account(self, trader_id: str) -> Account:
        """The trader's account, opened on first use (only fills open accounts)."""
        account = self.accounts.get(trader_id)
        if account is None:
            account = self.accounts[trader_id] = Account(trader_id, self.initial_cash)
        return account

    def view(self, trader_id: str) -> Account:
        """The trader's account for reading: a fresh one, not stored, if it has none, so a
        query never changes the ledger's state."""
        return self.accounts.get(trader_id) or Account(trader_id, self.initial_cash)

    def apply_fill(self, trader_id: str, symbol: str, is_buy: bool, price: int, qty: int,
                   fee: int) -> Position:
        """Book one fill; returns the updated position."""
        return self.book_fill(self.account(trader_id), symbol, self.tick_values[symbol],
                              is_buy, price, qty, fee)

    def book_fill(self, account: Account, symbol: str, tick_value: int, is_buy: bool,
                  price: int, qty: int, fee: int) -> Position:
        """``apply_fill`` for a caller that already holds the account and the symbol's
        tick value."""
        position = account.position(symbol)
        self.book_position_fill(account, position, tick_value, is_buy, price, qty, fee)
        return position

    def book_position_fill(self, account: Account, position: Position, tick_value: int,
                           is_buy: bool, price: int, qty: int, fee: int) -> None:
        """``book_fill`` for a caller that also holds the account's position in the
        symbol (the engine's hot path, which also reads the account's cash for the
        position report)."""
        # Products of non-negative factors below 2**30 stay in machine ints under mypyc
        # (native_core.py); a negative or larger factor takes its bignum path. So the
        # sign is applied by adding or subtracting, never by multiplying.
        cost = qty * price  # ticks x lots
        amount = cost * tick_value
        account.pay(amount + fee if is_buy else fee - amount)
        position.fees += fee
        position.realized -= fee
        self.fee_income += fee
        held = position.qty
        if held == 0 or (held > 0) == is_buy:
            if is_buy:
                position.open_cost += cost
                position.qty = held + qty
            else:
                position.open_cost -= cost
                position.qty = held - qty
        else:
            held_abs = -held if held < 0 else held
            closing = qty if qty < held_abs else held_abs
            cost_abs = position.open_cost if held > 0 else -position.open_cost
            closed_cost = cost_abs * closing // held_abs
            pnl_ticks = price * closing - closed_cost if held > 0 else closed_cost - price * closing
            if pnl_ticks >= 0:
                position.realized += pnl_ticks * tick_value
            else:
                position.realized -= -pnl_ticks * tick_value
            position.open_cost -= closed_cost if held > 0 else -closed_cost
            remaining = qty - closing  # opens the other way when the position flips
            position.qty = held + qty if is_buy else held - qty
            if remaining:
                position.open_cost = remaining * price if is_buy else -(remaining * price)

    def equity(self, trader_id: str, marks: dict[str, int]) -> int:
        account = self.view(trader_id)
        equity = account.cash
        tick_values = self.tick_values
        for symbol, position in account.positions.items():
            if position.qty:
                equity += position.qty * marks[symbol] * tick_values[symbol]
        return equity

    def report(self, trader_id: str, symbol: str, marks: dict[str, int]) -> PositionReport:
        """One symbol's position; ``cash`` and ``equity`` are the whole account's."""
        account = self.view(trader_id)
        position = account.positions.get(symbol) or Position()
        unrealized = position.unrealized(marks[symbol], self.tick_values[symbol])
        return PositionReport(trader_id, symbol, position.qty, position.avg_price(),
                              account.cash, position.realized, unrealized,
                              self.equity(trader_id, marks), position.fees)

    def state_tuple(self) -> tuple:
        return (self.fee_income, tuple(
            (trader_id, account.cash, tuple(
                (symbol, p.qty, p.open_cost, p.realized, p.fees)
                for symbol, p in sorted(account.positions.items())))
            for trader_id, account in sorted(self.accounts.items())))
