"""report.py: the HTML report built from synthetic trades.csv / performance.csv files."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path

import pytest

import report
from report import ReportError, build_report, downsample

ROOT = Path(__file__).resolve().parent.parent
TRADES_HEADER = ("timestamp,price,qty,buy_trader,sell_trader,symbol,trade_id,aggressor,"
                 "buy_order_id,sell_order_id,seq")
PERF_HEADER = ("timestamp,trader_id,position,cash,realized_pnl,total_equity,unrealized_pnl,"
               "fees")
START = datetime(2026, 11, 23, 23, 0, tzinfo=timezone.utc)


def iso(seconds: float) -> str:
    return (START + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def trade(t: float, price: str, qty: int, buyer: str, seller: str, symbol: str = "SIM",
          n: int = 0) -> str:
    return f"{iso(t)},{price},{qty},{buyer},{seller},{symbol},{n},buy,{2 * n},{2 * n + 1},{n}"


def snap(t: float, trader: str, position: int, cash: str, realized: str, equity: str) -> str:
    return f"{iso(t)},{trader},{position},{cash},{realized},{equity},0,0.5"


def write_run(directory: Path, trades: list[str], perf: list[str],
              trades_header: str = TRADES_HEADER, perf_header: str = PERF_HEADER) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "trades.csv").write_text("\n".join([trades_header, *trades]) + "\n")
    (directory / "performance.csv").write_text("\n".join([perf_header, *perf]) + "\n")
    return directory


class PageParser(HTMLParser):
    """Pulls the summary values, the trader table's rows and the SVGs out of a report."""

    def __init__(self) -> None:
        super().__init__()
        self.stats: dict[str, str] = {}
        self.trader_rows: list[list[str]] = []
        self.svg_count = 0
        self.polylines: list[list[tuple[float, float]]] = []
        self._stat: str | None = None
        self._in_traders = False
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "svg":
            self.svg_count += 1
        elif tag == "polyline":
            self.polylines.append([(float(x), float(y)) for x, y in (
                pair.split(",") for pair in (a.get("points") or "").split())])
        elif "data-stat" in a:
            self._stat = a["data-stat"]
            self.stats[self._stat or ""] = ""
        elif tag == "table" and a.get("id") == "traders":
            self._in_traders = True
        elif self._in_traders and tag == "tr" and "data-trader" in a:
            self._row = []
        elif self._row is not None and tag == "td":
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "div":
            self._stat = None
        elif tag == "table":
            self._in_traders = False
        elif tag == "td" and self._row is not None and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.trader_rows.append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._stat is not None:
            self.stats[self._stat] += data
        if self._cell is not None:
            self._cell.append(data)


