"""The disk's commit latency: what one journal record costs to make durable.

An acknowledgement that waits for its input's fsync (the exchange's default journal
policy) cannot come back sooner than this, so the benchmarks print it as the floor next
to the figures it bounds (``bench_gateway.py``, ``bench_recovery.py``).
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

from journal import JournalWriter, command_record  # noqa: E402
from models import NewOrder, OrderType, Side  # noqa: E402


@dataclass(frozen=True, slots=True)
class CommitLatencies:
    record_bytes: int
    file_bytes: int
    commits: list[float]  # write + fdatasync, seconds
    syncs: list[float]  # the fdatasync alone

    @staticmethod
    def describe(values: list[float]) -> str:
        q = statistics.quantiles(values, n=100)
        return (f"p50 {q[49] * 1e3:.3f}  p90 {q[89] * 1e3:.3f}  p99 {q[98] * 1e3:.3f}  "
                f"max {max(values) * 1e3:.3f} ms")

    def p99_ms(self) -> float:
        return statistics.quantiles(self.commits, n=100)[98] * 1e3


def measure_commits(directory: Path, count: int) -> CommitLatencies:
    """``count`` times: append one order record to a journal in ``directory`` (created,
    then removed), write it and fdatasync it, as the exchange's group commit does."""
    writer = JournalWriter.create(directory, 1, {"seq": 0, "ts": 0})
    record = command_record(NewOrder("trader-0001", "c" * 200, "SIM", Side.BUY,
                                     OrderType.LIMIT, 5, 10_000), 1, 1)
    commits: list[float] = []
    syncs: list[float] = []
    try:
        for _ in range(count):  # no stat() in the loop: one added 0.09 ms to fsyncs
            writer.append(record)
            started = time.perf_counter()
            writer.write()
            written = time.perf_counter()
            writer.sync()
            commits.append(time.perf_counter() - started)
            syncs.append(time.perf_counter() - written)
        size = writer.path.stat().st_size
    finally:
        writer.close()
        shutil.rmtree(directory, ignore_errors=True)
    return CommitLatencies(len(record), size, commits, syncs)
