#!/usr/bin/env python3
"""Turn a run's ``trades.csv`` and ``performance.csv`` into one self-contained HTML page.

    python report.py --data-dir runs/demo            # writes runs/demo/report.html
    python report.py --data-dir runs/demo --out /tmp/r.html

The page works offline: inline CSS and inline SVG charts drawn here, no scripts, fonts
or CDNs. It shows the run's summary (time span, trades, volume, VWAP, first/last/high/low
price), price with volume bars per symbol, each trader's equity curve, and a table of
traders sorted by final equity.

Other programs call ``build_report(data_dir, out)``; it raises ``ReportError`` with a
message naming the file, column or line at fault.

Only the columns the contract guarantees are required (``PROTOCOL.md``, telemetry):
``timestamp,price,qty,buy_trader,sell_trader`` and
``timestamp,trader_id,position,cash,realized_pnl,total_equity``. ``symbol``,
``unrealized_pnl`` and ``fees`` are used when present. The output depends only on the
input files (no generation time), so the same run always gives the same page.
"""

from __future__ import annotations

import argparse
import csv
import html
import itertools
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TextIO

TRADES_FILE = "trades.csv"
PERFORMANCE_FILE = "performance.csv"
REPORT_FILE = "report.html"
TRADE_COLUMNS = ("timestamp", "price", "qty", "buy_trader", "sell_trader")
PERFORMANCE_COLUMNS = ("timestamp", "trader_id", "position", "cash", "realized_pnl",
                       "total_equity")

DEFAULT_MAX_TRADERS = 10  # equity lines drawn; the rest are only in the table
MAX_TRADERS_LIMIT = 20  # beyond this the chart is unreadable whatever the colours
VOLUME_BUCKETS = 100  # at most; round bucket sizes give 65 to 100 bars
PRICE_BUCKETS = 500  # M4 keeps <= 4 points per bucket: <= 2,000 points per price line
EQUITY_POINT_BUDGET = 6_000  # shared by all equity lines of the chart

# category10: distinct hues that stay apart on white; lines past the tenth are dashed.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_US = timedelta(microseconds=1)

Warn = Callable[[str], None]


class ReportError(Exception):
    """Input the report cannot be built from; the message names the file and the problem."""


class _RowError(ValueError):
    """One bad field in one row; the caller adds the file name and line number."""


# ---------------------------------------------------------------------------- parsing


_second_cache: dict[str, int] = {}


def _parse_ts(text: str) -> int:
    """ISO 8601 timestamp to integer microseconds since the epoch (UTC).

    Integers, not float seconds: at today's epoch a double only resolves ~0.2 µs, and
    simulated-time runs can span microseconds.
    """
    # Fast path for the exchange's own format, 2026-11-23T23:59:01.123456Z: many rows
    # share a second, so parse "up to the second" once and add the fraction. This
    # roughly halves the time spent on timestamps in a 100k-row file.
    fraction = text[20:26]
    if (len(text) == 27 and text[19] == "." and text[26] == "Z" and fraction.isascii()
            and fraction.isdigit()):
        second = _second_cache.get(text[:19])
        if second is None:
            try:
                second = _parse_ts_general(text[:19] + "Z")
            except _RowError:
                return _parse_ts_general(text)  # so the message quotes the whole field
            if len(_second_cache) > 100_000:
                _second_cache.clear()  # bound memory on very long runs
            _second_cache[text[:19]] = second
        return second + int(fraction)
    return _parse_ts_general(text)


