"""Market-data fan-out benchmark: messages/s the relay (``market_data_server.py``)
delivers to 1, 10 and 100 subscribers, one message per frame and with ``batch: true``,
next to a bare websockets push server measured in the same run; and the exchange's order
throughput with a stalled subscriber on the feed versus none.

Processes: the relay, its event source and the push reference each run as their own
server, and the subscribers live in a ``_wsbench.py subscribers`` process, apart from
the relay. The relay's source for the fan-out runs is, with ``--source synthetic`` (the
default), ``_stream_source.py``: a seeded order flow run through the real engine before
the runs and served pre-encoded over the exchange's internal event-stream protocol
(snapshot, then gapless ``seq``), looping with the book emptied between cycles, so it
can offer the relay far more events than the exchange could produce (the exchange tops
out at a few thousand orders/s on 2 cores, which left the relay idle, input-bound, in
batch mode). ``--source exchange`` measures end to end instead: the real exchange fed by
a ``_wsbench.py gateway-client`` process sending the gateway's seeded order flow.

How the relay runs are driven: the source is paced so the relay is offered a little more
than it needs to beat its target at that number of subscribers (``--headroom``): a relay
offered far more than it can send would only fall behind and resync. The synthetic source
is capped by ``--max-source-rate`` events/s (``--source-rate max``: as fast as the relay
reads) and paused between runs; orders to the exchange go open loop, capped by
``--max-input-rate``, since every order the exchange does not need to process leaves CPU
for the relay on a 2-core machine. The feed messages per input (event or order) are
calibrated at the start. A run that delivered everything its source produced (no resync,
no lag) but still fell short is marked ``input-bound``: the source, not the relay, was
the limit there. The relay's log is watched in every window: a sequence gap or a bad
stream (which would make it resync everyone and the figures meaningless) is counted and
printed.

The exchange runs with ``--no-journal`` unless ``--journal``: here it is only the source
of events, and fsync waits would cap the input the relay gets. Its config (a temporary
``--config``) lifts the risk limits so no order is refused; rejects are counted anyway.

The stalled-subscriber comparison always uses the real exchange (it is defined on the
exchange's throughput, started after the fan-out runs, with its own relay); it keeps one
closed-loop order load (and one reading
subscriber) running and measures adjacent windows without and with a subscriber that
subscribed and never reads again (its receive buffer pinned small, so it stalls within
seconds); each stalled window starts once the relay has logged its first resync of it.

The relay's CPU time over each window is read from /proc (Linux): its share of a core,
and the delivery rate that cost per message would give at a whole core, say what the
relay itself could do when its source or a busy machine limits the input.
``--relay-script`` measures another copy of the relay (e.g. the previous version, kept
in /tmp) under the same conditions.

Targets (printed PASS/MISS, never asserted): unbatched delivery at least 0.75x the push
ceiling at the same number of subscribers; with ``batch: true`` at least 1,000,000
messages/s delivered to 100 subscribers; the exchange's acked orders/s with one stalled
subscriber within 5% of the figure without it.

Example: ``.venv/bin/python bench/bench_feed.py`` (about 2 min), ``--quick`` (a smoke
run, under 30 s), ``--source exchange`` (end to end).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _wsbench import (
    Progress,
    Worker,
    bench_exchange_config,
    fmt_int,
    fmt_us,
    load_average,
    loop_name,
    measure_all,
    median,
    print_profile,
    print_table,
    profile_window,
    py_spy_path,
    py_spy_record,
    run_loop,
    verdict,
    write_config,
)

# _wsbench put the repository on the path
from launcher import ServerProcess, start_server

TARGET_UNBATCHED_RATIO = 0.75  # of the push ceiling at the same subscriber count
TARGET_BATCH_MSGS = 1_000_000  # messages/s delivered to 100 subscribers
TARGET_STALL_DROP = 0.05  # the exchange's throughput with a stalled subscriber
SUBSCRIBER_COUNTS = (1, 10, 100)
LAG_OK_MS = 250.0  # a relay this close behind the exchange was keeping up
KEPT_UP_SHARE = 0.9  # ... if its subscribers also got this much of what it produced
LOAD_CONNS = 4  # gateway connections carrying the paced input
STALL_LOAD_CONNS = 8  # closed-loop connections of the stalled-subscriber comparison
STALL_WAIT_S = 20.0  # at most, for the relay's first resync of the stalled subscriber
STALL_WAIT_QUICK_S = 2.0  # smoke mode: the stall path is exercised, not waited for
# what the relay logs (at WARNING) when it resyncs or drops a slow subscriber
RESYNC_MARK = "behind: dropping its backlog"
CLOSE_MARK = "closing subscriber"
# ... and when its own input breaks: each makes it reconnect and resync every subscriber
STREAM_MARKS = ("sequence gap", "bad exchange stream", "exchange offline")
SOURCE_SCRIPT = "bench/_stream_source.py"
CONTROL_TIMEOUT_S = 10.0


def _source_rate(text: str) -> str | float:
    if text in ("auto", "max"):
        return text
    rate = float(text)
    if rate <= 0:
        raise argparse.ArgumentTypeError("a rate must be positive (or auto, max)")
    return rate


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark the market-data relay's fan-out against a bare websockets "
                    "push server measured in the same run, and the exchange's order "
                    "throughput with a stalled feed subscriber.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--duration", type=float, default=3.0,
                        help="seconds measured per run")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="seconds of load before each measurement window")
    parser.add_argument("--subscribers", type=int, nargs="+", metavar="N",
                        default=list(SUBSCRIBER_COUNTS),
                        help="subscriber counts")
    parser.add_argument("--source", choices=["synthetic", "exchange"], default="synthetic",
                        help="the relay's input in the fan-out runs: a synthetic event "
                             "stream of real engine events served pre-encoded (the relay is "
                             "measured), or the real exchange fed with orders (end to end)")
    parser.add_argument("--source-rate", type=_source_rate, default="auto",
                        metavar="auto|max|EVENTS_PER_S",
                        help="synthetic source's pace: auto (target plus headroom, capped "
                             "by --max-source-rate), max (as fast as the relay reads: its "
                             "ingest ceiling; unbatched subscribers then fall behind and "
                             "resync) or a fixed events/s")
    parser.add_argument("--max-source-rate", type=float, default=200_000.0,
                        help="cap on the synthetic source's events/s with --source-rate auto")
    parser.add_argument("--cycle-inputs", type=int, default=50_000,
                        help="engine inputs in the synthetic source's cycle (it loops)")
    parser.add_argument("--max-input-rate", type=float, default=20_000.0,
                        help="cap on the order-entry messages/s sent to the exchange to "
                             "feed the relay (--source exchange)")
    parser.add_argument("--headroom", type=float, default=2.0,
                        help="input offered relative to what the relay needs to reach its "
                             "target at each subscriber count")
    parser.add_argument("--stall-rounds", type=int, default=4,
                        help="rounds of the stalled-subscriber comparison, each a window "
                             "without and one with the stalled subscriber (medians)")
    parser.add_argument("--journal", action="store_true",
                        help="run the exchange with its default write-ahead journal; by "
                             "default it runs with --no-journal, so the order input is "
                             "bounded by CPU rather than fsync and the relay gets the most "
                             "events to fan out")
    parser.add_argument("--seed", type=int, default=42,
                        help="seed of the order flows (synthetic and exchange)")
    parser.add_argument("--loop", choices=["auto", "asyncio"], default="auto",
                        help="event loop of the clients and the push server (auto: uvloop "
                             "when installed; the exchange and the relay pick their own)")
    parser.add_argument("--profile", action="store_true",
                        help="after the measurements, sample the relay with py-spy while it "
                             "feeds the most subscribers (unbatched and batch) and print "
                             "where its time goes (needs py-spy: pip install py-spy)")
    parser.add_argument("--profile-dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the raw py-spy profiles are kept")
    parser.add_argument("--relay-script", type=Path, default=Path("market_data_server.py"),
                        help="the relay to measure (relative to the repository); another "
                             "path compares an earlier copy of it in the same conditions")
    parser.add_argument("--quick", action="store_true",
                        help="smoke mode: everything once, briefly (under 30 s)")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.stall_rounds = 0.6, 0.3, 1
    return args


@dataclass
class FanoutRun:
    subscribers: int
    feed: str  # "push", "relay", "relay batch"
    sub: dict[str, Any]
    load: dict[str, Any] | None = None  # the gateway client's counters (exchange source)
    source: dict[str, Any] | None = None  # the synthetic source's counters over the window
    input_rate: float = 0.0  # offered: order-entry messages/s, or events/s (0: max)
    relay_cpu_s: float | None = None  # CPU time the relay process used in the window
    relay_log: dict[str, int] = field(default_factory=dict)  # marks logged in the window

    @property
    def msgs_per_s(self) -> float:
        return self.sub["messages"] / self.sub["elapsed"]

    @property
    def relay_cpu_share(self) -> float | None:
        """The relay's CPU over the window, as a share of one core."""
        if self.relay_cpu_s is None:
            return None
        return self.relay_cpu_s / self.sub["elapsed"]

    @property
    def full_core_estimate(self) -> float | None:
        """Messages/s the relay would deliver at this cost per message with a whole core
        to itself: what it could do when its source, not the relay, is the limit."""
        share = self.relay_cpu_share
        return self.msgs_per_s / share if share else None

    @property
    def frames_per_s(self) -> float:
        return self.sub["frames"] / self.sub["elapsed"]

    @property
    def resyncs(self) -> int:
        return int(self.sub["snapshots"])

    @property
    def stream_errors(self) -> int:
        """Gaps or broken input the relay logged in the window (each a full resync)."""
        return sum(self.relay_log.get(mark, 0) for mark in STREAM_MARKS)

    @property
    def lag_ms(self) -> float | None:
        """How far the subscribers trailed the source as the window closed."""
        if self.source is not None:
            head, rate = self.source["seq"], self.input_per_s
        elif self.load and self.load["max_seq"] and self.load["first_seq"]:
            load = self.load
            head = load["max_seq"]
            rate = (load["max_seq"] - load["first_seq"]) / load["elapsed"]
        else:
            return None
        if rate <= 0:
            return None
        return max(0.0, (head - self.sub["last_seq"]) / rate * 1000)

    @property
    def input_per_s(self) -> float:
        """What the source produced: events/s (synthetic) or orders answered/s."""
        if self.source is not None:
            return self.source["events"] / self.source["elapsed"]
        load = self.load
        if not load:
            return 0.0
        return (load["acks"] + load["cancels"] + load["order_rejects"]
                + load["cancel_rejects"]) / load["elapsed"]

    def kept_up(self, per_input: float) -> bool:
        """Whether the subscribers got (nearly) all the source produced: no resync,
        little lag, and about ``per_input`` messages each per input. A synthetic source
        offered without a cap (max) was never the limit: that is never kept up."""
        if self.source is not None and not self.input_rate:
            return False
        lag = self.lag_ms
        expected = self.input_per_s * per_input
        return (self.resyncs == 0 and self.stream_errors == 0 and lag is not None
                and lag <= LAG_OK_MS
                and self.msgs_per_s / self.subscribers >= KEPT_UP_SHARE * expected)


