"""Crash-recovery and journal-cost benchmark.

1. Recovery: build a journal of ``--inputs`` inputs (default 1,000,000: a seeded mix of
   passive limits near a drifting mid, cancels, marketable orders, leaderboard and
   performance ticks) through the live code path (``Exchange.submit`` with snapshots
   every ``--snapshot-every``), stop it the way a crash would (no final snapshot: the
   tail to replay is close to a whole snapshot interval, the worst case), then time, in
   fresh processes,
   ``replay.recover`` and ``exchange_server.py`` from start to READY. Target: < 10 s.
2. Journal cost: gateway throughput of a real ``exchange_server.py`` with the journal
   off (``--no-journal``), ``--journal-flush off``, ``batch``, ``interval`` and ``every``, driven by
   pipelined clients in another process, and the server's CPU time per request (which
   the client process and other load on the machine do not distort); modes are
   interleaved over rounds (these machines drift +-15%) and both are compared with
   ``--no-journal``. Target: journaling in small batches with a bound (``interval``:
   acked after the write, fsynced within the bound) costs at most 15%; ``batch`` (group
   commit: every reply waits for its fsync) and ``every`` are measured and stated.

3. Commit latency: one ~300-byte record at a time through ``JournalWriter`` (append,
   write, fdatasync), ``--commits`` times in a fresh segment: what the fsync a lone
   input's ack waits for costs, as p50/p90/p99 (the segment's preallocated zeros make
   most of these fdatasyncs data-only; the few that follow an extension write a chunk).

Figures are printed with PASS/MISS, never asserted.

    .venv/bin/python bench/bench_recovery.py                  # all parts
    .venv/bin/python bench/bench_recovery.py --skip-throughput --inputs 200000
    .venv/bin/python bench/bench_recovery.py --skip-recovery --skip-throughput  # commits
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.append(str(_REPO))

from _commit_probe import measure_commits  # noqa: E402

from config import config_from_dict  # noqa: E402
from exchange_server import Exchange, FlushPolicy  # noqa: E402
from models import CancelOrder, NewOrder, OrderType, Side, TimeInForce  # noqa: E402
from replay import recover  # noqa: E402

log = logging.getLogger("bench_recovery")

RECOVERY_TARGET_S = 10.0
BATCH_COST_TARGET = 0.15
BENCH_CONFIG: dict[str, Any] = {
    "risk": {"max_order_qty": 10**6, "max_position": 10**9, "max_open_orders": 10**6,
             "rate_limit_per_sec": 10.0**9, "rate_limit_burst": 10**9},
    "margin": {"enabled": False},
}
MODES = {"no journal": ["--no-journal"], "off": ["--journal-flush", "off"],
         "batch": ["--journal-flush", "batch"], "interval": ["--journal-flush", "interval"],
         "every": ["--journal-flush", "every"]}


# ===================================================================== recovery


def generate(data_dir: Path, inputs: int, snapshot_every: int, seed: int) -> None:
    """Journal ``inputs`` inputs through the exchange's own path; end as a crash would
    (everything written, no final snapshot)."""
    asyncio.run(_generate(data_dir, inputs, snapshot_every, seed))


async def _generate(data_dir: Path, inputs: int, snapshot_every: int, seed: int) -> None:
    config = config_from_dict(BENCH_CONFIG)
    recovered = recover(data_dir, config)
    exchange = Exchange(config, recovered.telemetry, recovered=recovered,
                        flush=FlushPolicy.OFF, snapshot_every=snapshot_every)
    commits = exchange.commits
    assert commits is not None
    rng = random.Random(seed)
    live: list[tuple[str, int]] = []
    mid = 10_000
    started = time.perf_counter()
    n = 0
    while commits.journal.next_number <= inputs:  # some steps journal two inputs
        n += 1
        if n % 1_000 == 0:
            exchange.publish_leaderboard()
        elif n % 5_000 == 0:
            exchange.write_performance()
        else:
            mid = _one_command(exchange, rng, live, mid, n)
        if n % 1_024 == 0:
            commits.flush()  # an event-loop turn: write the group, snapshot when due
        if n % 100_000 == 0:
            log.info("journaled %d inputs (%.0f/s)", commits.journal.next_number - 1,
                     n / (time.perf_counter() - started))
    commits.close()  # written and synced; no final snapshot: the worst case
    exchange.telemetry.close()


def _one_command(exchange: Exchange, rng: random.Random, live: list[tuple[str, int]],
                 mid: int, n: int) -> int:
    roll = rng.random()
    if roll < 0.25 and live:
        trader, order_id = live.pop(rng.randrange(len(live)))
        exchange.submit(CancelOrder(trader, order_id))
        return mid
    trader = f"t{rng.randrange(20)}"
    side = Side.BUY if rng.random() < 0.5 else Side.SELL
    if roll < 0.30:  # marketable: trades at once, never rests
        price = mid + (8 if side is Side.BUY else -8)
        exchange.submit(NewOrder(trader, f"c{n}", "SIM", side, OrderType.LIMIT,
                                 rng.randint(1, 5), price, None, TimeInForce.IOC))
        return mid
    offset = rng.randint(1, 20)
    price = mid - offset if side is Side.BUY else mid + offset
    exchange.submit(NewOrder(trader, f"c{n}", "SIM", side, OrderType.LIMIT,
                             rng.randint(1, 10), price))
    live.append((trader, exchange.engine.next_order_id - 1))
    if len(live) > 5_000:  # keep the book a realistic size
        trader, order_id = live.pop(0)
        exchange.submit(CancelOrder(trader, order_id))
    return min(max(mid + rng.choice((-1, 0, 0, 1)), 9_500), 10_500)


def measure_recover(data_dir: Path) -> dict[str, Any]:
    """``replay.recover`` in this (fresh) process, on a copy of ``data_dir``."""
    work = Path(tempfile.mkdtemp(prefix="omsbench-recover-"))
    try:
        copy = work / "run"
        shutil.copytree(data_dir, copy)
        started = time.perf_counter()
        recovered = recover(copy, config_from_dict(BENCH_CONFIG))
        seconds = time.perf_counter() - started
        result = {"seconds": seconds, "inputs": recovered.inputs,
                  "snapshot_at": recovered.snapshot_at, "replayed": recovered.replayed,
                  "resting_orders": len(recovered.engine.orders)}
        recovered.journal.close()
        recovered.telemetry.close()
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure_ready(data_dir: Path, config_path: Path) -> float:
    """Seconds from starting exchange_server.py on a copy of ``data_dir`` to READY."""
    work = Path(tempfile.mkdtemp(prefix="omsbench-ready-"))
    try:
        copy = work / "run"
        shutil.copytree(data_dir, copy)
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, str(_REPO / "exchange_server.py"), "--port", "0",
             "--events-port", "0", "--data-dir", str(copy), "--config", str(config_path),
             "--log-level", "WARNING"], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("READY "):
                    return time.perf_counter() - started
            raise RuntimeError(f"exchange_server.py exited with {proc.wait()} before READY")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_recovery(args: argparse.Namespace, work: Path) -> None:
    data_dir = work / "recovery-run"
    config_path = work / "bench-config.json"
    config_path.write_text(json.dumps(BENCH_CONFIG))
    started = time.perf_counter()
    generate(data_dir, args.inputs, args.snapshot_every, args.seed)
    journal_mb = sum(p.stat().st_size for p in (data_dir / "journal").iterdir()) / 2**20
    print(f"journal: {args.inputs:,} inputs, snapshots every {args.snapshot_every:,}, "
          f"{journal_mb:.0f} MiB in {data_dir}, built in {time.perf_counter() - started:.1f} s")
    child = subprocess.run(
        [sys.executable, __file__, "--measure-recover", str(data_dir)],
        capture_output=True, text=True, check=True)
    result = json.loads(child.stdout.strip().splitlines()[-1])
    ready = measure_ready(data_dir, config_path)
    verdict = "PASS" if ready < RECOVERY_TARGET_S else "MISS"
    print(f"recover(): {result['seconds']:.2f} s (snapshot at input #{result['snapshot_at']:,} "
          f"+ {result['replayed']:,} inputs replayed; {result['resting_orders']:,} resting "
          "orders)")
    print(f"exchange_server.py start to READY: {ready:.2f} s "
          f"(target < {RECOVERY_TARGET_S:.0f} s: {verdict})")


# ===================================================================== throughput


def ws_frame(payload: bytes) -> bytes:
    """A client text frame with an all-zero mask (legal, and the payload stays as is)."""
    n = len(payload)
    head = bytes((0x81, 0x80 | n)) if n < 126 else bytes((0x81, 0xFE)) + n.to_bytes(2, "big")
    return head + b"\0\0\0\0" + payload


REPLIES = (b'"type":"order_ack"', b'"type":"order_reject"', b'"type":"order_canceled"',
           b'"type":"cancel_reject"')


def count_replies(data: bytes) -> int:
    return sum(data.count(reply) for reply in REPLIES)


async def raw_client(gateway: str, index: int, orders: int, window: int) -> None:
    """One trader on a bare socket: pre-framed requests, replies counted in the raw byte
    stream. It costs a few microseconds per request, so the exchange, not the client,
    is what saturates (a websockets client costs about as much as the server)."""
    host, port = gateway.removeprefix("ws://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                 "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    await reader.readuntil(b"\r\n\r\n")
    writer.write(ws_frame(json.dumps({"type": "login", "trader_id": f"b{index}"}).encode()))
    side = "buy" if index % 2 == 0 else "sell"  # one side each: no self-trade cancels
    frames = []
    for n in range(orders):
        price = 10_000 + (n % 3) + (0 if side == "buy" else 1)
        frames.append(ws_frame(json.dumps({"type": "new_order", "client_order_id": f"o{n}",
                                           "side": side, "qty": 1, "price": price}).encode()))
        frames.append(ws_frame(json.dumps({"type": "cancel_order",
                                           "client_order_id": f"o{n}"}).encode()))
    sent = min(window, len(frames))
    writer.write(b"".join(frames[:sent]))
    replies, tail = 0, b""
    while replies < len(frames):
        chunk = await reader.read(1 << 16)
        if not chunk:
            raise RuntimeError("the exchange closed the connection")
        data = tail + chunk
        replies += count_replies(data) - count_replies(tail)  # each reply counted once
        tail = data[-32:]
        more = min(len(frames), replies + window) - sent
        if more > 0:
            writer.write(b"".join(frames[sent:sent + more]))
            sent += more
    writer.close()


async def drive(gateway: str, clients: int, orders: int, window: int) -> float:
    """Each client keeps ``window`` requests in flight (a new order, then its cancel; one
    reply each); returns requests per second over all clients."""
    started = time.perf_counter()
    await asyncio.gather(*(raw_client(gateway, i, orders, window) for i in range(clients)))
    return clients * orders * 2 / (time.perf_counter() - started)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_mode(mode: str, work: Path, config_path: Path,
             args: argparse.Namespace) -> tuple[float, float]:
    """(requests/s, server CPU microseconds per request) of one exchange in ``mode``."""
    data_dir = Path(tempfile.mkdtemp(prefix=f"omsbench-{mode.replace(' ', '-')}-", dir=work))
    proc = subprocess.Popen(
        [sys.executable, str(_REPO / "exchange_server.py"), "--port", "0", "--events-port",
         "0", "--data-dir", str(data_dir), "--config", str(config_path), "--log-level",
         "WARNING", *MODES[mode]], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("READY "):
            raise RuntimeError(f"{mode}: exchange did not start: {line!r}")
        gateway = json.loads(line[len("READY "):])["gateway"]
        orders = args.orders // 10 if mode == "every" else args.orders  # ~2k fsyncs/s
        asyncio.run(drive(gateway, args.clients, orders // 10, args.window))  # warm up
        cpu = cpu_seconds(proc.pid)
        rate = asyncio.run(drive(gateway, args.clients, orders, args.window))
        requests = args.clients * orders * 2
        return rate, (cpu_seconds(proc.pid) - cpu) / requests * 1e6
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        shutil.rmtree(data_dir, ignore_errors=True)


def bench_throughput(args: argparse.Namespace, work: Path) -> None:
    config_path = work / "bench-config.json"
    config_path.write_text(json.dumps(BENCH_CONFIG))
    modes = ["no journal", *(m for m in args.modes if m != "no journal")]
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    cpus: dict[str, list[float]] = {mode: [] for mode in modes}
    for round_no in range(args.rounds):
        for mode in modes:
            if mode == "every" and round_no:  # an fsync per input: one round says enough
                continue
            rate, cpu = run_mode(mode, work, config_path, args)
            rates[mode].append(rate)
            cpus[mode].append(cpu)
            log.info("round %d %s: %.0f requests/s, %.1f us CPU/request", round_no + 1, mode,
                     rate, cpu)
    base_rate = statistics.median(rates["no journal"])
    base_cpu = statistics.median(cpus["no journal"])
    print(f"gateway ({args.clients} clients x {args.orders:,} orders + cancels, "
          f"{args.window} in flight each; median of {args.rounds} interleaved rounds; "
          f"data dir on {work}):")
    for mode in modes:
        rate, cpu = statistics.median(rates[mode]), statistics.median(cpus[mode])
        rate_cost, cpu_cost = 1 - rate / base_rate, cpu / base_cpu - 1
        extra = ""
        if mode == "interval":  # small batches with a bound: the target's policy
            worst = max(rate_cost, cpu_cost)
            extra = f"  target cost <= {BATCH_COST_TARGET:.0%}: " \
                    f"{'PASS' if worst <= BATCH_COST_TARGET else 'MISS'}"
        print(f"  {mode:<10} {rate:>8,.0f} requests/s (ratio {rate / base_rate:.2f}, "
              f"cost {rate_cost:+.0%})  server CPU {cpu:6.1f} us/request "
              f"(cost {cpu_cost:+.0%}){extra}")


# ===================================================================== commit latency


def bench_commits(args: argparse.Namespace, work: Path) -> None:
    probe = measure_commits(work / "commit-probe", args.commits)
    print(f"commit ({args.commits:,} x one {probe.record_bytes}-byte record: write + "
          f"fdatasync; a {probe.file_bytes / 2**20:.1f} MiB file at the end; data dir on "
          f"{work}):")
    print(f"  write+fdatasync  {probe.describe(probe.commits)}")
    print(f"  fdatasync        {probe.describe(probe.syncs)}")


# ===================================================================== CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=1_000_000,
                        help="journaled inputs for the recovery part (%(default)s)")
    parser.add_argument("--snapshot-every", type=int, default=100_000, help="(%(default)s)")
    parser.add_argument("--seed", type=int, default=42, help="(%(default)s)")
    parser.add_argument("--data-dir", type=Path,
                        help="where to build the journals (default: a temp dir, removed)")
    parser.add_argument("--clients", type=int, default=8, help="(%(default)s)")
    parser.add_argument("--orders", type=int, default=10_000,
                        help="orders per client per throughput run (%(default)s)")
    parser.add_argument("--window", type=int, default=128,
                        help="requests in flight per client (%(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="(%(default)s)")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES),
                        help="journal modes to compare with 'no journal' (all)")
    parser.add_argument("--commits", type=int, default=3_000,
                        help="records written and synced one by one (%(default)s)")
    parser.add_argument("--skip-recovery", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-commits", action="store_true")
    parser.add_argument("--measure-recover", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--log-level", default="WARNING",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="(%(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.measure_recover is not None:  # the child process of bench_recovery
        print(json.dumps(measure_recover(args.measure_recover)))
        return 0
    work = args.data_dir or Path(tempfile.mkdtemp(prefix="omsbench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if not args.skip_recovery:
            bench_recovery(args, work)
        if not args.skip_throughput:
            bench_throughput(args, work)
        if not args.skip_commits:
            bench_commits(args, work)
    finally:
        if args.data_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
