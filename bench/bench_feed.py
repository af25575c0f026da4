"""Market-data fan-out benchmark: messages/s the relay (``market_data_server.py``)
delivers to 1, 10 and 100 subscribers, one message per frame and with ``batch: true``,
next to a bare websockets push server measured in the same run; and the exchange's order
throughput with a stalled subscriber on the feed versus none.

Processes: the exchange, the relay and the push reference each run as their own server;
the order load comes from a ``_wsbench.py gateway-client`` process sending the gateway's
seeded order flow (so the relay has real events to replicate and fan out), and the
subscribers live in a ``_wsbench.py subscribers`` process, apart from the relay.

How the relay runs are driven: orders go to the gateway open loop at a fixed rate chosen
so the relay is offered a little more than it needs to beat its target at that number of
subscribers (``--headroom``), capped by ``--max-input-rate``: a relay offered far more
than it can send would only fall behind and resync, and every order the exchange does
not need to process leaves CPU for the relay on a 2-core machine. The messages per order
are calibrated at the start. A run that delivered everything the exchange produced
(no resync, no lag) but still fell short is marked ``input-bound``: the exchange, not
the relay, was the limit there.

The exchange runs with ``--no-journal`` unless ``--journal``: here it is only the source
of events, and fsync waits would cap the input the relay gets. Its config (a temporary
``--config``) lifts the risk limits so no order is refused; rejects are counted anyway.

The stalled-subscriber comparison keeps one closed-loop order load (and one reading
subscriber) running and measures adjacent windows without and with a subscriber that
subscribed and never reads again (its receive buffer pinned small, so it stalls within
seconds); each stalled window starts once the relay has logged its first resync of it.

The relay's CPU time over each window is read from /proc (Linux): its share of a core,
and the delivery rate that cost per message would give at a whole core, say what the
relay itself could do when the exchange or a busy machine limits the input.
``--relay-script`` measures another copy of the relay (e.g. the previous version, kept
in /tmp) under the same conditions.

Targets (printed PASS/MISS, never asserted): unbatched delivery at least 0.75x the push
ceiling at the same number of subscribers; with ``batch: true`` at least 1,000,000
messages/s delivered to 100 subscribers; the exchange's acked orders/s with one stalled
subscriber within 5% of the figure without it.

Example: ``.venv/bin/python bench/bench_feed.py`` (about 2 min), ``--quick`` (a smoke
run, under 30 s).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    parser.add_argument("--max-input-rate", type=float, default=20_000.0,
                        help="cap on the order-entry messages/s sent to the exchange to "
                             "feed the relay")
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
    parser.add_argument("--seed", type=int, default=42, help="seed of the order flow")
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
    load: dict[str, Any] | None = None
    input_rate: float = 0.0  # offered order-entry messages/s
    relay_cpu_s: float | None = None  # CPU time the relay process used in the window

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
        to itself: what it could do when the exchange, not the relay, is the limit."""
        share = self.relay_cpu_share
        return self.msgs_per_s / share if share else None

    @property
    def frames_per_s(self) -> float:
        return self.sub["frames"] / self.sub["elapsed"]

    @property
    def resyncs(self) -> int:
        return int(self.sub["snapshots"])

    @property
    def lag_ms(self) -> float | None:
        """How far the subscribers trailed the exchange as the window closed."""
        load = self.load
        if not load or not load["max_seq"] or not load["first_seq"]:
            return None
        events_per_s = (load["max_seq"] - load["first_seq"]) / load["elapsed"]
        if events_per_s <= 0:
            return None
        return max(0.0, (load["max_seq"] - self.sub["last_seq"]) / events_per_s * 1000)

    @property
    def answered_per_s(self) -> float:
        load = self.load
        if not load:
            return 0.0
        return (load["acks"] + load["cancels"] + load["order_rejects"]
                + load["cancel_rejects"]) / load["elapsed"]

    def kept_up(self, per_order: float) -> bool:
        """Whether the subscribers got (nearly) all the exchange produced: no resync,
        little lag, and about ``per_order`` messages each per order answered."""
        lag = self.lag_ms
        expected = self.answered_per_s * per_order
        return (self.resyncs == 0 and lag is not None and lag <= LAG_OK_MS
                and self.msgs_per_s / self.subscribers >= KEPT_UP_SHARE * expected)


