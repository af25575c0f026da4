"""Append-only CSV telemetry of the exchange: ``trades.csv`` and ``performance.csv``.

Each row goes to the file in one ``os.write`` on an ``O_APPEND`` descriptor, so a reader
tailing the file never sees half a row, and a restart only ever appends: the header is
written only when the file is empty. Money and prices are formatted from the exact
integers (``Decimal``), never through a float.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

from config import MONEY_SCALE, InstrumentConfig
from models import Trade

TRADES_FILE = "trades.csv"
PERFORMANCE_FILE = "performance.csv"
TRADES_HEADER = ("timestamp", "price", "qty", "buy_trader", "sell_trader", "symbol", "trade_id",
                 "aggressor", "buy_order_id", "sell_order_id", "seq")
PERFORMANCE_HEADER = ("timestamp", "trader_id", "position", "cash", "realized_pnl",
                      "total_equity", "unrealized_pnl", "fees")

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MONEY_DIGITS = len(str(MONEY_SCALE)) - 1  # 8: money units are 1e-8 currency


def iso_utc(ts_us: int) -> str:
    """Microseconds since the epoch as ``2026-11-23T23:59:01.123456Z`` (exact: no float)."""
    return (_EPOCH + timedelta(microseconds=ts_us)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def money_str(units: int) -> str:
    """Integer money units as currency with at least 2 and at most 8 decimals, exactly."""
    sign = "-" if units < 0 else ""
    whole, frac = divmod(abs(units), MONEY_SCALE)
    decimals = f"{frac:0{_MONEY_DIGITS}d}".rstrip("0").ljust(2, "0")
    return f"{sign}{whole}.{decimals}"


class PriceFormatter:
    """Ticks to currency with the tick size's own number of decimals (10012 at 0.01 ->
    ``100.12``)."""

    def __init__(self, instruments: Iterable[InstrumentConfig]) -> None:
        self._ticks: dict[str, tuple[Decimal, int]] = {}
        for instrument in instruments:
            tick = Decimal(instrument.tick_size).normalize()
            exponent = tick.as_tuple().exponent
            decimals = -exponent if isinstance(exponent, int) and exponent < 0 else 0
            self._ticks[instrument.symbol] = (tick, decimals)

    def __call__(self, symbol: str, price: int) -> str:
        tick, decimals = self._ticks[symbol]
        return f"{price * tick:.{decimals}f}"


@dataclass(slots=True)
class PerformanceRow:
    """One trader's standing over all symbols; money in integer units."""

    trader_id: str
    position: int
    cash: int
    realized_pnl: int
    total_equity: int
    unrealized_pnl: int
    fees: int


class CsvAppender:
    """One append-only CSV file; a header only when the file is new (empty)."""

    def __init__(self, path: Path, header: Sequence[str]) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._buffer = io.StringIO()
        self._writer = csv.writer(self._buffer, lineterminator="\n")
        if os.fstat(self._fd).st_size == 0:
            self.write_rows([header])

    def write_rows(self, rows: Iterable[Sequence[object]]) -> None:
        """Write whole rows in one system call each (a reader never sees a torn row)."""
        for row in rows:
            self._buffer.seek(0)
            self._buffer.truncate()
            self._writer.writerow(row)
            data = self._buffer.getvalue().encode()
            while data:  # a regular file takes it all at once; loop only to be safe
                written = os.write(self._fd, data)
                data = data[written:]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Telemetry:
    """The exchange's two telemetry files in ``data_dir``."""

    def __init__(self, data_dir: Path, instruments: Iterable[InstrumentConfig]) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.price_str = PriceFormatter(instruments)
        self.trades = CsvAppender(data_dir / TRADES_FILE, TRADES_HEADER)
        self.performance = CsvAppender(data_dir / PERFORMANCE_FILE, PERFORMANCE_HEADER)

    def write_trade(self, trade: Trade, seq: int) -> None:
        self.trades.write_rows([(
            iso_utc(trade.ts), self.price_str(trade.symbol, trade.price), trade.qty,
            trade.buy_trader, trade.sell_trader, trade.symbol, trade.trade_id,
            trade.aggressor.value, trade.buy_order_id, trade.sell_order_id, seq)])

    def write_performance(self, ts: int, rows: Iterable[PerformanceRow]) -> None:
        stamp = iso_utc(ts)
        self.performance.write_rows(
            (stamp, row.trader_id, row.position, money_str(row.cash),
             money_str(row.realized_pnl), money_str(row.total_equity),
             money_str(row.unrealized_pnl), money_str(row.fees))
            for row in rows)

    def close(self) -> None:
        self.trades.close()
        self.performance.close()
