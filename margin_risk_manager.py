"""Margin: initial margin for new exposure, maintenance margin for holding it.

- Initial: the worst case over each symbol (every open buy filling, or every open sell)
  valued at the mark, times ``initial_margin_pct``, must not exceed equity once the new
  order is counted.
- Maintenance: when equity falls below ``maintenance_margin_pct`` of the open
  positions' value at the mark, the engine liquidates the trader.
"""

from __future__ import annotations

from config import MarginConfig
from models import RejectCode
from positions import Ledger
from risk_manager import Reject, TraderState


class MarginRiskManager:
    def __init__(self, config: MarginConfig, ledger: Ledger) -> None:
        self.enabled = config.enabled
        self.initial_bps = config.initial_bps
        self.maintenance_bps = config.maintenance_bps
        self.ledger = ledger

    def initial_required(self, trader: TraderState, marks: dict[str, int],
                         extra_symbol: str | None = None, extra_buy: int = 0,
                         extra_sell: int = 0) -> int:
        """Initial margin for the trader's worst case, with an extra order counted."""
        account = self.ledger.view(trader.trader_id)
        tick_values = self.ledger.tick_values
        symbols = set(account.positions) | set(trader.exposure)
        if extra_symbol is not None:
            symbols.add(extra_symbol)
        required = 0
        for symbol in symbols:
            position = account.positions.get(symbol)
            held = position.qty if position else 0
            open_buy, open_sell = trader.exposure.get(symbol) or (0, 0)
            if symbol == extra_symbol:
                open_buy += extra_buy
                open_sell += extra_sell
            worst = max(abs(held + open_buy), abs(held - open_sell))
            required += worst * marks[symbol] * tick_values[symbol]
        return required * self.initial_bps // 10_000

    def check_order(self, trader: TraderState, symbol: str, is_buy: bool, added_qty: int,
                    marks: dict[str, int]) -> Reject | None:
        if not self.enabled or added_qty <= 0:
            return None
        required = self.initial_required(trader, marks, symbol,
                                         added_qty if is_buy else 0,
                                         0 if is_buy else added_qty)
        equity = self.ledger.equity(trader.trader_id, marks)
        if required > equity:
            return (RejectCode.RISK_INSUFFICIENT_MARGIN,
                    f"initial margin {required / 1e8:.2f} would exceed equity "
                    f"{equity / 1e8:.2f}")
        return None

    def maintenance_required(self, trader_id: str, marks: dict[str, int]) -> int:
        account = self.ledger.view(trader_id)
        tick_values = self.ledger.tick_values
        notional = sum(abs(p.qty) * marks[symbol] * tick_values[symbol]
                       for symbol, p in account.positions.items() if p.qty)
        return notional * self.maintenance_bps // 10_000

    def margin_used(self, trader_id: str, marks: dict[str, int]) -> int:
        """Initial margin tied up by the open positions alone."""
        account = self.ledger.view(trader_id)
        tick_values = self.ledger.tick_values
        notional = sum(abs(p.qty) * marks[symbol] * tick_values[symbol]
                       for symbol, p in account.positions.items() if p.qty)
        return notional * self.initial_bps // 10_000

    def in_breach(self, trader_id: str, marks: dict[str, int]) -> bool:
        """Equity below maintenance margin: the trader must be liquidated."""
        if not self.enabled:
            return False
        return self.ledger.equity(trader_id, marks) < self.maintenance_required(trader_id, marks)