def parse(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    return parser


@pytest.fixture
def small_run(tmp_path: Path) -> Path:
    trades = [
        trade(0.0, "100.10", 3, "alice", "bob", n=1),
        trade(1.5, "100.30", 1, "carol", "alice", n=2),
        trade(2.0, "99.90", 2, "bob", "carol", n=3),
        trade(3.25, "100.00", 4, "alice", "bob", n=4),
    ]
    perf = [
        snap(0, "alice", 0, "1000000", "0", "1000000"),
        snap(0, "bob", 0, "1000000", "0", "1000000"),
        snap(0, "carol", 0, "1000000", "0", "1000000"),
        snap(5, "alice", 6, "999399.40", "0.20", "999999.40"),
        snap(5, "bob", -5, "1000500.30", "1.00", "1000000.30"),
        snap(5, "carol", -1, "1000100.30", "-0.50", "1000000.30"),
        # Final rows: the table must use these, not the earlier ones.
        snap(10, "alice", 6, "999399.40", "0.20", "1000123.45"),
        snap(10, "bob", -5, "1000500.30", "1.00", "999800.00"),
        snap(10, "carol", -1, "1000100.30", "-0.50", "1000050.10"),
    ]
    return write_run(tmp_path / "run", trades, perf)


def test_report_summary_numbers_and_charts(small_run: Path) -> None:
    out = build_report(small_run)
    assert out == small_run / "report.html"
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert page.rstrip().endswith("</html>")
    doc = parse(page)
    assert doc.svg_count == 2  # one price/volume chart, one equity chart
    assert doc.stats["trades"] == "4"
    assert doc.stats["volume"] == "10"
    # VWAP = (100.10*3 + 100.30*1 + 99.90*2 + 100.00*4) / 10 = 1000.40 / 10
    assert doc.stats["vwap"] == "100.0400"
    assert (doc.stats["first"], doc.stats["last"]) == ("100.10", "100.00")
    assert (doc.stats["high"], doc.stats["low"]) == ("100.30", "99.90")
    assert doc.stats["duration"] == "10 s"  # first trade at 0 s to last snapshot at 10 s
    assert doc.stats["traders"] == "3"


def test_report_is_self_contained(small_run: Path) -> None:
    page = build_report(small_run).read_text(encoding="utf-8")
    # Nothing fetched from anywhere: no scripts, stylesheets, fonts or images by URL.
    for forbidden in ("<script", "<link", "@import", "url(", "src="):
        assert forbidden not in page
    urls = set(re.findall(r"https?://[^\"' )]+", page))
    assert urls == {"http://www.w3.org/2000/svg"}  # the SVG namespace, never fetched


def test_table_sorted_by_final_equity_with_trade_counts(small_run: Path) -> None:
    doc = parse(build_report(small_run).read_text(encoding="utf-8"))
    # columns: #, trader, position, cash, realized, unrealized, fees, equity, trades, volume
    rows = [(r[1], r[2], r[4], r[7], r[8], r[9]) for r in doc.trader_rows]
    assert rows == [
        ("alice", "6", "0.20", "1,000,123.45", "3", "8"),
        ("carol", "-1", "-0.50", "1,000,050.10", "2", "3"),
        ("bob", "-5", "1.00", "999,800.00", "3", "9"),
    ]


def test_trader_ids_are_escaped(tmp_path: Path) -> None:
    evil = "<script>alert(1)</script>"
    amp = 'a&b"c'
    run = write_run(tmp_path, [trade(0, "10.00", 1, evil, amp)],
                    [snap(0, evil, 1, "0", "0", "5"), snap(0, amp, -1, "0", "0", "7")])
    page = build_report(run).read_text(encoding="utf-8")
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "a&amp;b&quot;c" in page
    doc = parse(page)
    # Escaping is exact: the parsed text is the original id, in equity order.
    assert [r[1] for r in doc.trader_rows] == [amp, evil]


def test_traders_only_in_trades_are_listed_after_ranked_ones(tmp_path: Path) -> None:
    run = write_run(tmp_path, [trade(0, "10.00", 2, "ghost", "alice"),
                               trade(1, "10.00", 3, "alice", "zed")],
                    [snap(1, "alice", 1, "990", "0", "1000")])
    doc = parse(build_report(run).read_text(encoding="utf-8"))
    assert [(r[1], r[-2], r[-1]) for r in doc.trader_rows] == [
        ("alice", "2", "5"), ("ghost", "1", "2"), ("zed", "1", "3")]


def test_empty_files_give_a_no_trades_page(tmp_path: Path) -> None:
    run = write_run(tmp_path, [], [])
    page = build_report(run).read_text(encoding="utf-8")
    assert 'id="no-trades"' in page
    assert "No trades" in page
    assert 'id="no-snapshots"' in page
    doc = parse(page)
    assert doc.svg_count == 0
    assert doc.stats["trades"] == "0"
    assert "vwap" not in doc.stats


def test_trades_without_snapshots_still_chart_prices(tmp_path: Path) -> None:
    run = write_run(tmp_path, [trade(0, "10.00", 1, "a", "b"), trade(1, "11.00", 1, "b", "a")],
                    [])
    page = build_report(run).read_text(encoding="utf-8")
    doc = parse(page)
    assert doc.svg_count == 1
    assert 'id="no-snapshots"' in page
    assert 'id="no-trades"' not in page


def test_only_the_guaranteed_columns_are_needed(tmp_path: Path) -> None:
    # The contract guarantees only the leading columns; extra unknown ones are ignored.
    run = write_run(
        tmp_path,
        [f"{iso(0)},50.5,2,a,b,x", f"{iso(1)},51.5,2,b,a,y"],
        [f"{iso(1)},a,0,100,1,102.5", f"{iso(1)},b,0,100,-1,97.5"],
        trades_header="timestamp,price,qty,buy_trader,sell_trader,future_column",
        perf_header="timestamp,trader_id,position,cash,realized_pnl,total_equity")
    page = build_report(run).read_text(encoding="utf-8")
    doc = parse(page)
    assert doc.stats["vwap"] == "51.0000"
    assert [r[1] for r in doc.trader_rows] == ["a", "b"]
    assert "Unrealized" not in page  # no column, no invented values


def test_several_symbols_get_a_chart_and_a_vwap_each(tmp_path: Path) -> None:
    run = write_run(tmp_path, [trade(0, "10.00", 1, "a", "b", "AAA"),
                               trade(1, "20.00", 3, "b", "a", "BBB"),
                               trade(2, "12.00", 1, "a", "b", "AAA")],
                    [snap(2, "a", 0, "0", "0", "1")])
    page = build_report(run).read_text(encoding="utf-8")
    assert parse(page).svg_count == 3
    assert "Price and volume: AAA" in page and "Price and volume: BBB" in page
    # A cross-symbol VWAP is meaningless: each symbol gets its own row instead.
    assert 'data-stat="vwap"' not in page
    aaa = re.search(r'<tr data-symbol="AAA">(.*?)</tr>', page)
    assert aaa is not None
    assert re.findall(r">([^<>]+)</td>", aaa.group(1)) == [
        "AAA", "2", "2", "11.0000", "10.00", "12.00", "12.00", "10.00"]


def test_many_traders_are_capped_in_the_chart_but_all_in_the_table(tmp_path: Path) -> None:
    perf = [snap(t, f"t{i:02d}", 0, "0", "0", str(1000 + i)) for t in (0, 5) for i in range(25)]
    run = write_run(tmp_path, [trade(0, "1.00", 1, "t00", "t01"),
                               trade(5, "1.10", 1, "t01", "t00")], perf)
    page = build_report(run, max_traders=10).read_text(encoding="utf-8")
    doc = parse(page)
    assert len(doc.polylines) == 1 + 10  # the price line and the top ten equities
    assert len(doc.trader_rows) == 25
    assert doc.trader_rows[0][1] == "t24"
    legend = re.search(r'<ul class="legend">(.*?)</ul>', page)
    assert legend is not None
    assert "t24" in legend.group(1) and "t15" in legend.group(1)
    assert "t14" not in legend.group(1)
    assert "top 10 of 25" in page


def test_missing_file_is_named(tmp_path: Path) -> None:
    run = write_run(tmp_path, [], [])
    (run / "performance.csv").unlink()
    with pytest.raises(ReportError, match=r"missing file: .*performance\.csv"):
        build_report(run)
    with pytest.raises(ReportError, match="data directory not found"):
        build_report(tmp_path / "nope")


@pytest.mark.parametrize(("which", "header", "column"), [
    ("trades.csv", "timestamp,px,qty,buy_trader,sell_trader", "price"),
    ("performance.csv", "timestamp,trader,position,cash,realized_pnl,total_equity",
     "trader_id"),
])
def test_bad_header_names_file_and_column(tmp_path: Path, which: str, header: str,
                                          column: str) -> None:
    run = write_run(tmp_path, [], [])
    (run / which).write_text(header + "\n")
    with pytest.raises(ReportError) as info:
        build_report(run)
    message = str(info.value)
    assert which in message
    assert f"missing column '{column}'" in message


@pytest.mark.parametrize(("which", "bad_line", "expected"), [
    ("trades.csv", f"{iso(1)},100.00,abc,a,b", "bad qty 'abc'"),
    ("trades.csv", f"{iso(1)},100.00,0,a,b", "bad qty '0'"),
    ("trades.csv", f"{iso(1)},ten,1,a,b", "bad price 'ten'"),
    ("trades.csv", f"{iso(1)},nan,1,a,b", "bad price 'nan'"),
    ("trades.csv", "yesterday,100.00,1,a,b", "bad timestamp 'yesterday'"),
    ("trades.csv", f"{iso(1)},100.0", "expected at least 5 fields, got 2"),
    ("trades.csv", f"{iso(1)},100.00,1,,b", "empty buy_trader"),
    ("performance.csv", f"{iso(1)},a,0,100,0,lots", "bad total_equity 'lots'"),
])
def test_bad_row_names_its_line(tmp_path: Path, which: str, bad_line: str,
                                expected: str) -> None:
    good_trades = [trade(0, "100.00", 1, "a", "b")]
    good_perf = [snap(0, "a", 0, "100", "0", "100")]
    run = write_run(tmp_path, good_trades, good_perf)
    path = run / which
    # Header on line 1, a good row on line 2, a blank line 3, the bad row on line 4.
    path.write_text(path.read_text() + "\n" + bad_line + "\n")
    with pytest.raises(ReportError) as info:
        build_report(run)
    assert f"{which} line 4: {expected}" in str(info.value)


def test_skip_bad_rows_warns_and_keeps_the_good_ones(tmp_path: Path) -> None:
    run = write_run(tmp_path, [trade(0, "100.00", 1, "a", "b"), f"{iso(1)},100.0",
                               trade(2, "102.00", 1, "b", "a")],
                    [snap(2, "a", 0, "100", "0", "100")])
    warnings: list[str] = []
    page = build_report(run, skip_bad_rows=True, warn=warnings.append).read_text()
    assert parse(page).stats["trades"] == "2"
    assert len(warnings) == 1
    assert "line 3" in warnings[0]


def test_rows_out_of_time_order_are_sorted_with_a_warning(tmp_path: Path) -> None:
    run = write_run(tmp_path, [trade(5, "105.00", 1, "a", "b"), trade(0, "100.00", 1, "b", "a")],
                    [snap(5, "a", 0, "0", "0", "1")])
    warnings: list[str] = []
    doc = parse(build_report(run, warn=warnings.append).read_text())
    assert (doc.stats["first"], doc.stats["last"]) == ("100.00", "105.00")
    assert any("not in time order" in w for w in warnings)


def test_same_input_gives_the_same_bytes(small_run: Path, tmp_path: Path) -> None:
    first = build_report(small_run, tmp_path / "one.html").read_bytes()
    second = build_report(small_run, tmp_path / "two.html").read_bytes()
    assert first == second


def test_out_path_may_be_a_new_directory_tree(small_run: Path, tmp_path: Path) -> None:
    out = build_report(small_run, tmp_path / "a" / "b" / "r.html")
    assert out == tmp_path / "a" / "b" / "r.html"
    assert out.stat().st_size > 0
    assert not list(out.parent.glob(".report-*"))  # the temporary file was renamed away


@pytest.mark.parametrize("text", [
    "2026-11-23T23:59:01.123456Z",  # the exchange's format (the cached fast path)
    "2026-11-23T23:59:01.123456+00:00",
    "2026-11-24T00:59:01.123456+01:00",
    "2026-11-23T23:59:01.123456",  # no zone: the exchange writes UTC
    " 2026-11-23T23:59:01.123456Z ",
])
def test_timestamps_parse_to_exact_utc_microseconds(text: str) -> None:
    expected = int(datetime(2026, 11, 23, 23, 59, 1, tzinfo=timezone.utc).timestamp())
    assert report._parse_ts(text) == expected * 1_000_000 + 123_456


def test_downsample_keeps_extremes_and_bounds_points() -> None:
    xs = list(range(100_000))
    ys = [float((i * 7919) % 1000) for i in xs]
    ys[31_337] = 5000.0
    ys[77_777] = -5000.0
    keep = downsample(xs, ys, 250)
    assert len(keep) <= 1000
    assert keep == sorted(set(keep))
    assert {0, 99_999, 31_337, 77_777} <= set(keep)
    assert downsample(xs[:50], ys[:50], 250) == list(range(50))


def test_100k_trades_give_a_bounded_page(tmp_path: Path) -> None:
    n = 100_000
    traders = [f"bot{i}" for i in range(8)]
    trades = [trade(i * 0.01, f"{100 + (i % 500) / 100:.2f}", 1 + i % 9,
                    traders[i % 8], traders[(i + 3) % 8], n=i) for i in range(n)]
    trades[54_321] = trade(543.21, "150.00", 1, "bot0", "bot1")
    perf = [snap(t, tid, 0, "0", "0", str(1000 + t)) for t in range(0, 1000, 5) for tid in traders]
    run = write_run(tmp_path, trades, perf)
    page = build_report(run).read_text(encoding="utf-8")
    doc = parse(page)
    assert doc.stats["trades"] == "100,000"
    assert doc.stats["high"] == "150.00"
    price_line, *equity_lines = doc.polylines
    assert len(price_line) <= 4 * report.PRICE_BUCKETS
    assert sum(map(len, equity_lines)) <= report.EQUITY_POINT_BUDGET
    # The one-trade spike survives downsampling: the line reaches 150, the axis top.
    axis_top = re.search(r'<text class="ylab" x="[\d.]+" y="([\d.]+)">150</text>', page)
    assert axis_top is not None
    assert min(y for _, y in price_line) == pytest.approx(float(axis_top.group(1)) - 3.5)
    assert len(page) < 250_000


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "report.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_cli_writes_the_report_and_prints_its_path(small_run: Path) -> None:
    result = run_cli("--data-dir", str(small_run), cwd=small_run.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(small_run / "report.html")
    assert (small_run / "report.html").is_file()


def test_cli_errors_exit_non_zero_with_a_message(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", [], [])
    (run / "trades.csv").unlink()
    result = run_cli("--data-dir", str(run), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "error: missing file:" in result.stderr and "trades.csv" in result.stderr
    assert "Traceback" not in result.stderr

    usage = run_cli("--data-dir", str(run), "--max-traders", "0", cwd=tmp_path)
    assert usage.returncode == 2
    assert "--max-traders" in usage.stderr


def test_cli_help() -> None:
    result = run_cli("--help", cwd=ROOT)
    assert result.returncode == 0
    assert "--data-dir" in result.stdout and "--out" in result.stdout
