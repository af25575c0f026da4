"""Run a battle of trading bots against a running exchange and market-data relay.

    python bot_battle_runner.py --config bots_config.json --duration 60 --seed 42

The config is JSON::

    {
      "symbol": "SIM",                 optional, default SIM
      "reference_price": 10000,        optional: fair price before any trade (ticks)
      "price_band_pct": 10.0,          optional: the exchange's price band
      "timer_interval_s": 0.5,         optional: default on_timer period
      "bots": [
        {"name": "mm", "class": "bot_strategies:MarketMaker", "count": 3,
         "params": {"size": 10}, "seed": 7, "timer_interval_s": 0.25}
      ]
    }

``class`` is ``module:Class``, imported from the current directory or PYTHONPATH (a
bare name such as ``MarketMaker`` means a built-in strategy). ``count`` > 1 runs
replicas named ``name-1``, ``name-2``...; each bot gets its own connections, trader id
and seed, derived from ``--seed`` (or the bot's ``seed``) and its index. A bot whose
strategy raises is stopped and logged; the others go on. At the end every bot's orders
are canceled and a leaderboard (from each bot's last position report) is printed.

``--lockstep`` runs the battle in simulated time against an exchange started with
``--clock sim``: every bot (in every worker process) joins the exchange's lockstep,
announcing how many bots the battle has, so the first step waits for all of them;
``--duration`` then counts simulated seconds, and the battle runs as fast as the bots
answer. The same config and ``--seed`` give the same trades, byte for byte.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import importlib
import json
import logging
import multiprocessing
import os
import queue
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot_client import (
    DEFAULT_EXCHANGE_URI,
    DEFAULT_MARKET_DATA_URI,
    BotClient,
    BotContext,
    BotResult,
)
from bot_strategies import BUILTIN_STRATEGIES, ParamError
from launcher import run_event_loop, stop_on_signals
from models import TRADER_ID_RE

log = logging.getLogger("bot_battle_runner")

PROG = "bot_battle_runner"
DEFAULT_CONFIG = "bots_config.json"
MAX_COUNT = 1000
TOP_KEYS = ("bots", "price_band_pct", "reference_price", "symbol", "timer_interval_s")
BOT_KEYS = ("class", "count", "name", "params", "seed", "timer_interval_s")


class ConfigError(ValueError):
    """A bad battle config; the message starts with the offending entry's path."""


@dataclass
class BotSpec:
    """Everything needed to start one bot (picklable, for worker processes)."""

    trader_id: str
    class_path: str
    params: dict[str, Any]
    seed: int
    symbol: str = "SIM"
    timer_interval_s: float = 0.5
    reference_price: int = 10_000
    price_band_pct: float = 10.0


@dataclass
class RunOptions:
    exchange_uri: str = DEFAULT_EXCHANGE_URI
    market_data_uri: str = DEFAULT_MARKET_DATA_URI
    duration_s: float = 60.0  # 0: until interrupted; lockstep: simulated seconds
    progress_interval_s: float = 3.0
    lockstep: bool = False
    participants: int = 0  # lockstep: bots in the whole battle, over every worker


@dataclass
class Progress:
    alive: int = 0
    total: int = 0
    fills: int = 0
    logged_in: int = 0


# --------------------------------------------------------------------------- config


def derive_seed(base: int, index: int) -> int:
    """A bot's seed: stable across runs and machines (no hash randomisation)."""
    digest = hashlib.sha256(f"openmarketsim/{base}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def load_class(path: str) -> type:
    """``module:Class`` (or a built-in strategy's bare name) -> the class."""
    if ":" not in path:
        if path in BUILTIN_STRATEGIES:
            return BUILTIN_STRATEGIES[path]
        raise ConfigError(f"expected 'module:Class', got {path!r}")
    module_name, _, class_name = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except Exception as exc:
        detail = str(exc) if isinstance(exc, (ImportError, AttributeError)) else (
            f"{type(exc).__name__}: {exc}")
        raise ConfigError(f"cannot import {path!r}: {detail}") from None
    if not isinstance(cls, type):
        raise ConfigError(f"{path!r} is not a class")
    return cls


def _number(where: str, value: Any, integer: bool = False) -> Any:
    kinds = (int,) if integer else (int, float)
    if type(value) not in kinds or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise ConfigError(f"{where}: must be {kind}, got {value!r}")
    return value


def _check_keys(where: str, data: Any, known: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    for key in data:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(known)})"
                              if where != "config" else
                              f"{key}: unknown key (known: {', '.join(known)})")
    return data


