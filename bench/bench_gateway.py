"""Order-gateway benchmark: acknowledged orders/s and ack latency of ``exchange_server.py``
next to a bare websockets + orjson echo server, in the same run.

Both servers run as their own processes on free ports; the clients run in another process
(``_wsbench.py gateway-client``), never in the server's event loop, and speak WebSocket
through a lean hand-written client so that on a 2-core machine the load generator takes as
little CPU from the server as it can. Every client connection is one trader sending a seeded
flow: mostly passive GTC limits that rest, a few marketable IOC orders that trade, random
cancels, and a cap of ``--max-live`` resting orders per trader kept by canceling its
oldest, so the book stays bounded and the run measures the gateway, not a growing book.
The echo server answers each request with one reply of the type the exchange would send,
so the same client code drives both.

Measurements:

1. Closed loop with 1, 8 and 32 connections, one request in flight per connection:
   round trips/s (every request answered), acknowledged orders/s (``order_ack``
   received), and the new_order -> order_ack latency. Echo and exchange alternate, in
   ``--rounds`` rounds, and each ratio is taken within a round: these machines drift.
2. Open loop at a fixed offered rate (``--paced-rate`` order-entry messages/s, new orders
   and cancels): request k is sent at start + k/rate whatever happened before, and its
   latency is measured from that scheduled time, so a stall shows up in the figures
   instead of silently slowing the sender (no coordinated omission). Echo and exchange
   alternate here too, in ``--paced-rounds`` rounds, and each figure is the median over
   the rounds: one stall of a shared machine is one round's outlier, not the verdict.
3. Before the open-loop rounds, when a measured exchange holds replies for an fsync, the
   disk's own commit latency (write + fdatasync of one journal record, nothing else
   running): no reply that waits for its fsync comes back sooner.

The exchange is measured as shipped (``default``: write-ahead journal on, replies held
for the group-commit fsync) and, by default, also with ``--no-journal``, each in its own
process against the same echo baseline, so the cost of durability is visible apart from
the gateway's own (``--exchange`` picks the configurations; the first is the headline).
Its config (a temporary ``--config``) lifts the risk limits and turns margin off, so the
flow is never refused; rejects are counted and printed anyway.

Targets (printed PASS/MISS, never asserted): acked orders/s with 32 clients at least
0.5x the echo server's, driven by the same flow (the echo's ceiling in order acks: its
round trips less the cancels, ~49% of the flow, that keep the book bounded; comparing
the exchange's acks with all of the echo's round trips would count the exchange's
cancels as no work); p99 ack latency at most 2 ms at the paced rate.
The exit status is 1 only if the exchange rejected orders (the figures would then
include refused work), never for a missed target.

Example: ``.venv/bin/python bench/bench_gateway.py`` (about 3 min),
``--quick`` (a smoke run, under 30 s).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _commit_probe import CommitLatencies, measure_commits
from _wsbench import (
    Progress,
    Worker,
    bench_exchange_config,
    fmt_int,
    fmt_us,
    load_average,
    loop_name,
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

# acked orders/s with 32 clients vs the echo's for the same flow (its order acks, i.e. its
# round trips less the cancels the flow needs to keep the book bounded)
TARGET_RATIO_32 = 0.5
TARGET_P99_MS = 2.0  # at the paced rate
CLIENT_COUNTS = (1, 8, 32)
# Exchange configurations that can be measured side by side; the first one measured
# gives the headline figure. "default" is the exchange as shipped (journal on, group
# commit: replies wait for the fsync that covers their input).
EXCHANGE_VARIANTS: dict[str, list[str]] = {
    "default": [],
    "no-journal": ["--no-journal"],
    "flush-off": ["--journal-flush", "off"],
    "flush-interval": ["--journal-flush", "interval"],
    "flush-every": ["--journal-flush", "every"],
}
WIDTH = len("exchange/flush-interval")
# issue target: journaling "in small batches with a bound" costs at most this share of
# the no-journal throughput. That is the interval policy (acked after the write, fsynced
# within the bound); the default group commit holds every reply for its fsync, which is
# measured and stated like the per-input flush.
TARGET_JOURNAL_COST = 0.15
BOUNDED_BATCHES = "flush-interval"
DURABLE = ("default", "flush-every")  # replies wait for an fsync
COMMIT_PROBES = 2000


def variant_label(variant: str) -> str:
    return "exchange" if variant == "default" else f"exchange/{variant}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark the exchange's order gateway against a bare websockets "
                    "echo server measured in the same run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--duration", type=float, default=2.5,
                        help="seconds measured per closed-loop run")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="seconds of load before each measurement window")
    parser.add_argument("--rounds", type=int, default=3,
                        help="closed-loop rounds (echo and exchange alternate; medians)")
    parser.add_argument("--paced-rate", type=float, default=5000.0,
                        help="offered order-entry messages/s (new orders and cancels) in "
                             "the open-loop latency run")
    parser.add_argument("--paced-duration", type=float, default=5.0,
                        help="seconds measured in the open-loop latency run")
    parser.add_argument("--paced-conns", type=int, default=8,
                        help="connections the paced rate is spread over")
    parser.add_argument("--paced-rounds", type=int, default=3,
                        help="open-loop rounds (echo and exchange alternate; medians)")
    parser.add_argument("--clients", type=int, nargs="+", metavar="N",
                        default=list(CLIENT_COUNTS),
                        help="closed-loop connection counts")
    parser.add_argument("--exchange", nargs="+", choices=list(EXCHANGE_VARIANTS),
                        metavar="NAME",
                        default=["default", "no-journal", "flush-interval", "flush-every"],
                        help="exchange configurations to measure, each against the same "
                             f"echo baseline ({', '.join(EXCHANGE_VARIANTS)}); the first "
                             "gives the headline figure")
    parser.add_argument("--seed", type=int, default=42, help="seed of the order flow")
    parser.add_argument("--max-live", type=int, default=32,
                        help="resting orders per trader before its oldest is canceled")
    parser.add_argument("--loop", choices=["auto", "asyncio"], default="auto",
                        help="event loop of the clients and the echo server (auto: uvloop "
                             "when installed; the exchange picks its own)")
    parser.add_argument("--profile", action="store_true",
                        help="after the measurements, sample each exchange with py-spy "
                             "under the largest closed-loop load and print where its time "
                             "goes (needs py-spy: pip install py-spy)")
    parser.add_argument("--profile-dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the raw py-spy profiles are kept")
    parser.add_argument("--quick", action="store_true",
                        help="smoke mode: everything once, briefly (under 30 s)")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.rounds = 0.6, 0.3, 1
        args.paced_duration, args.paced_rounds = 1.0, 1
    return args


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.progress = Progress()
        self.runs = 0

    async def client_run(self, server: str, uri: str, conns: int, *, rate: float = 0.0,
                         duration: float, profile_pid: int = 0,
                         profile_out: Path | None = None) -> dict[str, Any]:
        """One client process: connect, log in, load for the warm-up, then measure
        (sampling ``profile_pid`` with py-spy over the same window, if given)."""
        args = self.args
        self.runs += 1
        worker = await Worker.start(
            f"{server} client ({conns} connections)", "gateway-client", "--uri", uri,
            "--conns", str(conns), "--rate", str(rate), "--seed", str(args.seed + self.runs),
            "--trader-prefix", "bench", "--max-live", str(args.max_live),
            "--loop", args.loop)
        try:
            await asyncio.sleep(args.warmup)
            if profile_pid and profile_out is not None:
                result, recorded = await asyncio.gather(
                    worker.measure(duration), py_spy_record(profile_pid, duration, profile_out))
                result["profiled"] = recorded
            else:
                result = await worker.measure(duration)
        finally:
            await worker.stop()
        elapsed = result["elapsed"]
        result["rt_per_s"] = (result["acks"] + result["cancels"] + result["order_rejects"]
                              + result["cancel_rejects"]) / elapsed
        result["acks_per_s"] = result["acks"] / elapsed
        result["fills_per_s"] = result["fills"] / elapsed
        result["offered_per_s"] = (result["sent_new"] + result["sent_cancel"]) / elapsed
        return result


def describe(result: dict[str, Any]) -> str:
    return (f"{fmt_int(result['rt_per_s'])} round trips/s, "
            f"{fmt_int(result['acks_per_s'])} acked orders/s, "
            f"p50 {fmt_us(result['p50_us'])}, p99 {fmt_us(result['p99_us'])}, "
            f"{result['order_rejects']} order rejects")


async def run(args: argparse.Namespace) -> int:
    bench = Bench(args)
    progress = bench.progress
    print(f"OpenMarketSim gateway benchmark: python {platform.python_version()}, clients "
          f"and echo server on {loop_name(args.loop)}, seed {args.seed}"
          f"{', QUICK smoke mode' if args.quick else ''}")
    print(f"load average at start: {load_average()} (the figures are shared with whatever "
          "else runs; the ratios are taken within each round)")
    servers: list[ServerProcess] = []
    exchanges = [variant_label(v) for v in args.exchange]
    closed: dict[tuple[str, int], list[dict[str, Any]]] = {}
    # exchange / echo within a round: acked orders/s, and round trips/s
    ratios: dict[tuple[str, int], list[float]] = {}
    rt_ratios: dict[tuple[str, int], list[float]] = {}
    paced: dict[str, list[dict[str, Any]]] = {}
    commits: CommitLatencies | None = None
    profiles: dict[str, tuple[Path, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_gateway_") as tmp:
        config = write_config(Path(tmp), bench_exchange_config())
        try:
            echo = await start_server("bench/_wsbench.py", "echo-server", "--loop", args.loop)
            servers.append(echo)
            uris = {"echo": echo.uris["echo"]}
            pids = [f"echo pid {echo.proc.pid}"]
            for variant, label in zip(args.exchange, exchanges, strict=True):
                data_dir = Path(tmp) / variant  # each its own journal
                data_dir.mkdir()
                exchange = await start_server(
                    "exchange_server.py", "--port", "0", "--events-port", "0", "--data-dir",
                    str(data_dir), "--config", str(config), "--log-level", "WARNING",
                    *EXCHANGE_VARIANTS[variant])
                servers.append(exchange)
                uris[label] = exchange.uris["gateway"]
                pids.append(f"{label} pid {exchange.proc.pid}")
            progress("servers up: " + ", ".join(pids))

            # A fresh server is slower on its first connections (allocator, caches).
            for name, uri in uris.items():
                await bench.client_run(name, uri, max(args.clients), duration=args.warmup)
            progress("warm-up done")

            names = list(uris)
            for round_no in range(1, args.rounds + 1):
                for n in args.clients:
                    # rotate who goes first, so no server always follows the same one
                    shift = (round_no - 1) % len(names)
                    pair: dict[str, dict[str, Any]] = {}
                    for name in names[shift:] + names[:shift]:
                        result = await bench.client_run(name, uris[name], n,
                                                        duration=args.duration)
                        closed.setdefault((name, n), []).append(result)
                        pair[name] = result
                        progress(f"round {round_no}/{args.rounds}, {name:<{WIDTH}} {n:>2} "
                                 f"clients: {describe(result)}")
                    for name in exchanges:
                        ratios.setdefault((name, n), []).append(
                            pair[name]["acks_per_s"] / pair["echo"]["acks_per_s"])
                        rt_ratios.setdefault((name, n), []).append(
                            pair[name]["rt_per_s"] / pair["echo"]["rt_per_s"])

            if args.paced_rounds and any(v in DURABLE for v in args.exchange):
                commits = measure_commits(Path(tmp) / "commit-probe", COMMIT_PROBES)
                progress("disk commit probe (write + fdatasync of one record, no other "
                         f"load): {commits.describe(commits.commits)}")
            for round_no in range(1, args.paced_rounds + 1):
                shift = (round_no - 1) % len(names)
                for name in names[shift:] + names[:shift]:
                    result = await bench.client_run(name, uris[name], args.paced_conns,
                                                    rate=args.paced_rate,
                                                    duration=args.paced_duration)
                    paced.setdefault(name, []).append(result)
                    progress(f"paced round {round_no}/{args.paced_rounds}, {name:<{WIDTH}} "
                             f"at {fmt_int(args.paced_rate)}/s offered: "
                             f"{describe(result)}, p99.9 {fmt_us(result['p999_us'])}")

            if args.profile:
                profiles = await profile_exchanges(bench, args, exchanges, uris, servers)
        finally:
            for server in reversed(servers):
                await server.stop()
    progress("servers stopped")
    print(f"load average at end: {load_average()}")
    status = report(args, exchanges, closed, ratios, rt_ratios, paced, commits)
    for label, (path, result) in profiles.items():
        print(f"\nWhere {label}'s time goes at {max(args.clients)} closed-loop clients "
              f"({fmt_int(result['acks_per_s'])} acked orders/s while sampled; py-spy raw "
              f"profile: {path}):")
        print_profile(path, profile_window(args.duration))
    return status


async def profile_exchanges(bench: Bench, args: argparse.Namespace, exchanges: list[str],
                            uris: dict[str, str], servers: list[ServerProcess]
                            ) -> dict[str, tuple[Path, dict[str, Any]]]:
    if py_spy_path() is None:
        print("--profile: py-spy not found (pip install py-spy); skipped")
        return {}
    profiles = {}
    args.profile_dir.mkdir(parents=True, exist_ok=True)
    pids = {label: server.proc.pid for label, server in zip(exchanges, servers[1:],
                                                            strict=True)}
    for label in exchanges:
        out = args.profile_dir / f"bench_gateway_{label.replace('/', '_')}.pyspy.txt"
        result = await bench.client_run(label, uris[label], max(args.clients),
                                        duration=profile_window(args.duration),
                                        profile_pid=pids[label], profile_out=out)
        bench.progress(f"profiled {label}: {describe(result)}")
        if result.get("profiled"):
            profiles[label] = (out, result)
    return profiles


def _med(results: list[dict[str, Any]], key: str) -> float:
    return median([r[key] for r in results])


def report(args: argparse.Namespace, exchanges: list[str],
           closed: dict[tuple[str, int], list[dict[str, Any]]],
           ratios: dict[tuple[str, int], list[float]],
           rt_ratios: dict[tuple[str, int], list[float]],
           paced: dict[str, list[dict[str, Any]]], commits: CommitLatencies | None) -> int:
    rejects: Counter[str] = Counter()
    if closed:
        report_closed(args, exchanges, closed, ratios, rt_ratios, rejects)
    if paced:
        report_paced(args, paced)
    for name in exchanges:
        for r in paced.get(name, []):
            rejects.update(r["reject_codes"])
    if rejects:
        print("\nreject/error codes from the exchange: " +
              ", ".join(f"{code} x{count}" for code, count in rejects.most_common()))

    print("\nTargets:")
    top = 32 if 32 in args.clients else max(args.clients)
    for name in exchanges:
        if closed:
            print_throughput_target(name, top, closed, ratios)
        if paced:
            print_latency_target(args, name, paced)
    if paced and commits is not None:
        print(f"  (a reply that waits for its fsync comes no sooner than the disk commits: "
              f"write + fdatasync of one record, on an otherwise idle machine, "
              f"{commits.describe(commits.commits)})")
    status = 0
    order_rejects = sum(r["order_rejects"] for (name, _), rs in closed.items()
                        if name != "echo" for r in rs)
    order_rejects += sum(r["order_rejects"] for name in exchanges for r in paced.get(name, []))
    if order_rejects:
        status = 1
        print(f"  WARNING: the exchange rejected {order_rejects} orders: the workload is "
              "meant to pass every risk check, so these figures include refused work")
    if closed:
        print_journal_cost(exchanges, ratios, top)
        headline = exchanges[0]
        print(f"\ngateway: {fmt_int(_med(closed[(headline, top)], 'acks_per_s'))} acked "
              f"orders/s ({top} clients)")
    return status


def report_closed(args: argparse.Namespace, exchanges: list[str],
                  closed: dict[tuple[str, int], list[dict[str, Any]]],
                  ratios: dict[tuple[str, int], list[float]],
                  rt_ratios: dict[tuple[str, int], list[float]],
                  rejects: Counter[str]) -> None:
    rounds = f"median of {args.rounds} rounds" if args.rounds > 1 else "1 round"
    print(f"\nClosed loop, one request in flight per connection ({rounds}, "
          f"{args.duration:g} s each; 'x echo': the exchange's figure over the echo's in "
          "the same round, same order flow and client code):")
    rows = []
    for n in args.clients:
        for name in ["echo", *exchanges]:
            results = closed[(name, n)]
            for r in results:
                rejects.update(r["reject_codes"] if name != "echo" else {})
            sent_new = sum(r["sent_new"] for r in results)
            sent_all = sent_new + sum(r["sent_cancel"] for r in results)
            rows.append([
                name, str(n), fmt_int(_med(results, "rt_per_s")),
                fmt_int(_med(results, "acks_per_s")),
                "baseline" if name == "echo" else f"{median(rt_ratios[(name, n)]):.2f}x",
                "baseline" if name == "echo" else f"{median(ratios[(name, n)]):.2f}x",
                fmt_us(_med(results, "p50_us")), fmt_us(_med(results, "p99_us")),
                f"{100 * sent_new / max(sent_all, 1):.0f}%",
                fmt_int(_med(results, "fills_per_s")),
                str(sum(r["order_rejects"] for r in results)),
                str(sum(r["cancel_rejects"] + r["errors"] for r in results))])
    print_table(["server", "clients", "round trips/s", "acked orders/s", "rt x echo",
                 "acks x echo", "p50 ack", "p99 ack", "new/all", "fills/s", "order rejects",
                 "cancel rej+err"], rows, "<>>>>>>>>>>>")
    print("(round trips: every request answered, new orders and cancels; new/all: share of "
          "requests that were new orders, the rest cancels that keep the book bounded; a "
          "cancel reject is a cancel that crossed its order's last fill)")


def report_paced(args: argparse.Namespace, paced: dict[str, list[dict[str, Any]]]) -> None:
    paced_rounds = (f"median of {args.paced_rounds} rounds" if args.paced_rounds > 1
                    else "1 round")
    print(f"\nOpen loop at {fmt_int(args.paced_rate)} order-entry messages/s offered over "
          f"{args.paced_conns} connections ({paced_rounds}, {args.paced_duration:g} s each); "
          "latency from each request's scheduled send time:")
    rows = []
    for name, results in paced.items():
        rows.append([name, fmt_int(_med(results, "offered_per_s")),
                     fmt_int(_med(results, "rt_per_s")), fmt_int(_med(results, "acks_per_s")),
                     fmt_us(_med(results, "p50_us")), fmt_us(_med(results, "p99_us")),
                     " ".join(fmt_us(r["p99_us"]) for r in results),
                     fmt_us(_med(results, "p999_us")), fmt_us(_med(results, "max_us")),
                     fmt_us(_med(results, "send_lag_p99_us")),
                     str(sum(r["order_rejects"] for r in results)),
                     str(sum(r["skipped"] for r in results))])
    print_table(["server", "sent/s", "answered/s", "acked orders/s", "p50 ack", "p99 ack",
                 "p99 per round", "p99.9", "max", "send lag p99", "rejects", "shed"], rows,
                "<>>>>>>>>>>>")
    print("(send lag: how late the client's pacer sent, part of the latency above; "
          "'shed': sends skipped because the server was far behind)")


def print_throughput_target(name: str, top: int,
                            closed: dict[tuple[str, int], list[dict[str, Any]]],
                            ratios: dict[tuple[str, int], list[float]]) -> None:
    echo = closed[("echo", top)]
    ratio = median(ratios[(name, top)])
    print(f"  {name}: acked orders/s with {top} clients >= {TARGET_RATIO_32:.1f}x the "
          f"echo's: {ratio:.2f}x ({fmt_int(_med(closed[(name, top)], 'acks_per_s'))} vs "
          f"{fmt_int(_med(echo, 'acks_per_s'))}; the echo's ceiling is "
          f"{fmt_int(_med(echo, 'rt_per_s'))} round trips/s of which "
          f"{fmt_int(_med(echo, 'acks_per_s'))} order acks)  "
          f"{verdict(ratio >= TARGET_RATIO_32)}")


def print_latency_target(args: argparse.Namespace, name: str,
                         paced: dict[str, list[dict[str, Any]]]) -> None:
    if not all(r["acks_per_s"] for r in paced[name]):  # a round without a latency
        print(f"  {name}: p99 ack latency at {fmt_int(args.paced_rate)}/s offered: "
              "a round acknowledged no order in its window  MISS")
        return
    p99_ms = _med(paced[name], "p99_us") / 1000
    print(f"  {name}: p99 ack latency at {fmt_int(args.paced_rate)}/s offered <= "
          f"{TARGET_P99_MS:g} ms: {p99_ms:.2f} ms (echo "
          f"{_med(paced['echo'], 'p99_us') / 1000:.2f} ms; medians of the rounds)  "
          f"{verdict(p99_ms <= TARGET_P99_MS)}")


def print_journal_cost(exchanges: list[str], ratios: dict[tuple[str, int], list[float]],
                       top: int) -> None:
    """What durability costs: each journal policy's acked orders/s over the no-journal
    exchange's, round by round (both measured against the same echo in each round)."""
    base = variant_label("no-journal")
    if base not in exchanges:
        return
    print(f"\nJournal cost with {top} clients (acked orders/s against {base}, same round; "
          "batch: replies wait for a group fsync; interval: replies wait for the write, "
          "fsync in the background; every: an fsync per input):")
    for name in exchanges:
        if name == base or name == variant_label("flush-off"):
            continue
        per_round = [a / b for a, b in zip(ratios[(name, top)], ratios[(base, top)],
                                                 strict=True)]
        cost = 1 - median(per_round)
        target = (f"<= {TARGET_JOURNAL_COST:.0%}  {verdict(cost <= TARGET_JOURNAL_COST)}"
                  if name == variant_label(BOUNDED_BATCHES) else "(measured and stated)")
        print(f"  {name}: {median(per_round):.2f}x no-journal, cost {cost:.0%} {target}")


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