@dataclass
class Results:
    calibration: float = 1.0  # public messages per order-entry message, per subscriber
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
        self.relay_pid = 0  # for its CPU time, once started

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

    async def relay_run(self, feed_uri: str, gateway_uri: str, count: int, batch: bool,
                        rate: float, duration: float | None = None, profile_pid: int = 0,
                        profile_out: Path | None = None) -> FanoutRun:
        """Subscribers on the relay, paced orders into the exchange, one window measured
        on both sides (and the relay sampled by py-spy meanwhile, if asked)."""
        subs = await self.subscribers(feed_uri, count, batch=batch)
        load: Worker | None = None
        window = duration if duration is not None else self.args.duration
        try:
            load = await self.load(gateway_uri, LOAD_CONNS, rate)
            await asyncio.sleep(self.args.warmup)
            cpu_before = process_cpu_s(self.relay_pid)
            if profile_pid and profile_out is not None:
                (sub_result, load_result), recorded = await asyncio.gather(
                    measure_all([subs, load], window),
                    py_spy_record(profile_pid, window, profile_out))
                sub_result["profiled"] = recorded
            else:
                sub_result, load_result = await measure_all([subs, load], window)
            cpu_after = process_cpu_s(self.relay_pid)
        finally:
            if load is not None:
                await load.stop()
            await subs.stop()
        cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
        return FanoutRun(count, "relay batch" if batch else "relay", sub_result, load_result,
                         rate, cpu)

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
    """Order-entry messages/s that give the relay its target's worth of events plus
    headroom at ``count`` subscribers, within the cap."""
    goal = max(TARGET_BATCH_MSGS, push_frames) if batch else push_frames
    per_subscriber = goal * args.headroom / count
    return min(args.max_input_rate, per_subscriber / max(results.calibration, 0.1))


def describe(run: FanoutRun) -> str:
    text = (f"{fmt_int(run.msgs_per_s)} msgs/s delivered "
            f"({fmt_int(run.msgs_per_s / run.subscribers)} per subscriber, "
            f"{fmt_int(run.frames_per_s)} frames/s)")
    if run.load is not None:
        lag = run.lag_ms
        text += (f", input {fmt_int(run.answered_per_s)}/s of {fmt_int(run.input_rate)} "
                 f"offered, {run.resyncs} resyncs, lag "
                 f"{'n/a' if lag is None else fmt_us(lag * 1000)}")
    share = run.relay_cpu_share
    if share is not None:
        text += f", relay CPU {share:.0%}"
    return text


async def run(args: argparse.Namespace) -> int:
    bench = Bench(args)
    progress = bench.progress
    results = Results()
    print(f"OpenMarketSim feed benchmark: python {platform.python_version()}, clients and "
          f"push server on {loop_name(args.loop)}, seed {args.seed}"
          f"{', QUICK smoke mode' if args.quick else ''}")
    print(f"load average at start: {load_average()} (the figures are shared with whatever "
          "else runs; each relay figure is compared with a push figure of the same run)")
    servers: list[ServerProcess] = []
    with tempfile.TemporaryDirectory(prefix="bench_feed_") as tmp:
        config = write_config(Path(tmp), bench_exchange_config())
        try:
            push = await start_server("bench/_wsbench.py", "push-server", "--loop", args.loop,
                                      "--seed", str(args.seed))
            servers.append(push)
            exchange = await start_server(
                "exchange_server.py", "--port", "0", "--events-port", "0", "--data-dir", tmp,
                "--config", str(config), "--log-level", "WARNING",
                *([] if args.journal else ["--no-journal"]))
            servers.append(exchange)
            relay = await start_server(
                str(args.relay_script), "--port", "0", "--exchange-uri",
                exchange.uris["events"], "--log-level", "WARNING")
            servers.append(relay)
            bench.relay_pid = relay.proc.pid
            push_uri, gateway_uri = push.uris["push"], exchange.uris["gateway"]
            feed_uri = relay.uris["feed"]
            progress(f"servers up: push pid {push.proc.pid}, exchange pid "
                     f"{exchange.proc.pid}, relay pid {relay.proc.pid}")

            # Warm-up, and the calibration: messages a subscriber gets per order sent.
            await bench.push_run(push_uri, max(args.subscribers))
            calib = await bench.relay_run(feed_uri, gateway_uri, 1, False, 2000.0,
                                          duration=max(args.warmup, 0.5))
            results.calibration = calib.msgs_per_s / max(calib.answered_per_s, 1.0)
            progress(f"warm-up done; calibration: {results.calibration:.2f} feed messages "
                     "per order-entry message")

            for count in args.subscribers:
                push_run = await bench.push_run(push_uri, count)
                results.fanout.append(push_run)
                progress(f"push        {count:>3} subscribers: {describe(push_run)}")
                for batch in (False, True):
                    rate = input_rate(args, results, count, batch, push_run.frames_per_s)
                    relay_run = await bench.relay_run(feed_uri, gateway_uri, count, batch,
                                                      rate)
                    results.fanout.append(relay_run)
                    progress(f"{relay_run.feed:<11} {count:>3} subscribers: "
                             f"{describe(relay_run)}")

            await bench.stall_test(gateway_uri, feed_uri, relay, results)

            if args.profile:
                if py_spy_path() is None:
                    print("--profile: py-spy not found (pip install py-spy); skipped")
                else:
                    await profile_relay(bench, args, results, relay, feed_uri, gateway_uri)
        finally:
            for server in reversed(servers):
                await server.stop()
    progress("servers stopped")
    print(f"load average at end: {load_average()}")
    status = report(args, results)
    for label, (path, run_) in results.profiles.items():
        print(f"\nWhere the relay's time goes, {label} ({describe(run_)}; py-spy raw "
              f"profile: {path}):")
        print_profile(path, profile_window(args.duration))
    return status