def _resolve_params(where: str, cls: type, params: Any) -> dict[str, Any]:
    if not isinstance(params, dict):
        raise ConfigError(f"{where}.params: expected an object, got {type(params).__name__}")
    resolve = getattr(cls, "resolve_params", None)
    if resolve is None:
        return dict(params)
    try:
        return resolve(params)
    except ParamError as exc:
        raise ConfigError(f"{where}.params.{exc.key}: {exc.problem}") from None


def _check_class(where: str, path: Any) -> type:
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{where}.class: expected 'module:Class', got {path!r}")
    try:
        cls = load_class(path)
    except ConfigError as exc:
        raise ConfigError(f"{where}.class: {exc}") from None
    try:
        cls()  # fail now, with the entry named, rather than mid-battle
    except Exception as exc:
        raise ConfigError(f"{where}.class: {path!r} could not be created: "
                          f"{type(exc).__name__}: {exc}") from None
    return cls


def _trader_ids(where: str, name: Any, count: int) -> list[str]:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}.name: required, a non-empty string")
    ids = [name] if count == 1 else [f"{name}-{i}" for i in range(1, count + 1)]
    if not TRADER_ID_RE.fullmatch(ids[-1]):
        raise ConfigError(f"{where}.name: trader id {ids[-1]!r} must be 1-32 characters "
                          f"of A-Za-z0-9_-")
    return ids


def _bot_specs(where: str, entry: Any, defaults: BotSpec, base_seed: int,
               first_index: int) -> list[BotSpec]:
    entry = _check_keys(where, entry, BOT_KEYS)
    count = entry.get("count", 1)
    if type(count) is not int or not 1 <= count <= MAX_COUNT:
        raise ConfigError(f"{where}.count: must be an integer from 1 to {MAX_COUNT}, "
                          f"got {count!r}")
    ids = _trader_ids(where, entry.get("name"), count)
    if "class" not in entry:
        raise ConfigError(f"{where}.class: required, 'module:Class'")
    cls = _check_class(where, entry["class"])
    params = _resolve_params(where, cls, entry.get("params", {}))
    seed = entry.get("seed")
    if seed is not None and type(seed) is not int:
        raise ConfigError(f"{where}.seed: must be an integer, got {seed!r}")
    timer = _number(f"{where}.timer_interval_s",
                    entry.get("timer_interval_s", defaults.timer_interval_s))
    return [BotSpec(trader_id, entry["class"], params,
                    derive_seed(base_seed, first_index + i) if seed is None
                    else derive_seed(seed, i),
                    defaults.symbol, float(timer), defaults.reference_price,
                    defaults.price_band_pct)
            for i, trader_id in enumerate(ids)]


def parse_config(data: Any, base_seed: int) -> list[BotSpec]:
    """Validate a battle config and expand it into one spec per bot."""
    data = _check_keys("config", data, TOP_KEYS)
    symbol = data.get("symbol", "SIM")
    if not isinstance(symbol, str) or not symbol:
        raise ConfigError(f"symbol: must be a non-empty string, got {symbol!r}")
    defaults = BotSpec("", "", {}, 0, symbol,
                       float(_number("timer_interval_s", data.get("timer_interval_s", 0.5))),
                       _number("reference_price", data.get("reference_price", 10_000), True),
                       float(_number("price_band_pct", data.get("price_band_pct", 10.0))))
    bots = data.get("bots")
    if not isinstance(bots, list) or not bots:
        raise ConfigError("bots: required, a non-empty list of bot entries")
    specs: list[BotSpec] = []
    owner: dict[str, str] = {}
    for i, entry in enumerate(bots):
        where = f"bots[{i}]"
        for spec in _bot_specs(where, entry, defaults, base_seed, len(specs)):
            if spec.trader_id in owner:
                raise ConfigError(f"{where}.name: trader id {spec.trader_id!r} is already "
                                  f"used by {owner[spec.trader_id]}")
            owner[spec.trader_id] = where
            specs.append(spec)
    return specs