def _parse_ts_general(text: str) -> int:
    s = text.strip()
    # Python 3.10's fromisoformat does not accept the "Z" suffix; 3.11+ does.
    if s.endswith(("Z", "z")):
        s = s[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        raise _RowError(f"bad timestamp {text!r} (expected ISO 8601, "
                        "e.g. 2026-11-23T23:59:01.123456Z)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)  # the exchange writes UTC
    return (dt - _EPOCH) // _ONE_US


def _parse_decimal(text: str, column: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise _RowError(f"bad {column} {text!r} (not a number)") from None
    if not value.is_finite():
        raise _RowError(f"bad {column} {text!r} (not a finite number)")
    return value


def _parse_qty(text: str) -> int:
    try:
        qty = int(text)
    except ValueError:
        raise _RowError(f"bad qty {text!r} (must be a positive integer)") from None
    if qty <= 0:
        raise _RowError(f"bad qty {text!r} (must be a positive integer)")
    return qty


def _parse_id(text: str, column: str) -> str:
    value = text.strip()
    if not value:
        raise _RowError(f"empty {column}")
    return value


@dataclass
class SymbolSeries:
    """Every trade of one symbol, as parallel lists (cheap for 100k+ rows)."""

    symbol: str
    ts: list[int] = field(default_factory=list)
    price: list[float] = field(default_factory=list)
    qty: list[int] = field(default_factory=list)
    notional: Decimal = Decimal(0)  # exact sum of price * qty, for the VWAP
    volume: int = 0
    decimals: int = 2  # decimals to print prices with: the most any row used

    @property
    def vwap(self) -> Decimal:
        return self.notional / self.volume


@dataclass
class TraderActivity:
    trades: int = 0
    volume: int = 0


@dataclass
class TradeData:
    symbols: dict[str, SymbolSeries] = field(default_factory=dict)
    traders: dict[str, TraderActivity] = field(default_factory=dict)
    count: int = 0
    volume: int = 0
    has_symbol_column: bool = False


@dataclass
class Snapshot:
    ts: int
    position: Decimal
    cash: Decimal
    realized_pnl: Decimal
    equity: Decimal
    unrealized_pnl: Decimal | None
    fees: Decimal | None


@dataclass
class TraderCurve:
    ts: list[int] = field(default_factory=list)
    equity: list[float] = field(default_factory=list)
    last: Snapshot | None = None

    @property
    def final(self) -> Snapshot:
        """The trader's last row; a curve only exists once a row has been read."""
        assert self.last is not None
        return self.last


@dataclass
class PerformanceData:
    traders: dict[str, TraderCurve] = field(default_factory=dict)
    rows: int = 0
    has_unrealized: bool = False
    has_fees: bool = False


@dataclass
class _Csv:
    path: Path
    reader: Iterator[list[str]]
    columns: dict[str, int]
    line: Callable[[], int]


def _open_csv(path: Path, handle: TextIO, required: Sequence[str], warn: Warn) -> _Csv | None:
    """Check the header; None for a zero-byte file (a run killed before writing it)."""
    reader = csv.reader(handle)
    try:
        header = next(reader, None)
    except (csv.Error, UnicodeDecodeError) as exc:
        raise ReportError(f"{path} line 1: unreadable header ({exc})") from None
    if header is None:
        warn(f"{path} is empty (no header): treating it as having no rows")
        return None
    names = [name.strip() for name in header]
    columns: dict[str, int] = {}
    for i, name in enumerate(names):
        columns.setdefault(name, i)
    missing = [name for name in required if name not in columns]
    if missing:
        shown = ",".join(names)
        if len(shown) > 120:
            shown = shown[:120] + "..."
        raise ReportError(
            f"{path}: bad header: missing column {', '.join(map(repr, missing))} "
            f"(the header must start with {','.join(required)}; got {shown!r})")
    return _Csv(path, reader, columns, lambda: reader.line_num)


def _rows(src: _Csv, needed: int, strict: bool, warn: Warn) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, row) for each non-blank row with at least `needed` fields."""
    try:
        for row in src.reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # a blank line, e.g. a trailing newline too many
            line = src.line()
            if len(row) < needed:
                _bad_row(src.path, line, f"expected at least {needed} fields, got {len(row)}",
                         strict, warn)
                continue
            yield line, row
    except (csv.Error, UnicodeDecodeError) as exc:
        raise ReportError(f"{src.path} line {src.line() + 1}: unreadable ({exc})") from None


def _bad_row(path: Path, line: int, problem: str, strict: bool, warn: Warn) -> None:
    message = f"{path} line {line}: {problem}"
    if strict:
        raise ReportError(message)
    warn(f"skipping {message}")


def _open_file(path: Path) -> TextIO:
    try:
        # utf-8-sig: a file saved by a spreadsheet may start with a byte-order mark.
        return path.open(newline="", encoding="utf-8-sig")
    except FileNotFoundError:
        raise ReportError(f"missing file: {path}") from None
    except OSError as exc:
        raise ReportError(f"cannot read {path}: {exc.strerror or exc}") from None


def read_trades(path: Path, *, strict: bool = True, warn: Warn | None = None) -> TradeData:
    """Parse trades.csv. A bad row raises ReportError naming its line (or is skipped)."""
    warn = warn or _stderr
    data = TradeData()
    with _open_file(path) as handle:
        src = _open_csv(path, handle, TRADE_COLUMNS, warn)
        if src is None:
            return data
        c = src.columns
        i_ts, i_price, i_qty, i_buy, i_sell = (c[name] for name in TRADE_COLUMNS)
        i_symbol = c.get("symbol")
        data.has_symbol_column = i_symbol is not None
        needed = max(i_ts, i_price, i_qty, i_buy, i_sell) + 1
        series_by_symbol = data.symbols
        activity = data.traders
        for line, row in _rows(src, needed, strict, warn):
            try:
                ts = _parse_ts(row[i_ts])
                price = _parse_decimal(row[i_price], "price")
                qty = _parse_qty(row[i_qty])
                buyer = _parse_id(row[i_buy], "buy_trader")
                seller = _parse_id(row[i_sell], "sell_trader")
            except _RowError as exc:
                _bad_row(path, line, str(exc), strict, warn)
                continue
            symbol = row[i_symbol].strip() if i_symbol is not None and i_symbol < len(row) else ""
            series = series_by_symbol.get(symbol)
            if series is None:
                series = series_by_symbol[symbol] = SymbolSeries(symbol)
            series.ts.append(ts)
            series.price.append(float(price))
            series.qty.append(qty)
            series.notional += price * qty
            series.volume += qty
            text = row[i_price].strip()
            dot = text.find(".")
            if dot >= 0 and len(text) - dot - 1 > series.decimals:
                series.decimals = min(len(text) - dot - 1, 8)  # money is exact to 1e-8
            for trader in (buyer, seller) if buyer != seller else (buyer,):
                act = activity.get(trader)
                if act is None:
                    act = activity[trader] = TraderActivity()
                act.trades += 1
                act.volume += qty
            data.count += 1
            data.volume += qty
    for series in series_by_symbol.values():
        _sort_by_time(series.ts, series.price, series.qty,
                      what=f"{path}: trades of {series.symbol or 'the run'}", warn=warn)
    return data


def read_performance(path: Path, *, strict: bool = True,
                     warn: Warn | None = None) -> PerformanceData:
    """Parse performance.csv; a trader's final state is its last row in file order."""
    warn = warn or _stderr
    data = PerformanceData()
    with _open_file(path) as handle:
        src = _open_csv(path, handle, PERFORMANCE_COLUMNS, warn)
        if src is None:
            return data
        c = src.columns
        i_ts, i_id, i_pos, i_cash, i_real, i_eq = (c[name] for name in PERFORMANCE_COLUMNS)
        i_unreal = c.get("unrealized_pnl")
        i_fees = c.get("fees")
        data.has_unrealized = i_unreal is not None
        data.has_fees = i_fees is not None
        needed = max(i_ts, i_id, i_pos, i_cash, i_real, i_eq) + 1
        for line, row in _rows(src, needed, strict, warn):
            try:
                snap = Snapshot(
                    ts=_parse_ts(row[i_ts]),
                    position=_parse_decimal(row[i_pos], "position"),
                    cash=_parse_decimal(row[i_cash], "cash"),
                    realized_pnl=_parse_decimal(row[i_real], "realized_pnl"),
                    equity=_parse_decimal(row[i_eq], "total_equity"),
                    unrealized_pnl=_optional_decimal(row, i_unreal, "unrealized_pnl"),
                    fees=_optional_decimal(row, i_fees, "fees"),
                )
                trader = _parse_id(row[i_id], "trader_id")
            except _RowError as exc:
                _bad_row(path, line, str(exc), strict, warn)
                continue
            curve = data.traders.get(trader)
            if curve is None:
                curve = data.traders[trader] = TraderCurve()
            curve.ts.append(snap.ts)
            curve.equity.append(float(snap.equity))
            curve.last = snap
            data.rows += 1
    for trader, curve in data.traders.items():
        _sort_by_time(curve.ts, curve.equity, what=f"{path}: snapshots of {trader}", warn=warn)
    return data


def _optional_decimal(row: list[str], index: int | None, column: str) -> Decimal | None:
    if index is None or index >= len(row) or not row[index].strip():
        return None
    return _parse_decimal(row[index], column)


def _sort_by_time(ts: list[int], *others: list, what: str, warn: Warn) -> None:
    """Sort parallel lists by time in place, if they are not already in order.

    The files are append-only in event order, so this only happens when a restart
    appended a run whose clock started earlier (e.g. simulated time); lines drawn in
    file order would then zigzag back across the chart.
    """
    if all(a <= b for a, b in itertools.pairwise(ts)):
        return
    warn(f"{what} are not in time order (a restart?); sorting them by timestamp")
    order = sorted(range(len(ts)), key=ts.__getitem__)
    for values in (ts, *others):
        values[:] = [values[i] for i in order]


def _stderr(message: str) -> None:
    print(f"report.py: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------- charts


def downsample(xs: Sequence[int | float], ys: Sequence[float], buckets: int) -> list[int]:
    """Indices of the points worth drawing, at most 4 per x-bucket, in order (M4).

    Per bucket the first, last, lowest and highest point are kept, so spikes and the
    line's shape survive while a 100k-point series becomes a few thousand SVG points.
    `xs` must be sorted.
    """
    n = len(xs)
    if n <= 4 * buckets:
        return list(range(n))
    x0 = xs[0]
    width = (xs[-1] - x0) / buckets or 1
    keep: list[int] = []
    start = 0
    current = 0
    for i in range(n + 1):
        bucket = min(int((xs[i] - x0) / width), buckets - 1) if i < n else -1
        if i == n or bucket != current:
            lo = hi = start
            for j in range(start + 1, i):
                if ys[j] < ys[lo]:
                    lo = j
                elif ys[j] > ys[hi]:
                    hi = j
            keep.extend(sorted({start, lo, hi, i - 1}))
            start, current = i, bucket
    return keep


@dataclass(frozen=True)
class Axis:
    lo: float
    hi: float
    ticks: list[float]
    decimals: int


def nice_axis(lo: float, hi: float, target: int = 5) -> Axis:
    """Round bounds and ticks (1, 2, 2.5 or 5 times a power of ten) covering [lo, hi]."""
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:  # a flat line still needs a visible range around it
        pad = abs(lo) * 0.01 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / target
    magnitude = 10 ** math.floor(math.log10(raw))
    for mult in (1, 2, 2.5, 5, 10):
        step = mult * magnitude
        if step >= raw:
            break
    first = math.floor(lo / step + 1e-9)
    last = math.ceil(hi / step - 1e-9)
    ticks = [k * step for k in range(first, last + 1)]
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) + (1 if mult == 2.5 else 0)
    return Axis(ticks[0], ticks[-1], ticks, decimals)


# Candidate time-axis steps, in microseconds, that read naturally on a clock.
_TIME_STEPS_US = sorted(
    [m * 10 ** k for k in range(0, 6) for m in (1, 2, 5)]  # 1 µs .. 0.5 s
    + [s * 1_000_000 for s in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600,
                               7200, 10800, 21600, 43200)]
    + [d * 86_400_000_000 for d in (1, 2, 7, 14, 30, 60, 91, 182, 365)])


# Volume bucket sizes, in microseconds: round on a clock and close together, so the
# chosen one gives between ~65 and VOLUME_BUCKETS bars.
_BUCKETS_US = sorted(
    [m * 10 ** k for k in range(0, 6) for m in (1, 1.5, 2, 3, 4, 5, 6, 8)]
    + [s * 1_000_000 for s in (1, 1.5, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 30, 45)]
    + [m * 60_000_000 for m in (1, 1.5, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 30, 45)]
    + [h * 3_600_000_000 for h in (1, 1.5, 2, 3, 4, 6, 8, 12, 18)]
    + [d * 86_400_000_000 for d in (1, 1.5, 2, 3, 4, 5, 7, 10, 14, 21, 30, 45, 60, 90)])


def volume_bucket_us(span_us: int) -> int:
    """The smallest round bucket size that cuts `span_us` into at most VOLUME_BUCKETS."""
    want = span_us / VOLUME_BUCKETS
    size = next((b for b in _BUCKETS_US if b >= want), None)
    # Spans beyond the table (years) just get VOLUME_BUCKETS equal buckets.
    return int(size) if size is not None else math.ceil(want)


def time_ticks(t0: int, t1: int, target: int = 7) -> tuple[list[tuple[int, str]], str]:
    """Tick positions with clock labels, and an axis caption with the date(s), UTC."""
    span = max(t1 - t0, 1)
    raw = span / target
    step = next((s for s in _TIME_STEPS_US if s >= raw), _TIME_STEPS_US[-1])
    first = -(-t0 // step) * step
    day0, day1 = _utc(t0).date(), _utc(t1).date()
    if step >= 86_400_000_000:
        fmt = "%Y-%m-%d"
    elif step >= 60_000_000:
        fmt = "%H:%M" if day0 == day1 else "%m-%d %H:%M"
    elif step >= 1_000_000:
        fmt = "%H:%M:%S"
    else:
        fmt = "%M:%S"  # the hour is in the span card; sub-second labels are long enough
    # Sub-second steps get just enough fraction digits to tell the ticks apart.
    digits = 6 - _trailing_zero_digits(step) if step < 1_000_000 else 0
    ticks = []
    for t in range(first, t1 + 1, step):
        label = _utc(t).strftime(fmt)
        if digits:
            label += "." + f"{t % 1_000_000:06d}"[:digits]
        ticks.append((t, label))
    caption = f"time (UTC), {day0.isoformat()}"
    if fmt == "%M:%S":
        caption += _utc(t0).strftime(" %H:mm:ss")  # the hour the labels leave out
    elif day1 != day0:
        caption += f" to {day1.isoformat()}"
    return ticks, caption


def _trailing_zero_digits(step: int) -> int:
    """How many of the 6 fraction digits of a sub-second step are trailing zeros."""
    digits = f"{step:06d}"
    return len(digits) - len(digits.rstrip("0"))


def _utc(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


@dataclass(frozen=True)
class Frame:
    """A plot rectangle in SVG user units, mapping time and value onto it."""

    left: float
    top: float
    width: float
    height: float
    t0: int
    t1: int
    lo: float
    hi: float

    def x(self, t: int) -> float:
        return self.left + (t - self.t0) / (self.t1 - self.t0) * self.width

    def y(self, v: float) -> float:
        return self.top + (self.hi - v) / (self.hi - self.lo) * self.height


SVG_WIDTH = 960
MARGIN_LEFT = 84  # room for equity labels like 1,000,000
MARGIN_RIGHT = 30  # room for half of the last time label


def _fmt_num(value: float, decimals: int) -> str:
    text = f"{value:,.{decimals}f}"
    # A tick computed as -1e-13 rather than 0 must not read "-0.00".
    return text[1:] if text.startswith("-") and float(text.replace(",", "")) == 0 else text


def _y_grid(frame: Frame, axis: Axis) -> list[str]:
    parts = []
    for v in axis.ticks:
        y = frame.y(v)
        parts.append(f'<line class="grid" x1="{frame.left}" x2="{frame.left + frame.width}" '
                     f'y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="ylab" x="{frame.left - 6}" y="{y + 3.5:.1f}">'
                     f'{_fmt_num(v, axis.decimals)}</text>')
    return parts


def _x_grid(frame: Frame, bottom: float, ticks: list[tuple[int, str]],
            caption: str) -> list[str]:
    parts = []
    for t, label in ticks:
        x = frame.x(t)
        parts.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{frame.top}" '
                     f'y2="{bottom}"/>')
        # A centred label at the right edge would be cut off by the SVG's border.
        half = len(label) * 3.3  # ~half the label's width at 11px
        at_edge = x + half > SVG_WIDTH - 2
        cls, anchor_x = ("xlab edge", SVG_WIDTH - 2) if at_edge else ("xlab", x)
        parts.append(f'<text class="{cls}" x="{anchor_x:.1f}" y="{bottom + 14}">'
                     f'{label}</text>')
    parts.append(f'<text class="caption" x="{frame.left + frame.width}" '
                 f'y="{bottom + 30}">{html.escape(caption)}</text>')
    return parts


def _points(frame: Frame, ts: Sequence[int], ys: Sequence[float], keep: list[int]) -> str:
    return " ".join(f"{frame.x(ts[i]):.1f},{frame.y(ys[i]):.1f}" for i in keep)


def price_chart(series: SymbolSeries, t0: int, t1: int) -> str:
    """Price line over volume bars, as one inline SVG."""
    ticks, caption = time_ticks(t0, t1)
    price_top, price_h = 12.0, 220.0
    vol_top, vol_h = price_top + price_h + 16, 72.0
    bottom = vol_top + vol_h
    height = bottom + 40
    plot_w = SVG_WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    y_axis = nice_axis(min(series.price), max(series.price))
    pf = Frame(MARGIN_LEFT, price_top, plot_w, price_h, t0, t1, y_axis.lo, y_axis.hi)

    # Volume per round-sized time bucket (e.g. 5 s) aligned on the clock, over the
    # shared time axis so every chart's bars line up.
    bucket = volume_bucket_us(t1 - t0)
    base = t0 // bucket * bucket
    volumes = [0] * ((t1 - base) // bucket + 1)
    for t, q in zip(series.ts, series.qty, strict=True):
        volumes[(t - base) // bucket] += q
    v_axis = nice_axis(0, max(volumes), target=4)
    vf = Frame(MARGIN_LEFT, vol_top, plot_w, vol_h, t0, t1, 0, v_axis.hi)

    label = html.escape(series.symbol or "all trades")
    parts = [f'<svg class="chart" viewBox="0 0 {SVG_WIDTH} {height:.0f}" '
             f'xmlns="http://www.w3.org/2000/svg" role="img" '
             f'aria-label="Price and volume over time, {label}">']
    parts += _y_grid(pf, y_axis)
    parts += _x_grid(pf, bottom, ticks, caption)
    parts.append(f'<rect class="frame" x="{pf.left}" y="{pf.top}" width="{plot_w}" '
                 f'height="{price_h}"/>')
    keep = downsample(series.ts, series.price, PRICE_BUCKETS)
    if len(keep) == 1:
        i = keep[0]
        parts.append(f'<circle class="price" cx="{pf.x(series.ts[i]):.1f}" '
                     f'cy="{pf.y(series.price[i]):.1f}" r="3"/>')
    else:
        points = _points(pf, series.ts, series.price, keep)
        parts.append(f'<polyline class="price" points="{points}">'
                     f'<title>{label} price</title></polyline>')

    parts.append(f'<rect class="frame" x="{vf.left}" y="{vf.top}" width="{plot_w}" '
                 f'height="{vol_h}"/>')
    for k, vol in enumerate(volumes):
        if vol:
            # Edge buckets stick out of the axis range; clip them to the frame.
            xa = max(vf.x(base + k * bucket), vf.left)
            xb = min(vf.x(base + (k + 1) * bucket), vf.left + plot_w)
            gap = 0.5 if xb - xa > 2 else 0.0
            y = vf.y(vol)
            parts.append(f'<rect class="vol" x="{xa + gap:.1f}" y="{y:.1f}" '
                         f'width="{xb - xa - 2 * gap:.1f}" height="{vf.top + vol_h - y:.1f}">'
                         f'<title>{_fmt_ts(base + k * bucket)}: {vol:,} lots</title></rect>')
    parts.append(f'<text class="ylab" x="{vf.left - 6}" y="{vf.top + 9}">'
                 f'{_fmt_num(v_axis.hi, 0)}</text>')
    parts.append(f'<text class="ylab" x="{vf.left - 6}" y="{vf.top + vol_h}">0</text>')
    parts.append(f'<text class="panel" x="{vf.left + 6}" y="{vf.top + 13}">volume, lots per '
                 f'{_fmt_duration(bucket)}</text>')
    parts.append(f'<text class="panel" x="{pf.left + 6}" y="{pf.top + 14}">price</text>')
    parts.append("</svg>")
    return "".join(parts)


def equity_chart(curves: list[tuple[str, TraderCurve, str, str]], t0: int, t1: int) -> str:
    """One equity line per (trader, curve, colour, dash pattern)."""
    ticks, caption = time_ticks(t0, t1)
    top, plot_h = 12.0, 300.0
    bottom = top + plot_h
    height = bottom + 40
    plot_w = SVG_WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    lo = min(min(c.equity) for _, c, _, _ in curves)
    hi = max(max(c.equity) for _, c, _, _ in curves)
    y_axis = nice_axis(lo, hi)
    frame = Frame(MARGIN_LEFT, top, plot_w, plot_h, t0, t1, y_axis.lo, y_axis.hi)
    parts = [f'<svg class="chart" viewBox="0 0 {SVG_WIDTH} {height:.0f}" '
             'xmlns="http://www.w3.org/2000/svg" role="img" '
             'aria-label="Equity of each trader over time">']
    parts += _y_grid(frame, y_axis)
    parts += _x_grid(frame, bottom, ticks, caption)
    parts.append(f'<rect class="frame" x="{frame.left}" y="{top}" width="{plot_w}" '
                 f'height="{plot_h}"/>')
    buckets = max(25, EQUITY_POINT_BUDGET // (4 * len(curves)))
    for trader, curve, colour, dash in curves:
        name = html.escape(trader)
        keep = downsample(curve.ts, curve.equity, buckets)
        if len(keep) == 1:
            i = keep[0]
            parts.append(f'<circle cx="{frame.x(curve.ts[i]):.1f}" '
                         f'cy="{frame.y(curve.equity[i]):.1f}" r="3" fill="{colour}">'
                         f'<title>{name}</title></circle>')
            continue
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(f'<polyline class="equity" stroke="{colour}"{dash_attr} '
                     f'points="{_points(frame, curve.ts, curve.equity, keep)}">'
                     f'<title>{name}</title></polyline>')
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------------------- page


def _fmt_ts(us: int) -> str:
    return _utc(us).strftime("%Y-%m-%d %H:%M:%S.%f") + " UTC"


def _fmt_span(first: int, last: int) -> str:
    """'2026-11-23 22:00:00.000 → 22:09:59.995 UTC': µs only when the span needs them."""
    digits = 6 if last - first < 1_000_000 else 3
    start, end = _utc(first), _utc(last)
    end_fmt = "%H:%M:%S.%f" if start.date() == end.date() else "%Y-%m-%d %H:%M:%S.%f"
    a = start.strftime("%Y-%m-%d %H:%M:%S.%f")[:digits - 6 or None]
    b = end.strftime(end_fmt)[:digits - 6 or None]
    return f"{a} → {b} UTC"


def _fmt_duration(us: int) -> str:
    if us < 1_000:
        return f"{us} µs"
    if us < 1_000_000:
        return f"{us / 1_000:g} ms"
    seconds = us / 1_000_000
    if seconds < 60:
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + " s"
    whole = round(seconds)
    days, rest = divmod(whole, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s"


def _fmt_price(value: float | Decimal, decimals: int) -> str:
    return f"{value:,.{decimals}f}"


def _fmt_money(value: Decimal | None) -> str:
    if value is None:
        return "—"
    text = f"{value:,.2f}"
    return "0.00" if text == "-0.00" else text  # -0.001 rounds to zero, not "-0.00"


def _fmt_position(value: Decimal) -> str:
    return f"{value:,}" if value == value.to_integral_value() else f"{value:,f}"


def _money_cell(value: Decimal | None, signed: bool = False) -> str:
    cls = "num"
    if signed and value is not None and value != 0:
        cls += " pos" if value > 0 else " neg"
    return f'<td class="{cls}">{_fmt_money(value)}</td>'


def _card(label: str, value: str, stat: str, note: str = "", wide: bool = False) -> str:
    note_html = f'<div class="note">{note}</div>' if note else ""
    cls = "card wide" if wide else "card"
    return (f'<div class="{cls}"><div class="label">{label}</div>'
            f'<div class="value" data-stat="{stat}">{value}</div>{note_html}</div>')


_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #f4f6f9; color: #1d2633;
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
  sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 24px 40px; }
h1 { font-size: 24px; margin: 0 0 2px; }
h2 { font-size: 17px; margin: 0 0 10px; }
.sub { color: #5b6675; margin: 0 0 16px; font-size: 13px; overflow-wrap: anywhere; }
section { background: #fff; border: 1px solid #dde3ea; border-radius: 8px;
  padding: 16px 18px; margin: 0 0 18px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr));
  gap: 10px; margin-bottom: 18px; }
.card { background: #fff; border: 1px solid #dde3ea; border-radius: 8px; padding: 10px 12px; }
.card.wide { grid-column: span 2; }
.card .label { font-size: 11px; text-transform: uppercase; letter-spacing: .05em;
  color: #5b6675; }
.card .value { font-size: 19px; font-weight: 600; font-variant-numeric: tabular-nums;
  white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.card .note { font-size: 12px; color: #5b6675; }
.empty { padding: 28px; text-align: center; color: #5b6675; background: #f8fafc;
  border: 1px dashed #c9d2dc; border-radius: 6px; }
svg.chart { width: 100%; height: auto; display: block; font-size: 11px; }
svg .grid { stroke: #e8ecf1; stroke-width: 1; }
svg .frame { fill: none; stroke: #c9d2dc; stroke-width: 1; }
svg .ylab { text-anchor: end; fill: #5b6675; font-variant-numeric: tabular-nums; }
svg .xlab { text-anchor: middle; fill: #5b6675; font-variant-numeric: tabular-nums; }
svg .xlab.edge { text-anchor: end; }
svg .caption { text-anchor: end; fill: #8a94a3; }
svg .panel { fill: #6b7686; paint-order: stroke; stroke: #fff; stroke-width: 3px;
  stroke-linejoin: round; }
svg .price { fill: none; stroke: #1f4e8c; stroke-width: 1.5; stroke-linejoin: round; }
svg circle.price { fill: #1f4e8c; }
svg .vol { fill: #9fb6d3; }
svg .equity { fill: none; stroke-width: 1.8; stroke-linejoin: round; }
.legend { list-style: none; padding: 0; margin: 10px 0 0; display: flex; flex-wrap: wrap;
  gap: 6px 18px; font-size: 13px; }
.legend li { display: flex; align-items: center; gap: 6px; }
.sw { display: inline-block; width: 14px; height: 4px; border-radius: 2px;
  vertical-align: middle; flex: none; }
.sw.dashed { background-image: linear-gradient(90deg, transparent 50%, #fff 50%);
  background-size: 6px 4px; }
.muted { color: #5b6675; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { padding: 6px 10px; border-bottom: 1px solid #e8ecf1; text-align: left;
  white-space: nowrap; }
th { font-size: 11px; text-transform: uppercase; letter-spacing: .04em; color: #5b6675;
  background: #f8fafc; position: sticky; top: 0; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.trader { font-weight: 600; max-width: 260px; overflow: hidden; text-overflow: ellipsis; }
td.trader .sw { margin-right: 6px; }
td.pos { color: #1a7f37; } td.neg { color: #c62828; }
tbody tr:nth-child(even) { background: #fafbfc; }
footer { color: #8a94a3; font-size: 12px; text-align: center; }
"""


def render_html(data_dir: Path, trades: TradeData, perf: PerformanceData,
                max_traders: int = DEFAULT_MAX_TRADERS) -> str:
    """The whole page as a string."""
    times = [t for s in trades.symbols.values() for t in (s.ts[0], s.ts[-1])]
    times += [t for c in perf.traders.values() for t in (c.ts[0], c.ts[-1])]
    t0, t1 = (min(times), max(times)) if times else (0, 0)
    if t1 == t0:  # a single instant: widen so the axis has a span to draw
        t0, t1 = t0 - 500_000, t1 + 500_000
    esc_dir = html.escape(str(data_dir))

    # Traders sorted by final equity (best first); traders seen only in trades.csv last.
    ranked = sorted(perf.traders, key=lambda tid: (-perf.traders[tid].final.equity, tid))
    unranked = sorted(tid for tid in trades.traders if tid not in perf.traders)
    plotted = ranked[:max_traders]
    colours = {tid: (PALETTE[i % len(PALETTE)], "6 3" if i >= len(PALETTE) else "")
               for i, tid in enumerate(plotted)}

    out = ['<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
           '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
           f'<title>OpenMarketSim report: {esc_dir}</title>\n<style>{_CSS}</style>\n'
           '</head>\n<body>\n<main>\n<header>\n<h1>OpenMarketSim run report</h1>\n'
           f'<p class="sub">{esc_dir}/{TRADES_FILE} ({trades.count:,} trades) and '
           f'{esc_dir}/{PERFORMANCE_FILE} ({perf.rows:,} snapshots)</p>\n']

    # ---- summary cards
    cards = []
    if times:
        first, last = min(times), max(times)
        cards.append(_card("Time span", _fmt_duration(last - first), "duration",
                           _fmt_span(first, last), wide=True))
    cards.append(_card("Trades", f"{trades.count:,}", "trades"))
    cards.append(_card("Volume", f"{trades.volume:,}", "volume", "lots"))
    cards.append(_card("Traders", f"{len(ranked) + len(unranked):,}", "traders"))
    only = next(iter(trades.symbols.values())) if len(trades.symbols) == 1 else None
    if only is not None:
        d = only.decimals
        cards.append(_card("VWAP", _fmt_price(only.vwap, d + 2), "vwap",
                           html.escape(only.symbol)))
        cards.append(_card("First", _fmt_price(only.price[0], d), "first"))
        cards.append(_card("Last", _fmt_price(only.price[-1], d), "last",
                           _change(only.price[0], only.price[-1])))
        cards.append(_card("High", _fmt_price(max(only.price), d), "high"))
        cards.append(_card("Low", _fmt_price(min(only.price), d), "low"))
    out.append(f'<div class="cards">{"".join(cards)}</div>\n</header>\n')

    if len(trades.symbols) > 1:
        out.append(_symbol_table(trades))

    # ---- price charts
    if not trades.count:
        out.append('<section><h2>Price and volume</h2><div class="empty" id="no-trades">'
                   'No trades: trades.csv has no rows, so there is no price to chart.'
                   '</div></section>\n')
    for symbol in sorted(trades.symbols):
        series = trades.symbols[symbol]
        title = f"Price and volume: {html.escape(symbol)}" if symbol else "Price and volume"
        out.append(f'<section><h2>{title}</h2>{price_chart(series, t0, t1)}</section>\n')

    # ---- equity chart
    out.append('<section><h2>Equity by trader</h2>')
    if plotted:
        curves = [(tid, perf.traders[tid], *colours[tid]) for tid in plotted]
        out.append(equity_chart(curves, t0, t1))
        out.append('<ul class="legend">')
        for tid in plotted:
            colour, dash = colours[tid]
            equity = perf.traders[tid].final.equity
            out.append(f'<li>{_swatch(colour, dash)}{html.escape(tid)} '
                       f'<span class="muted">{_fmt_money(equity)}</span></li>')
        out.append("</ul>")
        if len(ranked) > len(plotted):
            out.append(f'<p class="muted">Showing the top {len(plotted)} of {len(ranked)} '
                       'traders by final equity; every trader is in the table below.</p>')
    else:
        out.append('<div class="empty" id="no-snapshots">No performance snapshots: '
                   'performance.csv has no rows.</div>')
    out.append("</section>\n")

    # ---- trader table
    out.append(_trader_table(trades, perf, ranked, unranked, colours))
    out.append('<footer>Generated by report.py from the run\'s CSV files. '
               'Times are UTC.</footer>\n</main>\n</body>\n</html>\n')
    return "".join(out)


def _change(first: float, last: float) -> str:
    if not first:
        return ""
    pct = (last - first) / abs(first) * 100
    return f"{pct:+.2f}% from first"


def _swatch(colour: str, dash: str) -> str:
    cls = "sw dashed" if dash else "sw"
    return f'<span class="{cls}" style="background-color:{colour}"></span>'


def _symbol_table(trades: TradeData) -> str:
    rows = []
    for symbol in sorted(trades.symbols):
        s = trades.symbols[symbol]
        d = s.decimals
        cells = [f'<td class="trader">{html.escape(symbol or "(none)")}</td>',
                 f'<td class="num">{len(s.ts):,}</td>', f'<td class="num">{s.volume:,}</td>',
                 f'<td class="num">{_fmt_price(s.vwap, d + 2)}</td>']
        cells += [f'<td class="num">{_fmt_price(v, d)}</td>'
                  for v in (s.price[0], s.price[-1], max(s.price), min(s.price))]
        rows.append(f'<tr data-symbol="{html.escape(symbol)}">{"".join(cells)}</tr>')
    head = "".join(f'<th class="num">{h}</th>' for h in
                   ("Trades", "Volume", "VWAP", "First", "Last", "High", "Low"))
    return ('<section><h2>Symbols</h2><div class="table-wrap"><table id="symbols"><thead>'
            f'<tr><th>Symbol</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
            '</div></section>\n')


def _trader_table(trades: TradeData, perf: PerformanceData, ranked: list[str],
                  unranked: list[str], colours: dict[str, tuple[str, str]]) -> str:
    headers = ["#", "Trader", "Position", "Cash", "Realized PnL"]
    if perf.has_unrealized:
        headers.append("Unrealized PnL")
    if perf.has_fees:
        headers.append("Fees")
    headers += ["Equity", "Trades", "Volume"]
    head = "".join(f'<th class="{"" if h == "Trader" else "num"}">{h}</th>' for h in headers)
    rows = []
    for rank, tid in enumerate(ranked + unranked, start=1):
        curve = perf.traders.get(tid)
        last = curve.last if curve else None
        activity = trades.traders.get(tid, TraderActivity())
        swatch = _swatch(*colours[tid]) if tid in colours else ""
        cells = [f'<td class="num">{rank}</td>',
                 f'<td class="trader" title="{html.escape(tid)}">{swatch}{html.escape(tid)}</td>']
        if last is None:
            blanks = 4 + perf.has_unrealized + perf.has_fees
            cells += ['<td class="num muted">—</td>'] * blanks
        else:
            cells.append(f'<td class="num">{_fmt_position(last.position)}</td>')
            cells.append(_money_cell(last.cash))
            cells.append(_money_cell(last.realized_pnl, signed=True))
            if perf.has_unrealized:
                cells.append(_money_cell(last.unrealized_pnl, signed=True))
            if perf.has_fees:
                cells.append(_money_cell(last.fees))
            cells.append(f'<td class="num"><b>{_fmt_money(last.equity)}</b></td>')
        cells.append(f'<td class="num">{activity.trades:,}</td>')
        cells.append(f'<td class="num">{activity.volume:,}</td>')
        rows.append(f'<tr data-trader="{html.escape(tid)}">{"".join(cells)}</tr>')
    if not rows:
        body = (f'<tr><td colspan="{len(headers)}" class="muted">No traders in either '
                'file.</td></tr>')
    else:
        body = "".join(rows)
    note = ""
    if unranked:
        note = ('<p class="muted">Traders without a row in performance.csv are listed last, '
                'with their trading activity only.</p>')
    return ('<section><h2>Traders by final equity</h2><div class="table-wrap">'
            f'<table id="traders"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
            f'</div>{note}</section>\n')


# ---------------------------------------------------------------------------- entry points


def build_report(data_dir: Path, out: Path | None = None, *,
                 max_traders: int = DEFAULT_MAX_TRADERS, skip_bad_rows: bool = False,
                 warn: Warn | None = None) -> Path:
    """Write the HTML report for the run in `data_dir` and return its path.

    `out` defaults to ``data_dir/report.html``; a directory means ``out/report.html``.
    Raises ReportError for a missing file, a bad header or (unless `skip_bad_rows`) a bad
    row, naming the file and line. Warnings (skipped rows, sorting) go to `warn`,
    stderr by default.
    """
    data_dir = Path(data_dir)
    warn = warn or _stderr
    if not 1 <= max_traders <= MAX_TRADERS_LIMIT:
        raise ReportError(f"max_traders must be between 1 and {MAX_TRADERS_LIMIT}, "
                          f"got {max_traders}")
    if not data_dir.is_dir():
        raise ReportError(f"data directory not found: {data_dir}")
    trades = read_trades(data_dir / TRADES_FILE, strict=not skip_bad_rows, warn=warn)
    perf = read_performance(data_dir / PERFORMANCE_FILE, strict=not skip_bad_rows, warn=warn)
    page = render_html(data_dir, trades, perf, max_traders)

    out = Path(out) if out is not None else data_dir / REPORT_FILE
    if out.is_dir():
        out = out / REPORT_FILE
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # Write a sibling temp file and rename it over the target, so a browser or
        # another program never sees half a report.
        fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".html.tmp", dir=out.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
                handle.write(page)
            # mkstemp makes the file private (0600); a report is meant to be shared.
            os.chmod(tmp, out.stat().st_mode & 0o777 if out.exists() else 0o644)
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise ReportError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="report.py",
        description="Turn a run's trades.csv and performance.csv into one self-contained "
                    "HTML page (inline SVG charts, no external resources).")
    parser.add_argument("--data-dir", required=True, type=Path, metavar="DIR",
                        help="the exchange's --data-dir, holding trades.csv and "
                             "performance.csv")
    parser.add_argument("--out", type=Path, metavar="PATH",
                        help="where to write the page (default: DIR/report.html)")
    parser.add_argument("--max-traders", type=int, default=DEFAULT_MAX_TRADERS, metavar="N",
                        help="equity lines to draw, best final equity first; the table "
                             f"always lists everyone (default: {DEFAULT_MAX_TRADERS}, "
                             f"at most {MAX_TRADERS_LIMIT})")
    parser.add_argument("--skip-bad-rows", action="store_true",
                        help="warn about and skip malformed rows (e.g. a line cut short by "
                             "a crash) instead of failing")
    args = parser.parse_args(argv)
    if not 1 <= args.max_traders <= MAX_TRADERS_LIMIT:
        parser.error(f"--max-traders must be between 1 and {MAX_TRADERS_LIMIT}")
    try:
        path = build_report(args.data_dir, args.out, max_traders=args.max_traders,
                            skip_bad_rows=args.skip_bad_rows)
    except ReportError as exc:
        print(f"report.py: error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