async def profile_relay(bench: Bench, args: argparse.Namespace, results: Results,
                        relay: ServerProcess, feed_uri: str, gateway_uri: str) -> None:
    count = max(args.subscribers)
    args.profile_dir.mkdir(parents=True, exist_ok=True)
    for batch in (False, True):
        earlier = results.get(count, "relay batch" if batch else "relay")
        label = f"{count} subscribers{', batch' if batch else ''}"
        out = args.profile_dir / f"bench_feed_relay_{count}{'_batch' if batch else ''}.pyspy.txt"
        run_ = await bench.relay_run(feed_uri, gateway_uri, count, batch, earlier.input_rate,
                                     duration=profile_window(args.duration),
                                     profile_pid=relay.proc.pid, profile_out=out)
        bench.progress(f"profiled the relay, {label}: {describe(run_)}")
        if run_.sub.get("profiled"):
            results.profiles[label] = (out, run_)


def _fmt_share(share: float | None) -> str:
    return "-" if share is None else f"{share:.0%}"


def _fmt_rate(rate: float | None) -> str:
    return "-" if rate is None else fmt_int(rate)


def _fanout_verdict(run: FanoutRun, push_run: FanoutRun, per_order: float) -> str:
    if run.feed == "relay batch":
        if run.subscribers != 100:
            return "-"
        ok = run.msgs_per_s >= TARGET_BATCH_MSGS
    else:
        ok = run.msgs_per_s >= TARGET_UNBATCHED_RATIO * push_run.msgs_per_s
    if ok:
        return "PASS"
    return "MISS (input-bound)" if run.kept_up(per_order) else "MISS"


def report(args: argparse.Namespace, results: Results) -> int:
    """Print the tables and targets; 1 if the exchange refused orders (the figures would
    then include refused work), else 0, whatever the targets say."""
    print(f"\nFan-out ({args.duration:g} s per run; messages counted at the subscribers, "
          "summed over them; 'vs push' against the push server at the same count):")
    rows = []
    for count in args.subscribers:
        push_run = results.get(count, "push")
        for feed in ("push", "relay", "relay batch"):
            run = results.get(count, feed)
            lag = run.lag_ms
            rows.append([
                str(count), feed, fmt_int(run.msgs_per_s),
                fmt_int(run.msgs_per_s / count), fmt_int(run.frames_per_s),
                "baseline" if feed == "push" else f"{run.msgs_per_s / push_run.msgs_per_s:.2f}x",
                "-" if run.load is None else f"{fmt_int(run.answered_per_s)}/"
                                             f"{fmt_int(run.input_rate)}",
                "-" if run.load is None else str(run.resyncs),
                "-" if lag is None else fmt_us(lag * 1000),
                _fmt_share(run.relay_cpu_share), _fmt_rate(run.full_core_estimate),
                "-" if feed == "push" else _fanout_verdict(run, push_run,
                                                           results.calibration)])
    print_table(["subs", "feed", "msgs/s", "per sub/s", "frames/s", "vs push",
                 "orders/s in/offered", "resyncs", "lag", "relay CPU", "at 1 core",
                 "target"], rows, "><>>>>>>>>><")
    print(f"(orders/s: order-entry messages/s the exchange answered / offered, "
          f"{results.calibration:.2f} feed messages each; 'resyncs': book snapshots sent "
          "to lagging subscribers; 'lag': how far the subscribers trailed the exchange as "
          "the window closed; a relay with no resync and little lag delivered all it was "
          "given and could have done more: below target that is 'input-bound'; 'relay "
          "CPU': the relay process's CPU time over the window, as a share of one core; "
          "'at 1 core': msgs/s at that cost per message if the relay had a whole core, an "
          "estimate of its own ceiling when the exchange is the limit)")

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

    print("\nTargets:")
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