def load_config(path: Path, base_seed: int) -> list[BotSpec]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {str(path)!r}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    return parse_config(data, base_seed)


# --------------------------------------------------------------------------- running


def make_client(spec: BotSpec, options: RunOptions) -> BotClient:
    ctx = BotContext(spec.trader_id, symbol=spec.symbol, params=spec.params, seed=spec.seed,
                     reference_price=spec.reference_price,
                     price_band_pct=spec.price_band_pct)
    strategy = load_class(spec.class_path)()
    return BotClient(ctx, strategy, exchange_uri=options.exchange_uri,
                     market_data_uri=options.market_data_uri,
                     timer_interval_s=spec.timer_interval_s,
                     lockstep_participants=options.participants if options.lockstep else None,
                     duration_s=options.duration_s if options.lockstep else 0.0)


def _progress(clients: list[BotClient], total: int) -> Progress:
    return Progress(sum(c.alive for c in clients), total, sum(c.ctx.fills for c in clients),
                    sum(c.logged_in for c in clients))


def _start(specs: list[BotSpec], options: RunOptions,
           results: dict[str, BotResult]) -> list[BotClient]:
    clients = []
    for spec in specs:
        try:
            clients.append(make_client(spec, options))
        except Exception as exc:  # a constructor that fails only sometimes
            log.exception("bot %s could not be created", spec.trader_id)
            results[spec.trader_id] = BotResult(spec.trader_id, spec.class_path, "crashed",
                                                error=f"__init__: {exc!r}")
    return clients


async def run_bots(specs: list[BotSpec], options: RunOptions, should_stop: Callable[[], bool],
                   report: Callable[[float, Progress], None]) -> list[BotResult]:
    """Run bots in this process until the duration ends or ``should_stop()``."""
    results: dict[str, BotResult] = {}
    clients = _start(specs, options, results)
    tasks = [asyncio.create_task(c.run()) for c in clients]
    loop = asyncio.get_running_loop()
    start = loop.time()
    next_report = start + options.progress_interval_s
    while tasks and not should_stop():
        now = loop.time()
        # lockstep: the bots count simulated time and leave by themselves
        if options.duration_s and not options.lockstep and now - start >= options.duration_s:
            break
        if now >= next_report:
            report(now - start, _progress(clients, len(specs)))
            next_report += options.progress_interval_s
        done, _ = await asyncio.wait(tasks, timeout=0.2)
        if len(done) == len(tasks):
            break
    await _stop_all(clients, tasks)
    for client, task in zip(clients, tasks, strict=True):
        ok = task.done() and not task.cancelled() and task.exception() is None
        results[client.ctx.trader_id] = task.result() if ok else client.result()
    return [results[spec.trader_id] for spec in specs]


async def _stop_all(clients: list[BotClient], tasks: list[asyncio.Task[BotResult]]) -> None:
    for client in clients:
        client.stop()
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=10.0)
    for task in pending:  # a bot that could not finish stopping in time
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _print_progress(elapsed: float, progress: Progress) -> None:
    # CLI output: progress goes to stderr so stdout stays the leaderboard.
    print(f"[{elapsed:7.1f}s] bots alive {progress.alive}/{progress.total}, "
          f"logged in {progress.logged_in}, fills {progress.fills}", file=sys.stderr,
          flush=True)


async def run_in_process(specs: list[BotSpec], options: RunOptions) -> list[BotResult]:
    stop = asyncio.Event()
    stop_on_signals(stop)
    return await run_bots(specs, options, stop.is_set, _print_progress)


# --------------------------------------------------------------------------- workers


def _worker_main(index: int, specs: list[BotSpec], options: RunOptions, log_level: str,
                 out: Any, stop: Any) -> None:
    """Entry point of a worker process: run its bots, report progress and results."""
    setup_logging(log_level)
    log.info("worker %d running %d bots: %s", index, len(specs),
             ", ".join(s.trader_id for s in specs))

    async def main() -> list[BotResult]:
        local_stop = asyncio.Event()
        stop_on_signals(local_stop)

        def report(_elapsed: float, progress: Progress) -> None:
            out.put(("progress", index, progress))

        return await run_bots(specs, dataclasses.replace(options, progress_interval_s=1.0),
                              lambda: local_stop.is_set() or stop.is_set(), report)

    out.put(("done", index, run_event_loop(main())))