@dataclass
class Results:
    calibration: float = 1.0  # feed messages per input (event or order), per subscriber
    fanout: list[FanoutRun] = field(default_factory=list)
    # (without, with) a stalled subscriber, adjacent windows of one load
    stall: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    profiles: dict[str, tuple[Path, FanoutRun]] = field(default_factory=dict)

    def get(self, subscribers: int, feed: str) -> FanoutRun:
        return next(r for r in self.fanout if r.subscribers == subscribers and r.feed == feed)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.progress = Progress()
        self.runs = 0
        # the fan-out runs' relay and its input, once started
        self.relay: ServerProcess | None = None
        self.gateway_uri = ""  # --source exchange
        self.source_uri = ""  # --source synthetic

    @property
    def feed_uri(self) -> str:
        assert self.relay is not None
        return self.relay.uris["feed"]

    async def subscribers(self, uri: str, count: int, *, batch: bool = False,
                          stall: bool = False) -> Worker:
        extra = (["--batch"] if batch else []) + (["--stall"] if stall else [])
        return await Worker.start(f"{count} subscribers", "subscribers", "--uri", uri,
                                  "--count", str(count), "--loop", self.args.loop, *extra)

    async def load(self, uri: str, conns: int, rate: float) -> Worker:
        self.runs += 1
        # Unanswered requests are capped per connection: an input the exchange cannot
        # take is shed (and reported), not queued without bound in the client.
        return await Worker.start(
            f"order load ({conns} connections)", "gateway-client", "--uri", uri,
            "--conns", str(conns), "--rate", str(rate), "--seed",
            str(self.args.seed + self.runs), "--trader-prefix", "load", "--max-pending",
            "256", "--loop", self.args.loop)

    async def push_run(self, uri: str, count: int) -> FanoutRun:
        subs = await self.subscribers(uri, count)
        try:
            await asyncio.sleep(self.args.warmup)
            result = await subs.measure(self.args.duration)
        finally:
            await subs.stop()
        return FanoutRun(count, "push", result)

    async def relay_run(self, count: int, batch: bool, rate: float,
                        duration: float | None = None,
                        profile_out: Path | None = None) -> FanoutRun:
        """Subscribers on the relay, its source running, one window measured on both
        sides (and the relay sampled by py-spy meanwhile, if asked). ``rate``: events/s
        (synthetic; 0 is max) or orders/s offered to the exchange."""
        assert self.relay is not None
        relay = self.relay
        subs = await self.subscribers(self.feed_uri, count, batch=batch)
        load: Worker | None = None
        window = duration if duration is not None else self.args.duration
        synthetic = self.args.source == "synthetic"
        source_result: dict[str, Any] | None = None
        load_result: dict[str, Any] | None = None
        try:
            if synthetic:
                await source_control(self.source_uri, rate or "max")
            else:
                load = await self.load(self.gateway_uri, LOAD_CONNS, rate)
            await asyncio.sleep(self.args.warmup)
            logged = len(relay.stderr_lines)
            source_before = await source_control(self.source_uri) if synthetic else None
            cpu_before = process_cpu_s(relay.proc.pid)
            workers = [subs] if load is None else [subs, load]
            measuring = measure_all(workers, window)
            if profile_out is not None:
                results, recorded = await asyncio.gather(
                    measuring, py_spy_record(relay.proc.pid, window, profile_out))
                results[0]["profiled"] = recorded
            else:
                results = await measuring
            cpu_after = process_cpu_s(relay.proc.pid)
            sub_result = results[0]
            if source_before is not None:
                source_result = source_window(source_before,
                                              await source_control(self.source_uri))
            else:
                load_result = results[1]
            window_log = relay.stderr_lines[logged:]
        finally:
            if synthetic:
                await source_control(self.source_uri, 0)  # idle between runs
            if load is not None:
                await load.stop()
            await subs.stop()
        cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
        return FanoutRun(count, "relay batch" if batch else "relay", sub_result, load_result,
                         source_result, rate, cpu, count_marks(window_log))

    async def stall_test(self, gateway_uri: str, feed_uri: str, relay: ServerProcess,
                         results: Results) -> None:
        """The exchange's closed-loop order throughput in adjacent windows without and
        with a stalled subscriber (one that subscribed and never reads), one reading
        subscriber on the feed throughout. The load runs without a break, so the
        windows differ only by the stalled subscriber, not by start-up or drift."""
        args = self.args
        wait_limit = STALL_WAIT_QUICK_S if args.quick else STALL_WAIT_S
        live = await self.subscribers(feed_uri, 1)
        load: Worker | None = None
        try:
            load = await self.load(gateway_uri, STALL_LOAD_CONNS, 0.0)
            await asyncio.sleep(args.warmup)
            for round_no in range(1, args.stall_rounds + 1):
                none = await self._stall_window(load, relay)
                stalled_sub = await self.subscribers(feed_uri, 1, stall=True)
                try:
                    # Measure while the relay is handling the stall, not while the
                    # stalled socket is still soaking up its first buffers.
                    logged = len(relay.stderr_lines)
                    waited = 0.0
                    while not any(RESYNC_MARK in line for line in relay.stderr_lines[logged:])\
                            and waited < wait_limit:
                        await asyncio.sleep(0.1)
                        waited += 0.1
                    stalled = await self._stall_window(load, relay)
                finally:
                    await stalled_sub.stop()
                results.stall.append((none, stalled))
                self.progress(
                    f"stalled subscriber, round {round_no}/{args.stall_rounds}: "
                    f"{fmt_int(none['acks_per_s'])} acked orders/s without, "
                    f"{fmt_int(stalled['acks_per_s'])} with "
                    f"({stalled['acks_per_s'] / none['acks_per_s'] - 1:+.1%}); the relay "
                    f"resynced it {stalled['relay_resyncs']}x and closed "
                    f"{stalled['relay_closes']} subscribers in the window")
        finally:
            if load is not None:
                await load.stop()
            await live.stop()

    async def _stall_window(self, load: Worker, relay: ServerProcess) -> dict[str, Any]:
        logged = len(relay.stderr_lines)
        result = await load.measure(self.args.duration)
        window_log = relay.stderr_lines[logged:]
        result["acks_per_s"] = result["acks"] / result["elapsed"]
        result["relay_resyncs"] = sum(RESYNC_MARK in line for line in window_log)
        result["relay_closes"] = sum(CLOSE_MARK in line for line in window_log)
        return result


