"""Append-only CSV telemetry of the exchange: ``trades.csv`` and ``performance.csv``.

Rows are formatted to bytes by ``CsvFormatter`` (a pure function of the row's data, so
``replay.py`` rebuilds them byte for byte from the journal) and appended by
``CsvAppender``: whole rows per ``os.write`` on an ``O_APPEND`` descriptor, so a reader
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
from typing import TYPE_CHECKING

from config import MONEY_SCALE, InstrumentConfig
from models import Trade

if TYPE_CHECKING:
    from engine import Engine

TRADES_FILE = "trades.csv"
PERFORMANCE_FILE = "performance.csv"
TRADES_HEADER = ("timestamp", "price", "qty", "buy_trader", "sell_trader", "symbol", "trade_id",
                 "aggressor", "buy_order_id", "sell_order_id", "seq")
PERFORMANCE_HEADER = ("timestamp", "trader_id", "position", "cash", "realized_pnl",
                      "total_equity", "unrealized_pnl", "fees")

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MONEY_DIGITS = len(str(MONEY_SCALE)) - 1  # 8: money units are 1e-8 currency


_last_second: list[object] = [None, ""]  # the last second formatted: rows come in bursts


def iso_utc(ts_us: int) -> str:
    """Microseconds since the epoch as ``2026-11-23T23:59:01.123456Z`` (exact: no float)."""
    seconds, micros = divmod(ts_us, 1_000_000)
    cache = _last_second
    if cache[0] != seconds:
        cache[1] = (_EPOCH + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S")
        cache[0] = seconds
    return f"{cache[1]}.{micros:06d}Z"


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

    def average(self, symbol: str, total_ticks: int, qty: int) -> str:
        """``total_ticks / qty`` in currency: the tick's decimals, more only if needed
        (at most 4 more, rounded)."""
        tick, decimals = self._ticks[symbol]
        value = (Decimal(total_ticks) * tick / qty).quantize(Decimal(1).scaleb(-decimals - 4))
        whole, _, frac = f"{value:f}".partition(".")
        frac = frac.rstrip("0").ljust(decimals, "0")
        return f"{whole}.{frac}" if frac else whole


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


def performance_rows(engine: Engine) -> list[PerformanceRow]:
    """Every trader the engine has heard from (PROTOCOL.md: one row per trader), by trader
    id; one that never traded stands at its initial cash. A pure function of the engine's
    state, so a replay of the journal writes the same rows."""
    marks = engine.marks()
    tick_values = engine.tick_values
    rows = []
    for trader_id in sorted(engine.traders):
        account = engine.ledger.view(trader_id)
        positions = account.positions
        rows.append(PerformanceRow(
            trader_id, sum(p.qty for p in positions.values()), account.cash,
            sum(p.realized for p in positions.values()),
            engine.ledger.equity(trader_id, marks),
            sum(p.unrealized(marks[s], tick_values[s]) for s, p in positions.items()),
            sum(p.fees for p in positions.values())))
    return rows


def csv_line(row: Sequence[object]) -> bytes:
    """One CSV row, newline-terminated, as the files hold it."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(row)
    return buffer.getvalue().encode()


class CsvFormatter:
    """Rows of both files as bytes: the one place their format is defined."""

    def __init__(self, instruments: Iterable[InstrumentConfig]) -> None:
        self.price_str = PriceFormatter(instruments)
        self._buffer = io.StringIO()
        self._writer = csv.writer(self._buffer, lineterminator="\n")

    def _rows(self, rows: Iterable[Sequence[object]]) -> bytes:
        buffer = self._buffer
        buffer.seek(0)
        buffer.truncate()
        self._writer.writerows(rows)
        return buffer.getvalue().encode()

    def trade(self, trade: Trade, seq: int) -> bytes:
        return self._rows(((
            iso_utc(trade.ts), self.price_str(trade.symbol, trade.price), trade.qty,
            trade.buy_trader, trade.sell_trader, trade.symbol, trade.trade_id,
            trade.aggressor.value, trade.buy_order_id, trade.sell_order_id, seq),))

    def performance(self, ts: int, rows: Iterable[PerformanceRow]) -> bytes:
        stamp = iso_utc(ts)
        return self._rows(
            (stamp, row.trader_id, row.position, money_str(row.cash),
             money_str(row.realized_pnl), money_str(row.total_equity),
             money_str(row.unrealized_pnl), money_str(row.fees))
            for row in rows)


class CsvAppender:
    """One append-only CSV file; a header only when the file is new (empty)."""

    def __init__(self, path: Path, header: Sequence[str]) -> None:
        self.path = path
        # binary: Windows would write "\r\n", and replay must match byte for byte
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0)
        self._fd = os.open(path, flags, 0o644)
        if os.fstat(self._fd).st_size == 0:
            self.append(csv_line(header))

    def append(self, data: bytes) -> None:
        """Append whole rows (a regular file takes them in one system call)."""
        view = memoryview(data)
        while view:  # loop only to be safe: a short write to a regular file is rare
            view = view[os.write(self._fd, view):]

    def write_rows(self, rows: Iterable[Sequence[object]]) -> None:
        """Write whole rows in one system call each (a reader never sees a torn row)."""
        for row in rows:
            self.append(csv_line(row))

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Telemetry:
    """The exchange's two telemetry files in ``data_dir``."""

    def __init__(self, data_dir: Path, instruments: Iterable[InstrumentConfig]) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.format = CsvFormatter(instruments)
        self.price_str = self.format.price_str
        self.trades = CsvAppender(data_dir / TRADES_FILE, TRADES_HEADER)
        self.performance = CsvAppender(data_dir / PERFORMANCE_FILE, PERFORMANCE_HEADER)

    def write_trade(self, trade: Trade, seq: int) -> None:
        self.trades.append(self.format.trade(trade, seq))

    def write_performance(self, ts: int, rows: Iterable[PerformanceRow]) -> None:
        self.performance.append(self.format.performance(ts, rows))

    def sizes(self) -> tuple[int, int]:
        """Bytes in trades.csv and performance.csv (a snapshot records where it stands)."""
        return self.trades.size(), self.performance.size()

    def sync(self) -> None:
        self.trades.sync()
        self.performance.sync()

    def close(self) -> None:
        self.trades.close()
        self.performance.close()