def run_workers(specs: list[BotSpec], options: RunOptions, workers: int,
                log_level: str) -> list[BotResult]:
    """Spread the bots round-robin over ``workers`` processes."""
    mp = multiprocessing.get_context("spawn")
    out, stop = mp.Queue(), mp.Event()
    groups = [specs[i::workers] for i in range(workers)]
    procs = [mp.Process(target=_worker_main, name=f"bot-worker-{i}",
                        args=(i, group, options, log_level, out, stop))
             for i, group in enumerate(groups)]
    for proc in procs:
        proc.start()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        results = _collect(procs, groups, out, stop, options)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop.set()
        for proc in procs:
            proc.join(5.0)
            if proc.is_alive():
                proc.terminate()
                proc.join()
    by_id = {r.trader_id: r for r in results}
    return [by_id[spec.trader_id] for spec in specs]


def _collect(procs: list[Any], groups: list[list[BotSpec]], out: Any, stop: Any,
             options: RunOptions) -> list[BotResult]:
    """Print aggregated progress until every worker has reported its results."""
    started = time.monotonic()
    latest: dict[int, Progress] = {}
    finished: dict[int, list[BotResult]] = {}
    next_report = started + options.progress_interval_s
    while len(finished) < len(procs):
        try:
            kind, index, payload = out.get(timeout=0.2)
            (finished if kind == "done" else latest)[index] = payload
        except queue.Empty:
            _reap_dead_workers(procs, groups, finished)
        now = time.monotonic()
        if options.duration_s and not options.lockstep and \
                now - started > options.duration_s + 30:
            stop.set()  # workers stop by themselves at the duration; this is a backstop
        if now >= next_report:
            reports = latest.values()
            _print_progress(now - started, Progress(
                sum(p.alive for p in reports), sum(len(g) for g in groups),
                sum(p.fills for p in reports), sum(p.logged_in for p in reports)))
            next_report += options.progress_interval_s
    return [result for index in sorted(finished) for result in finished[index]]


def _reap_dead_workers(procs: list[Any], groups: list[list[BotSpec]],
                       finished: dict[int, list[BotResult]]) -> None:
    for index, proc in enumerate(procs):
        if index not in finished and not proc.is_alive() and proc.exitcode is not None:
            log.error("worker %d exited with code %s before reporting", index, proc.exitcode)
            finished[index] = [BotResult(s.trader_id, s.class_path, "failed",
                                         error=f"worker exited with code {proc.exitcode}")
                               for s in groups[index]]


# --------------------------------------------------------------------------- output


def _money(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}"


def format_leaderboard(results: list[BotResult]) -> str:
    """The final table, best equity first; bots that never reported a position last."""
    ranked = sorted(results, key=lambda r: (r.equity is None, -(r.equity or 0.0), r.trader_id))
    header = (f"{'rank':>4}  {'trader':<24} {'strategy':<20} {'status':<8} {'fills':>6} "
              f"{'position':>9} {'cash':>16} {'realized':>12} {'equity':>16}")
    lines = ["Final leaderboard (each bot's last position report)", header,
             "-" * len(header)]
    for rank, r in enumerate(ranked, 1):
        lines.append(f"{rank:>4}  {r.trader_id:<24} {r.strategy:<20} {r.status:<8} "
                     f"{r.fills:>6} {r.position:>9} {_money(r.cash):>16} "
                     f"{_money(r.realized_pnl):>12} {_money(r.equity):>16}")
    for r in ranked:
        if r.error and r.status != "stopped":
            lines.append(f"note: {r.trader_id} {r.status}: {r.error}")
    return "\n".join(lines)


def format_speed(simulated_s: float, wall_s: float) -> str:
    """How fast a lockstep battle ran, e.g. ``simulated 60.0 s in 4.2 s (14.3x real time)``."""
    ratio = simulated_s / wall_s if wall_s > 0 else 0.0
    return f"simulated {simulated_s:.1f} s in {wall_s:.1f} s ({ratio:.1f}x real time)"


