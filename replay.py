"""Replay the exchange's journal: crash recovery for ``exchange_server.py``, and a CLI.

The engine is deterministic, so re-applying the journaled inputs with their journaled
timestamps rebuilds every event, the same ``seq`` numbers and the same telemetry rows.

    python replay.py --data-dir runs/demo --out-dir /tmp/replayed
        rebuilds trades.csv and performance.csv from the journal alone; they equal the
        live run's byte for byte (for a data dir whose journal goes back to its start)
    python replay.py --data-dir runs/demo --until-seq 1200
        stops after event 1200 and prints the book (L2 per symbol, best first) and every
        trader's positions there

Both print ``state_hash: <sha256>`` (``Engine.state_hash()`` where the replay stopped),
which the exchange also logs after recovery and at shutdown.

Recovery (``recover``) is the same replay started from the newest usable snapshot: the
journal tail after it is applied, then the CSV files are reconciled with what the tail
produced (a torn last row is dropped, missing rows are appended, nothing before is
rewritten) and the journal's last segment is reopened for appending.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pickle
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from config import ConfigError, ExchangeConfig, config_from_dict
from engine import Engine
from journal import (
    LEADERBOARD,
    PERFORMANCE,
    Entry,
    JournalError,
    JournalReader,
    JournalWriter,
    core_fingerprint,
    fsync_dir,
    journal_dir,
    list_snapshots,
    peek_header,
    read_snapshot,
    remove_temp_files,
)
from models import REJECT_EVENTS, Event, Side, Trade, event_to_dict
from positions import to_currency
from telemetry import (
    PERFORMANCE_FILE,
    PERFORMANCE_HEADER,
    TRADES_FILE,
    TRADES_HEADER,
    CsvFormatter,
    PriceFormatter,
    Telemetry,
    csv_line,
    iso_utc,
    money_str,
    performance_rows,
)

log = logging.getLogger("replay")

Sink = Callable[[bytes], Any]


def engine_config(config: ExchangeConfig) -> dict[str, Any]:
    """The part of the configuration the engine's behaviour depends on (the ``server``
    section only paces the timers, whose ticks are journaled; ``latency`` only decides
    when inputs are sequenced, and the journal holds them as sequenced)."""
    data = dataclasses.asdict(config)
    data.pop("server", None)
    data.pop("latency", None)
    return orjson.loads(orjson.dumps(data))  # as the journal's JSON header holds it


def leaderboard_message(engine: Engine, seq: int, ts: int) -> dict[str, Any]:
    """The sequenced ``leaderboard`` event of the internal stream (money in currency)."""
    rows = [{"trader_id": row["trader_id"], "position": row["position"],
             "cash": to_currency(row["cash"]), "realized_pnl": to_currency(row["realized_pnl"]),
             "equity": to_currency(row["equity"])} for row in engine.leaderboard()]
    return {"type": "leaderboard", "seq": seq, "ts": ts, "rows": rows}


class Replayer:
    """Applies journaled inputs to an engine exactly as the live exchange did: the same
    ``seq`` numbering, the same CSV rows (to ``trade_sink`` and ``performance_sink``),
    and optionally every event (to ``on_event``, as the internal stream carries it)."""

    def __init__(self, engine: Engine, seq: int, formatter: CsvFormatter, trade_sink: Sink,
                 performance_sink: Sink,
                 on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.engine = engine
        self.seq = seq
        self.number = 0  # last input applied
        self.ts = 0
        self.format = formatter
        self.trade_sink = trade_sink
        self.performance_sink = performance_sink
        self.on_event = on_event

    def apply(self, entry: Entry) -> None:
        if entry.seq != self.seq:
            raise JournalError(
                f"{entry.where()}: journaled after event {entry.seq}, but the replay is at "
                f"event {self.seq}: this engine does not reproduce the run (was the matching "
                "code or the configuration changed?)")
        if entry.command is not None:
            self._publish(self._process(entry))
        elif entry.kind == LEADERBOARD:
            self.seq += 1
            if self.on_event is not None:
                self.on_event(leaderboard_message(self.engine, self.seq, entry.ts))
        elif entry.kind == PERFORMANCE:
            self.performance_sink(self.format.performance(entry.ts,
                                                          performance_rows(self.engine)))
        self.number = entry.number
        self.ts = entry.ts

    def _process(self, entry: Entry) -> list[Event]:
        try:
            return self.engine.process(entry.command, entry.ts)  # type: ignore[arg-type]
        except Exception:
            # the live exchange answered INTERNAL_ERROR and published nothing; the same
            # bug does the same partial work here, so the states stay equal
            log.exception("%s: the engine failed on %r, as it did live", entry.where(),
                          entry.command)
            return []

    def _publish(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, REJECT_EVENTS):
                continue
            self.seq += 1
            if type(event) is Trade:
                self.trade_sink(self.format.trade(event, self.seq))
            if self.on_event is not None:
                self.on_event(event_to_dict(event, self.seq))

    def would_sequence(self, entry: Entry) -> bool:
        """Whether applying ``entry`` would produce at least one sequenced event (tried on
        a copy of the engine; the real one is untouched)."""
        if entry.command is None:
            return entry.kind == LEADERBOARD
        trial: Engine = pickle.loads(pickle.dumps(self.engine, pickle.HIGHEST_PROTOCOL))
        try:
            events = trial.process(entry.command, entry.ts)
        except Exception:
            return False
        return any(not isinstance(event, REJECT_EVENTS) for event in events)


def apply_until(replayer: Replayer, entries: Iterable[Entry], until_seq: int | None) -> int:
    """Apply entries in order; with ``until_seq``, stop before the first input that would
    produce an event numbered above it (an input's events are never split). Returns the
    number of inputs applied."""
    applied = 0
    pending: Entry | None = None
    for entry in entries:
        if pending is not None:
            # the next input's seq tells whether `pending` produced events
            if until_seq is not None and pending.seq >= until_seq and entry.seq > pending.seq:
                return applied
            replayer.apply(pending)
            applied += 1
        pending = entry
    if pending is not None and (until_seq is None or pending.seq < until_seq
                                or not replayer.would_sequence(pending)):
        replayer.apply(pending)
        applied += 1
    return applied


# ===================================================================== recovery


@dataclass
class Recovered:
    """The exchange's state rebuilt from ``--data-dir``, ready to continue."""

    engine: Engine
    seq: int
    last_ts: int
    journal: JournalWriter
    telemetry: Telemetry
    inputs: int  # inputs journaled so far
    snapshot_at: int | None  # the snapshot recovery started from, if any
    replayed: int  # inputs applied after it
    seconds: float

    def summary(self) -> str:
        start = "an empty exchange" if self.snapshot_at is None else \
            f"the snapshot at input #{self.snapshot_at}"
        return (f"recovered {self.inputs} journaled inputs ({start} + {self.replayed} "
                f"replayed) in {self.seconds:.3f} s: seq {self.seq}, next order id "
                f"{self.engine.next_order_id}, next trade id {self.engine.next_trade_id}, "
                f"state_hash={self.engine.state_hash()}")


@dataclass
class _Start:
    engine: Engine
    seq: int
    ts: int
    number: int
    trades_offset: int
    performance_offset: int
    snapshot_at: int | None
    check: tuple[int, str] | None = None  # (input number, state hash) a replay must meet


def segment_header(seq: int, ts: int, sizes: tuple[int, int],
                   config: ExchangeConfig) -> dict[str, Any]:
    return {"seq": seq, "ts": ts, "trades_offset": sizes[0], "performance_offset": sizes[1],
            "config": engine_config(config)}


def recover(data_dir: Path, config: ExchangeConfig) -> Recovered:
    """Rebuild the exchange from ``data_dir`` (or start a journal there)."""
    started = time.perf_counter()
    directory = journal_dir(data_dir)
    if directory.is_dir():
        remove_temp_files(directory)
    reader = JournalReader(directory)
    if not reader.segments and list_snapshots(directory):
        raise JournalError(f"{directory} has snapshots but no journal segments: they were "
                           "removed; restore them or start on a new --data-dir")
    if not reader.segments or _only_headerless_segment(reader):
        return _fresh(data_dir, config, started)
    start = _starting_point(reader, directory, config)
    formatter = CsvFormatter(config.instruments)
    trades: list[bytes] = []
    performance: list[bytes] = []
    replayer = Replayer(start.engine, start.seq, formatter, trades.append, performance.append)
    replayed = 0
    for entry in reader.entries(after=start.number):
        replayer.apply(entry)
        replayed += 1
        if start.check is not None and entry.number == start.check[0]:
            _verify(replayer, start.check)
    if reader.last_number < start.number:
        raise JournalError(f"{directory}: a snapshot covers input #{start.number} but the "
                           f"journal ends at #{reader.last_number}: journal records were lost")
    if reader.torn is not None:
        log.warning("%s: dropped a torn last record (a write the crash interrupted; it was "
                    "never acknowledged): %s",
                    reader.dropped_empty or reader.last_segment.path,  # type: ignore[union-attr]
                    reader.torn)
    reconcile_csv(data_dir / TRADES_FILE, start.trades_offset, trades)
    reconcile_csv(data_dir / PERFORMANCE_FILE, start.performance_offset, performance)
    journal = _reopen(reader, directory)
    telemetry = Telemetry(data_dir, config.instruments)
    last_ts = replayer.ts if replayed else start.ts
    return Recovered(replayer.engine, replayer.seq, last_ts, journal, telemetry,
                     reader.last_number, start.snapshot_at, replayed,
                     time.perf_counter() - started)


def _only_headerless_segment(reader: JournalReader) -> bool:
    """A journal whose only segment was being created when the process died."""
    if len(reader.segments) != 1:
        return False
    path = reader.segments[0][1]
    if peek_header(path) is not None:
        return False
    log.warning("%s: removing a journal segment the crash left without a header", path)
    path.unlink()
    return True


def _fresh(data_dir: Path, config: ExchangeConfig, started: float) -> Recovered:
    for name in (TRADES_FILE, PERFORMANCE_FILE):
        drop_torn_row(data_dir / name)
    telemetry = Telemetry(data_dir, config.instruments)
    sizes = telemetry.sizes()
    if sizes[0] > len(csv_line(TRADES_HEADER)):
        log.warning("%s already holds trades of a run without a journal; this run's trade "
                    "ids start again at 1", data_dir / TRADES_FILE)
    journal = JournalWriter.create(journal_dir(data_dir), 1,
                                   segment_header(0, 0, sizes, config))
    log.info("started a new journal in %s", journal_dir(data_dir))
    return Recovered(Engine(config), 0, 0, journal, telemetry, 0, None, 0,
                     time.perf_counter() - started)


def _starting_point(reader: JournalReader, directory: Path, config: ExchangeConfig) -> _Start:
    """The newest snapshot that loads and fits this code, else the journal's start."""
    wanted = engine_config(config)
    fingerprint = core_fingerprint()
    check = None
    for number, path in reversed(list_snapshots(directory)):
        try:
            state = read_snapshot(path)
        except JournalError as exc:
            log.warning("skipping snapshot: %s", exc)
            continue
        _check_config(state["config"], wanted, path)
        if state["fingerprint"] != fingerprint:
            log.warning("%s was written by other matching-engine code: replaying the journal "
                        "from its start instead, and checking it reproduces the snapshot", path)
            check = check or (number, state["state_hash"])
            continue
        engine = state["engine"]
        if engine.state_hash() != state["state_hash"]:
            log.warning("%s: the loaded state does not match its hash; skipping it", path)
            continue
        return _Start(engine, state["seq"], state["ts"], number, state["trades_offset"],
                      state["performance_offset"], number, check)
    header = reader.first_header()
    if header["first"] != 1:
        raise JournalError(f"{directory}: no usable snapshot, and the journal starts at input "
                           f"#{header['first']}: the inputs before it are gone")
    _check_config(header["config"], wanted, reader.segments[0][1])
    return _Start(Engine(config), header["seq"], header["ts"], 0, header["trades_offset"],
                  header["performance_offset"], None, check)


def _check_config(journaled: dict[str, Any], wanted: dict[str, Any], path: Path) -> None:
    if journaled == wanted:
        return
    changed = sorted(key for key in set(journaled) | set(wanted)
                     if journaled.get(key) != wanted.get(key))
    raise JournalError(f"{path}: this data dir was written with a different configuration "
                       f"(sections differing: {', '.join(changed)}); the engine's configuration "
                       "cannot change across a restart: use the original --config or a new "
                       "--data-dir")


def _verify(replayer: Replayer, check: tuple[int, str]) -> None:
    if replayer.engine.state_hash() != check[1]:
        raise JournalError(f"replaying the journal with this code gives a different state at "
                           f"input #{check[0]} than the snapshot taken there: the matching "
                           "code's behaviour changed since the journal was written")


def _reopen(reader: JournalReader, directory: Path) -> JournalWriter:
    if reader.dropped_empty is not None:
        log.warning("%s: removing a journal segment the crash left without a header",
                    reader.dropped_empty)
        reader.dropped_empty.unlink()
        fsync_dir(directory)
    assert reader.last_segment is not None
    return JournalWriter.reopen(directory, reader.last_segment, reader.last_number + 1)


def drop_torn_row(path: Path) -> None:
    """Cut a last row that a crash left without its newline."""
    if not path.exists():
        return
    with open(path, "r+b") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            log.warning("%s: dropping a torn last row (%d bytes)", path, len(data) - cut)
            f.truncate(cut)


def reconcile_csv(path: Path, offset: int, rows: list[bytes]) -> None:
    """Make ``path`` hold its first ``offset`` bytes followed by exactly ``rows``: the
    rows already there are checked, a torn last row is dropped, missing rows appended.
    Earlier rows are never rewritten; a complete row that differs is an error."""
    expected = b"".join(rows)
    size = path.stat().st_size if path.exists() else 0
    if size < offset:
        raise JournalError(f"{path} has {size} bytes but {offset} were written before the "
                           "journal's recovery point: it was truncated or replaced (restore "
                           "it, or move it aside together with the journal)")
    with open(path, "r+b") as f:
        f.seek(offset)
        actual = f.read()
        common = _common_prefix(actual, expected)
        cut = actual.rfind(b"\n", 0, common) + 1  # the last row boundary both agree on
        if b"\n" in actual[cut:]:
            raise JournalError(
                f"{path}: the row at byte offset {offset + cut} is not the one the journal "
                "reproduces (the file was edited, or holds rows the journal does not): "
                "refusing to rewrite it")
        if len(actual) > cut:
            log.warning("%s: dropping a torn last row (%d bytes)", path, len(actual) - cut)
            f.truncate(offset + cut)
        missing = expected[cut:]
        if missing:
            f.seek(offset + cut)
            f.write(missing)
            log.info("%s: appended %d rows the crash kept from being written", path,
                     missing.count(b"\n"))
        f.flush()
        os.fsync(f.fileno())


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    low, high = 0, n  # binary search on slices: C-speed compares, log steps
    while low < high:
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low


# ===================================================================== the CLI


def replay_run(data_dir: Path, out_dir: Path | None, until_seq: int | None,
               events_file: Path | None = None) -> Replayer:
    """Replay ``data_dir``'s journal from its start into ``out_dir``'s CSV files."""
    reader = JournalReader(journal_dir(data_dir))
    header = reader.first_header()
    if header["first"] != 1:
        raise JournalError(f"{reader.directory}: the journal starts at input "
                           f"#{header['first']}; a full replay needs it from #1")
    try:
        config = config_from_dict(header["config"])
    except ConfigError as exc:
        raise JournalError(f"{reader.segments[0][1]}: bad configuration in header: {exc}") \
            from None
    with _Outputs(out_dir, events_file) as out:
        replayer = Replayer(Engine(config), header["seq"], CsvFormatter(config.instruments),
                            out.trades, out.performance, out.event if events_file else None)
        replayer.ts = header["ts"]
        apply_until(replayer, reader.entries(), until_seq)
    if reader.torn is not None:
        log.warning("the journal ends with a torn record (ignored): %s", reader.torn)
    return replayer


class _Outputs:
    """The replay's output files: fresh CSVs (header + rows) and optional events."""

    def __init__(self, out_dir: Path | None, events_file: Path | None) -> None:
        self.files: list[BinaryIO] = []
        self._trades = self._performance = self._events = None
        targets = [events_file] if events_file is not None else []
        if out_dir is not None:
            targets += [out_dir / TRADES_FILE, out_dir / PERFORMANCE_FILE]
        for path in targets:
            if path.exists():  # checked first, so a refusal leaves nothing half-written
                raise FileExistsError(f"{path} already exists; replay writes new files only")
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            self._trades = self._open(out_dir / TRADES_FILE, csv_line(TRADES_HEADER))
            self._performance = self._open(out_dir / PERFORMANCE_FILE,
                                           csv_line(PERFORMANCE_HEADER))
        if events_file is not None:
            self._events = self._open(events_file, b"")

    def _open(self, path: Path, header: bytes) -> BinaryIO:
        f = open(path, "xb")  # noqa: SIM115 - closed in __exit__; never overwrite a run
        self.files.append(f)
        f.write(header)
        return f

    def trades(self, data: bytes) -> None:
        if self._trades is not None:
            self._trades.write(data)

    def performance(self, data: bytes) -> None:
        if self._performance is not None:
            self._performance.write(data)

    def event(self, message: dict[str, Any]) -> None:
        assert self._events is not None
        self._events.write(orjson.dumps(message) + b"\n")

    def __enter__(self) -> _Outputs:
        return self

    def __exit__(self, *_: object) -> None:
        for f in self.files:
            f.close()


def _table(rows: Sequence[Sequence[str]], right: Iterable[int]) -> Iterator[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    aligned = set(right)
    for row in rows:
        yield "  ".join(cell.rjust(w) if i in aligned else cell.ljust(w)
                        for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()


def describe_state(replayer: Replayer, until_seq: int | None = None) -> str:
    """The book (L2 per symbol, best first) and every trader's positions, as text."""
    engine = replayer.engine
    prices = PriceFormatter(engine.config.instruments)
    lines = [f"after input #{replayer.number} (seq {replayer.seq}, ts {replayer.ts}"
             f"{', ' + iso_utc(replayer.ts) if replayer.ts else ''})"]
    if until_seq is not None and replayer.seq > until_seq:
        lines.append(f"(event {until_seq} is one of several events of one input: inputs are "
                     "applied whole, with the inputs after them that produce no event)")
    lines.append("")
    for symbol in engine.symbols:
        book = engine.books[symbol]
        bids, asks = book.depth(Side.BUY), book.depth(Side.SELL)
        lines.append(f"book {symbol} (L2, best first; open: {engine.market_open[symbol]})")
        rows = [["bid qty", "bid", "ask", "ask qty"]]
        for i in range(max(len(bids), len(asks))):
            bid = bids[i] if i < len(bids) else None
            ask = asks[i] if i < len(asks) else None
            rows.append([str(bid[1]) if bid else "", prices(symbol, bid[0]) if bid else "",
                         prices(symbol, ask[0]) if ask else "", str(ask[1]) if ask else ""])
        lines.extend(_table(rows, right=(0, 1, 2, 3)) if len(rows) > 1 else ["(empty)"])
        lines.append("")
    lines.append("positions")
    traders = sorted(set(engine.traders) | set(engine.ledger.accounts))
    rows = [["trader", "symbol", "position", "avg_price", "cash", "realized_pnl",
             "unrealized_pnl", "equity", "fees", "open_orders", "status"]]
    for trader_id in traders:
        for symbol in engine.symbols:
            r = engine.position_report(trader_id, symbol)
            held = engine.ledger.view(trader_id).positions.get(symbol)
            average = prices.average(symbol, held.open_cost, held.qty) \
                if held is not None and held.qty else "-"
            rows.append([trader_id, symbol, str(r.position), average,
                         money_str(r.cash), money_str(r.realized_pnl),
                         money_str(r.unrealized_pnl), money_str(r.equity), money_str(r.fees),
                         str(len(engine.open_orders(trader_id, symbol))),
                         engine.trader_status(trader_id).value])
    lines.extend(_table(rows, right=range(2, 10)) if len(rows) > 1 else ["(no traders)"])
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Replay an exchange journal: rebuild trades.csv and performance.csv, "
                    "or show the book and positions at any seq.")
    parser.add_argument("--data-dir", required=True, type=Path,
                        help="the exchange's --data-dir (its journal/ is read, never changed)")
    parser.add_argument("--out-dir", type=Path,
                        help="write trades.csv and performance.csv here (new files only)")
    parser.add_argument("--until-seq", type=int, metavar="N",
                        help="stop after event N and print the book and positions there")
    parser.add_argument("--events", type=Path, metavar="FILE",
                        help="also write every sequenced event as JSON lines (new file)")
    parser.add_argument("--log-level", default="WARNING",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="(%(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.until_seq is not None and args.until_seq < 0:
        print("replay: --until-seq must be >= 0", file=sys.stderr)
        return 2
    if args.out_dir is not None and args.out_dir.resolve() == args.data_dir.resolve():
        print("replay: --out-dir must not be the --data-dir (it would overwrite the run's "
              "files)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        replayer = replay_run(args.data_dir, args.out_dir, args.until_seq, args.events)
    except (JournalError, FileExistsError) as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    if args.until_seq is not None:
        print(describe_state(replayer, args.until_seq))
        print()
    print(f"replayed {replayer.number} inputs to seq {replayer.seq} in "
          f"{time.perf_counter() - started:.3f} s")
    print(f"state_hash: {replayer.engine.state_hash()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