async def source_control(uri: str, rate: float | str | None = None) -> dict[str, Any]:
    """The synthetic source's counters; with ``rate``, set its pace first (events/s,
    "max", 0 pauses)."""
    query = "" if rate is None else f"?rate={rate}"
    async with connect(f"{uri}/control{query}", compression=None,
                       open_timeout=CONTROL_TIMEOUT_S) as ws:
        answer = orjson.loads(await asyncio.wait_for(ws.recv(), CONTROL_TIMEOUT_S))
    if "error" in answer:
        raise RuntimeError(f"stream source: {answer['error']}")
    return answer


def source_window(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What the source sent between two readings of its counters."""
    return {"elapsed": after["time"] - before["time"], "seq": after["seq"],
            **{key: after[key] - before[key] for key in ("events", "inputs", "frames",
                                                       "bytes")}}


def count_marks(lines: list[str]) -> dict[str, int]:
    """How often each mark of interest occurs in a window of the relay's log."""
    marks = (RESYNC_MARK, CLOSE_MARK, *STREAM_MARKS)
    return {mark: sum(mark in line for line in lines) for mark in marks}


def stream_error_lines(lines: list[str]) -> Iterator[str]:
    return (line.rstrip() for line in lines if any(mark in line for mark in STREAM_MARKS))


def process_cpu_s(pid: int) -> float | None:
    """User plus system CPU seconds a process has used (Linux /proc; None elsewhere).
    On a shared machine this, unlike a rate, hardly depends on what else runs."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # after the command name: state is field 3, utime and stime fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def input_rate(args: argparse.Namespace, results: Results, count: int, batch: bool,
               push_frames: float) -> float:
    """Inputs/s (events from the synthetic source, or order-entry messages to the
    exchange) that give the relay its target's worth of messages plus headroom at
    ``count`` subscribers, within the cap; 0: as fast as the relay reads."""
    synthetic = args.source == "synthetic"
    if synthetic and args.source_rate != "auto":
        return 0.0 if args.source_rate == "max" else float(args.source_rate)
    goal = max(TARGET_BATCH_MSGS, push_frames) if batch else push_frames
    per_subscriber = goal * args.headroom / count
    cap = args.max_source_rate if synthetic else args.max_input_rate
    return min(cap, per_subscriber / max(results.calibration, 0.01))


def input_unit(args: argparse.Namespace) -> str:
    return "events" if args.source == "synthetic" else "orders"


def _fmt_offered(rate: float) -> str:
    return fmt_int(rate) if rate else "max"


def describe(run: FanoutRun) -> str:
    text = (f"{fmt_int(run.msgs_per_s)} msgs/s delivered "
            f"({fmt_int(run.msgs_per_s / run.subscribers)} per subscriber, "
            f"{fmt_int(run.frames_per_s)} frames/s)")
    if run.load is not None or run.source is not None:
        lag = run.lag_ms
        unit = "events" if run.source is not None else "orders"
        text += (f", input {fmt_int(run.input_per_s)} {unit}/s of "
                 f"{_fmt_offered(run.input_rate)} offered, {run.resyncs} resyncs, lag "
                 f"{'n/a' if lag is None else fmt_us(lag * 1000)}")
        if run.stream_errors:
            text += f", {run.stream_errors} STREAM ERRORS in the relay's log"
    share = run.relay_cpu_share
    if share is not None:
        text += f", relay CPU {share:.0%}"
    return text


async def start_relay(args: argparse.Namespace, source_uri: str) -> ServerProcess:
    return await start_server(str(args.relay_script), "--port", "0", "--exchange-uri",
                              source_uri, "--log-level", "WARNING")


async def start_exchange(args: argparse.Namespace, tmp: str, config: Path) -> ServerProcess:
    return await start_server(
        "exchange_server.py", "--port", "0", "--events-port", "0", "--data-dir", tmp,
        "--config", str(config), "--log-level", "WARNING",
        *([] if args.journal else ["--no-journal"]))


async def run(args: argparse.Namespace) -> int:
    bench = Bench(args)
    progress = bench.progress
    results = Results()
    synthetic = args.source == "synthetic"
    print(f"OpenMarketSim feed benchmark: python {platform.python_version()}, clients and "
          f"push server on {loop_name(args.loop)}, seed {args.seed}"
          f"{', QUICK smoke mode' if args.quick else ''}")
    print("relay input in the fan-out runs: " + (
        f"synthetic event stream ({SOURCE_SCRIPT}: {args.cycle_inputs:,} engine inputs "
        f"per cycle, pre-encoded; pace {args.source_rate})" if synthetic else
        "the real exchange, fed orders through its gateway"))
    print(f"load average at start: {load_average()} (the figures are shared with whatever "
          "else runs; each relay figure is compared with a push figure of the same run)")
    servers: list[ServerProcess] = []
    relay_logs: list[ServerProcess] = []  # every relay started, for its stream errors
    with tempfile.TemporaryDirectory(prefix="bench_feed_") as tmp:
        config = write_config(Path(tmp), bench_exchange_config())
        try:
            push = await start_server("bench/_wsbench.py", "push-server", "--loop", args.loop,
                                      "--seed", str(args.seed))
            servers.append(push)
            if synthetic:
                # paused (rate 0) until a run starts it: an idle relay between runs
                source = await start_server(
                    SOURCE_SCRIPT, "--port", "0", "--seed", str(args.seed), "--inputs",
                    str(args.cycle_inputs), "--rate", "0", "--loop", args.loop,
                    "--log-level", "WARNING")
                servers.append(source)
                bench.source_uri = source.uris["events"]
                events_uri = bench.source_uri
            else:
                source = await start_exchange(args, tmp, config)
                servers.append(source)
                bench.gateway_uri = source.uris["gateway"]
                events_uri = source.uris["events"]
            bench.relay = relay = await start_relay(args, events_uri)
            servers.append(relay)
            relay_logs.append(relay)
            progress(f"servers up: push pid {push.proc.pid}, "
                     f"{'source' if synthetic else 'exchange'} pid {source.proc.pid}, "
                     f"relay pid {relay.proc.pid}")

            # Warm-up, and the calibration: messages a subscriber gets per input.
            await bench.push_run(push.uris["push"], max(args.subscribers))
            calib = await bench.relay_run(1, False, 20_000.0 if synthetic else 2000.0,
                                          duration=max(args.warmup, 0.5))
            results.calibration = calib.msgs_per_s / max(calib.input_per_s, 1.0)
            progress(f"warm-up done; calibration: {results.calibration:.2f} feed messages "
                     f"per {input_unit(args)[:-1]} ({describe(calib)})")

            for count in args.subscribers:
                push_run = await bench.push_run(push.uris["push"], count)
                results.fanout.append(push_run)
                progress(f"push        {count:>3} subscribers: {describe(push_run)}")
                for batch in (False, True):
                    rate = input_rate(args, results, count, batch, push_run.frames_per_s)
                    relay_run = await bench.relay_run(count, batch, rate)
                    results.fanout.append(relay_run)
                    progress(f"{relay_run.feed:<11} {count:>3} subscribers: "
                             f"{describe(relay_run)}")

            if args.profile:
                if py_spy_path() is None:
                    print("--profile: py-spy not found (pip install py-spy); skipped")
                else:
                    await profile_relay(bench, args, results)

            if synthetic:
                # the stalled-subscriber comparison is about the exchange: its own pair
                for server in (relay, source):
                    await server.stop()
                exchange = await start_exchange(args, tmp, config)
                servers.append(exchange)
                stall_relay = await start_relay(args, exchange.uris["events"])
                servers.append(stall_relay)
                relay_logs.append(stall_relay)
                progress(f"stalled-subscriber servers up: exchange pid {exchange.proc.pid}, "
                         f"relay pid {stall_relay.proc.pid}")
            else:
                exchange, stall_relay = source, relay
            await bench.stall_test(exchange.uris["gateway"], stall_relay.uris["feed"],
                                   stall_relay, results)
        finally:
            for server in reversed(servers):
                await server.stop()
    progress("servers stopped")
    print(f"load average at end: {load_average()}")
    status = report(args, results)
    errors = [line for r in relay_logs for line in stream_error_lines(r.stderr_lines)]
    if errors:
        print(f"\nWARNING: the relay logged {len(errors)} input errors (each one a reconnect "
              "and a resync of every subscriber):")
        for line in errors[:20]:
            print("  " + line)
        status = max(status, 1)
    for label, (path, run_) in results.profiles.items():
        print(f"\nWhere the relay's time goes, {label} ({describe(run_)}; py-spy raw "
              f"profile: {path}):")
        print_profile(path, profile_window(args.duration))
    return status


async def profile_relay(bench: Bench, args: argparse.Namespace, results: Results) -> None:
    count = max(args.subscribers)
    args.profile_dir.mkdir(parents=True, exist_ok=True)
    for batch in (False, True):
        earlier = results.get(count, "relay batch" if batch else "relay")
        label = f"{count} subscribers{', batch' if batch else ''}"
        out = args.profile_dir / f"bench_feed_relay_{count}{'_batch' if batch else ''}.pyspy.txt"
        run_ = await bench.relay_run(count, batch, earlier.input_rate,
                                     duration=profile_window(args.duration),
                                     profile_out=out)
        bench.progress(f"profiled the relay, {label}: {describe(run_)}")
        if run_.sub.get("profiled"):
            results.profiles[label] = (out, run_)


def _fmt_share(share: float | None) -> str:
    return "-" if share is None else f"{share:.0%}"


def _fmt_rate(rate: float | None) -> str:
    return "-" if rate is None else fmt_int(rate)


def _fanout_verdict(run: FanoutRun, push_run: FanoutRun, per_input: float) -> str:
    if run.feed == "relay batch":
        if run.subscribers != 100:
            return "-"
        ok = run.msgs_per_s >= TARGET_BATCH_MSGS
    else:
        ok = run.msgs_per_s >= TARGET_UNBATCHED_RATIO * push_run.msgs_per_s
    if ok:
        return "PASS"
    return "MISS (input-bound)" if run.kept_up(per_input) else "MISS"


def report(args: argparse.Namespace, results: Results) -> int:
    """Print the tables and targets; 1 if the exchange refused orders (the figures would
    then include refused work), else 0, whatever the targets say."""
    synthetic = args.source == "synthetic"
    unit = input_unit(args)
    source_name = (f"the synthetic event stream ({SOURCE_SCRIPT})" if synthetic
                   else "the real exchange")
    print(f"\nFan-out, relay fed by {source_name} ({args.duration:g} s per run; messages "
          "counted at the subscribers, summed over them; 'vs push' against the push server "
          "at the same count):")
    rows = []
    for count in args.subscribers:
        push_run = results.get(count, "push")
        for feed in ("push", "relay", "relay batch"):
            run = results.get(count, feed)
            lag = run.lag_ms
            fed = run.load is not None or run.source is not None
            rows.append([
                str(count), feed, fmt_int(run.msgs_per_s),
                fmt_int(run.msgs_per_s / count), fmt_int(run.frames_per_s),
                "baseline" if feed == "push" else f"{run.msgs_per_s / push_run.msgs_per_s:.2f}x",
                "-" if not fed else f"{fmt_int(run.input_per_s)}/"
                                    f"{_fmt_offered(run.input_rate)}",
                "-" if not fed else str(run.resyncs),
                "-" if not fed else str(run.stream_errors),
                "-" if lag is None else fmt_us(lag * 1000),
                _fmt_share(run.relay_cpu_share), _fmt_rate(run.full_core_estimate),
                "-" if feed == "push" else _fanout_verdict(run, push_run,
                                                           results.calibration)])
    print_table(["subs", "feed", "msgs/s", "per sub/s", "frames/s", "vs push",
                 f"{unit}/s in/offered", "resyncs", "gaps", "lag", "relay CPU", "at 1 core",
                 "target"], rows, "><>>>>>>>>>><")
    what_in = ("events/s the source sent / offered ('max': as fast as the relay read)"
               if synthetic else "order-entry messages/s the exchange answered / offered")
    print(f"({unit}/s: {what_in}, {results.calibration:.2f} feed messages each; 'resyncs': "
          "book snapshots sent to lagging subscribers; 'gaps': sequence gaps or broken input "
          "the relay logged (each a reconnect and a resync of everyone; must be 0); 'lag': "
          "how far the subscribers trailed the source as the window closed; a relay with "
          "no resync and little lag delivered all it was given and could have done more: "
          "below target that is 'input-bound'; 'relay CPU': the relay process's CPU time "
          "over the window, as a share of one core; 'at 1 core': msgs/s at that cost per "
          "message if the relay had a whole core, an estimate of its own ceiling when its "
          "input or a busy machine is the limit)")

    none = [pair[0] for pair in results.stall]
    stalled = [pair[1] for pair in results.stall]
    none_rate = median([r["acks_per_s"] for r in none])
    stalled_rate = median([r["acks_per_s"] for r in stalled])
    change = median([b["acks_per_s"] / a["acks_per_s"] - 1 for a, b in results.stall])
    print(f"\nExchange order throughput with a stalled feed subscriber ({STALL_LOAD_CONNS} "
          "closed-loop gateway connections without a break, one reading subscriber "
          f"throughout; {args.stall_rounds} rounds of adjacent {args.duration:g} s windows "
          "without and with it; medians):")
    rows = [[name, " ".join(fmt_int(r["acks_per_s"]) for r in rs),
             fmt_int(median([r["acks_per_s"] for r in rs])),
             fmt_us(median([r["p99_us"] for r in rs])),
             str(sum(r["order_rejects"] for r in rs)),
             str(sum(r["relay_resyncs"] for r in rs)), str(sum(r["relay_closes"] for r in rs))]
            for name, rs in (("none", none), ("stalled", stalled))]
    print_table(["stalled subscriber", "acked orders/s per round", "median", "p99 ack",
                 "order rejects", "relay resyncs", "relay closes"], rows, "<>>>>>>")
    print("(relay resyncs/closes: what the relay logged about slow subscribers during the "
          "measured windows; each stalled window starts once the relay has begun "
          "resyncing the stalled subscriber; the change is the median of the per-round "
          "ratios)")

    print(f"\nTargets (fan-out fed by {source_name}):")
    for count in args.subscribers:
        push_run, run = results.get(count, "push"), results.get(count, "relay")
        print(f"  unbatched, {count:>3} subscribers >= {TARGET_UNBATCHED_RATIO:.2f}x push: "
              f"{run.msgs_per_s / push_run.msgs_per_s:.2f}x ({fmt_int(run.msgs_per_s)} vs "
              f"{fmt_int(push_run.msgs_per_s)})  "
              f"{_fanout_verdict(run, push_run, results.calibration)}")
    batch_100 = next((r for r in results.fanout
                      if r.feed == "relay batch" and r.subscribers == 100), None)
    if batch_100 is not None:
        print(f"  batch, 100 subscribers >= {fmt_int(TARGET_BATCH_MSGS)} msgs/s: "
              f"{fmt_int(batch_100.msgs_per_s)}  "
              f"{_fanout_verdict(batch_100, results.get(100, 'push'), results.calibration)}"
              f"  (relay CPU {_fmt_share(batch_100.relay_cpu_share)}, about "
              f"{_fmt_rate(batch_100.full_core_estimate)} msgs/s at a whole core)")
    print(f"  exchange with a stalled subscriber within {TARGET_STALL_DROP:.0%}: "
          f"{change:+.1%} ({fmt_int(stalled_rate)} vs {fmt_int(none_rate)} acked orders/s)  "
          f"{verdict(change >= -TARGET_STALL_DROP)}")
    rejects = sum(r.load["order_rejects"] for r in results.fanout if r.load) + sum(
        r["order_rejects"] for pair in results.stall for r in pair)
    if rejects:
        print(f"  WARNING: the exchange rejected {rejects} orders: the load is meant to pass "
              "every risk check")
    if batch_100 is not None:
        print(f"\nfeed: {fmt_int(batch_100.msgs_per_s)} msgs/s (100 subscribers, batch)")
    else:
        top = max(args.subscribers)
        print(f"\nfeed: {fmt_int(results.get(top, 'relay batch').msgs_per_s)} msgs/s "
              f"({top} subscribers, batch)")
    return 1 if rejects else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        # the coordinator only waits on processes: plain asyncio is plenty
        return run_loop(run(args), "asyncio")
    except RuntimeError as exc:  # a server or helper failed to start or answer
        print(f"FAILED: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