# --------------------------------------------------------------------------- CLI


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(processName)s %(name)s: "
                               "%(message)s")


def _ws_uri(flag: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if not value.startswith(("ws://", "wss://")):
            raise argparse.ArgumentTypeError(f"{flag}: expected a ws:// or wss:// URI, "
                                             f"got {value!r}")
        return value
    return check


def _at_least(minimum: float, kind: type) -> Callable[[str], Any]:
    def check(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return number
    return check


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Run a battle of trading bots against OpenMarketSim.",
        epilog="The config format is described at the top of bot_battle_runner.py.")
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="battle config JSON (default: %(default)s)")
    parser.add_argument("--duration", type=_at_least(0, float), default=60.0,
                        help="seconds to run (simulated seconds with --lockstep); 0 runs "
                             "until interrupted (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=42,
                        help="base seed every bot's seed derives from (default: %(default)s)")
    parser.add_argument("--exchange-uri", type=_ws_uri("--exchange-uri"),
                        default=DEFAULT_EXCHANGE_URI, help="order gateway (default: %(default)s)")
    parser.add_argument("--market-data-uri", type=_ws_uri("--market-data-uri"),
                        default=DEFAULT_MARKET_DATA_URI,
                        help="market data feed (default: %(default)s)")
    parser.add_argument("--workers", type=_at_least(1, int), default=1,
                        help="processes to spread the bots over; 1 runs them all in this "
                             "process (default: %(default)s)")
    parser.add_argument("--lockstep", action="store_true",
                        help="simulated time: every bot joins the lockstep of an exchange "
                             "started with --clock sim; same config and --seed, same trades")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="the exchange's data directory, when it runs on this machine: "
                             "after the battle, write report.html there from its CSVs and "
                             "print the path")
    parser.add_argument("--progress-interval", type=_at_least(0.1, float), default=3.0,
                        help="seconds between progress lines on stderr (default: %(default)s)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                        type=str.upper, help="(default: %(default)s)")
    return parser.parse_args(argv)


def _config_path(arg: str) -> Path:
    path = Path(arg)
    if arg == DEFAULT_CONFIG and not path.exists():
        # The default battle ships next to this script; let it run from anywhere.
        return Path(__file__).resolve().parent / DEFAULT_CONFIG
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    # `module:Class` may live in the current directory, as the docs promise.
    with contextlib.suppress(ValueError):
        sys.path.remove("")
    sys.path.insert(0, os.getcwd())
    try:
        specs = load_config(_config_path(args.config), args.seed)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    options = RunOptions(args.exchange_uri, args.market_data_uri, args.duration,
                         args.progress_interval, args.lockstep, len(specs))
    workers = min(args.workers, len(specs))
    log.info("starting %d bots on %d worker(s) against %s%s", len(specs), workers,
             args.exchange_uri, " in lockstep" if args.lockstep else "")
    started = time.monotonic()
    results = (run_event_loop(run_in_process(specs, options)) if workers == 1
               else run_workers(specs, options, workers, args.log_level))
    print(format_leaderboard(results), flush=True)
    if args.lockstep:
        print(format_speed(max((r.sim_seconds for r in results), default=0.0),
                           time.monotonic() - started), flush=True)
    if not any(r.logged_in for r in results):
        errors = sorted({r.error for r in results if r.error})
        print(f"{PROG}: error: no bot could log in at {args.exchange_uri}"
              + (f" ({errors[0]})" if errors else ""), file=sys.stderr)
        return 1
    if args.lockstep and all(r.status == "failed" for r in results):
        errors = sorted({r.error for r in results if r.error})
        print(f"{PROG}: error: the lockstep battle did not run"
              + (f" ({errors[0]})" if errors else ""), file=sys.stderr)
        return 1
    if args.data_dir is not None:
        return _write_report(args.data_dir)
    return 0


def _write_report(data_dir: Path) -> int:
    """The HTML report of the run so far (the exchange adds its final performance rows
    when it stops; run report.py again then for those)."""
    from report import ReportError, build_report
    try:
        print(f"report: {build_report(data_dir)}", flush=True)
    except ReportError as exc:
        print(f"{PROG}: error: no report: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
