"""Shared machinery of the WebSocket benchmarks (``bench_gateway.py``, ``bench_feed.py``).

Imported, it gives the coordinator side: ``Worker`` (a helper process driven over its
stdin/stdout), the exchange config the benchmarks run with, percentiles and table
printing. Run as a script, it is one of those helper processes:

- ``echo-server``: the request/response reference, bare websockets + orjson. Each frame
  is decoded and sent back with its ``type`` turned into the reply the exchange would
  give (``order_ack``, ``order_canceled``, ``login_ack``), so the gateway's client code
  drives it unchanged.
- ``push-server``: the fan-out reference, bare websockets. Encodes one small
  ``book_update``-shaped message at a time and pushes it to every subscriber, one
  message per frame, as fast as the slowest subscriber takes them.
- ``gateway-client``: N trader connections sending a seeded order flow, closed loop
  (one request in flight per connection) or open loop at a fixed offered rate.
- ``subscribers``: N feed subscribers counting what they receive (or one that never
  reads, ``--stall``).

Both servers print ``READY {json of uris}`` like the project's servers, so
``launcher.start_server`` runs them. Workers print ``READY`` once connected and then
answer ``measure SECONDS`` with ``RESULT {json}`` (counters over exactly that window)
until ``stop`` or end of input.

The clients speak WebSocket through a small hand-written protocol class instead of the
websockets client: on a 2-core machine the clients share the CPU with the server under
test, and websockets' per-frame cost on the receiving side (futures, assembler, one
coroutine step per message) would make the load generator the bottleneck, most of all
for 100 subscribers reading 10^5-10^6 messages/s.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import orjson

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from launcher import python_env  # noqa: E402

WORKER_READY_TIMEOUT_S = 60.0
WORKER_STOP_TIMEOUT_S = 10.0
STALLED_RCVBUF = 16 * 1024
CONNECT_WAVE = 100  # connections opened at once (the default listen backlog is 100)
REFERENCE_PRICE = 10_000  # ticks; the exchange's default band centre
SYMBOL = "SIM"


# ===================================================================== event loop


def run_loop(main: Coroutine[Any, Any, Any], loop: str = "auto") -> Any:
    """Run ``main`` on uvloop when it is installed (and not refused), else plain asyncio."""
    if loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def loop_name(loop: str = "auto") -> str:
    if loop == "asyncio":
        return "asyncio"
    try:
        import uvloop
    except ImportError:
        return "asyncio (uvloop not installed)"
    return f"uvloop {uvloop.__version__}"


# ===================================================================== statistics


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values)) - 1))
    return float(sorted_values[rank])


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if not n:
        return 0.0
    mid = n // 2
    return float(ordered[mid]) if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def fmt_int(value: float) -> str:
    return f"{value:,.0f}"


def fmt_us(value_us: float) -> str:
    """Microseconds as a short human figure."""
    if value_us >= 1000:
        return f"{value_us / 1000:.2f} ms"
    return f"{value_us:.0f} us"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]],
                align: str | None = None) -> None:
    """A plain aligned text table; ``align`` has one ``<``/``>`` per column."""
    align = align or "<" + ">" * (len(headers) - 1)
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, align, widths, strict=True))

    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))


def load_average() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "n/a"
    return f"{one:.2f} (1 min), {five:.2f} (5 min)"


class Progress:
    """Timestamped progress lines, so a long run shows where it is."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f}s] {text}", flush=True)


# ===================================================================== profiling


PY_SPY_RATE = 250  # samples/s


def profile_window(duration: float) -> int:
    """Seconds a profiled window lasts: py-spy takes whole seconds; at least 3 for enough
    samples."""
    return max(3, round(duration))


def py_spy_path() -> str | None:
    """py-spy from the venv of this interpreter, else from PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


async def py_spy_record(pid: int, seconds: float, out: Path) -> bool:
    """Sample ``pid`` for ``seconds`` into a raw (collapsed stacks) file; False if py-spy
    is missing or failed (it needs ptrace rights on the process)."""
    exe = py_spy_path()
    if exe is None:
        return False
    proc = await asyncio.create_subprocess_exec(
        exe, "record", "--pid", str(pid), "--duration", str(profile_window(seconds)),
        "--rate", str(PY_SPY_RATE), "--format", "raw", "--output", str(out), "--nonblocking",
        "--threads", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0 or not out.exists():
        print(f"  py-spy failed: {err.decode(errors='replace').strip()[-300:]}")
        return False
    return True


def _frame_area(frame: str) -> str:
    """Where a sampled frame's code lives, coarsely: what a reader acts on."""
    if frame.startswith("Runner.run (") or frame.startswith("run (uvloop"):
        return "event loop in C (epoll, socket reads, callbacks)"
    path = frame[frame.rfind("(") + 1:].split(":")[0]
    if "websockets/" in path:
        return "websockets"
    if "concurrent/futures" in path or "threading.py" in path:
        return "threads (executor, locks)"
    if "asyncio/" in path:
        return "asyncio (Python part)"
    return Path(path).name or frame


def print_profile(path: Path, seconds: float, top: int = 12) -> None:
    """Where the event-loop thread's time went, from a py-spy raw profile: self time
    per area and the hottest functions; other threads summarised in one line. Busy
    means sampled running (or waiting for the GIL), not blocked in the kernel."""
    per_thread: Counter[str] = Counter()
    self_by_frame: Counter[str] = Counter()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = "?"
        if frames[0].startswith("thread ("):
            thread = frames.pop(0).partition(": ")[2] or frames[0]
        per_thread[thread] += int(count)
        if thread == "MainThread" and frames:
            self_by_frame[frames[-1]] += int(count)
    total = sum(self_by_frame.values())
    if not total:
        print("  (no samples of the main thread)")
        return
    possible = PY_SPY_RATE * max(seconds, 1e-9)
    others = ", ".join(f"{name} busy {100 * n / possible:.0f}%"
                       for name, n in per_thread.most_common() if name != "MainThread")
    print(f"  event-loop thread busy {100 * total / possible:.0f}% of the window"
          f"{'; ' + others if others else ''}; its self time by area:")
    by_area: Counter[str] = Counter()
    for frame, count in self_by_frame.items():
        by_area[_frame_area(frame)] += count
    print_table(["area", "self"], [[area, f"{100 * n / total:.1f}%"]
                                   for area, n in by_area.most_common(top)], "<>")
    print("  hottest lines (self time; a line that writes to a socket or file includes "
          "the system call):")
    print_table(["function (file:line)", "self"],
                [[frame, f"{100 * n / total:.1f}%"]
                 for frame, n in self_by_frame.most_common(top)], "<>")


# ===================================================================== exchange config


def bench_exchange_config(leaderboard_interval_s: float = 1.0) -> dict[str, Any]:
    """Limits high enough that the benchmark's flow is never refused by risk checks:
    the gateway is measured, not the risk manager's answer to an unrealistic trader."""
    return {
        "risk": {"max_order_qty": 1_000_000, "max_position": 10**12,
                 "max_open_orders": 1_000_000, "rate_limit_per_sec": 1e9,
                 "rate_limit_burst": 10**9},
        "margin": {"enabled": False},
        "server": {"leaderboard_interval_s": leaderboard_interval_s,
                   "performance_interval_s": 5.0},
    }


def write_config(directory: Path, config: dict[str, Any]) -> Path:
    path = directory / "bench_config.json"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


# ===================================================================== worker handle


class Worker:
    """A helper process of this module (``python _wsbench.py KIND ...``), driven over
    stdin/stdout lines. Its stderr is kept, to explain a failure."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc
        self.stderr_lines: list[str] = []
        self._drain = asyncio.create_task(self._read_stderr())

    @classmethod
    async def start(cls, name: str, kind: str, *args: str) -> Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).resolve()), kind, *args,
            cwd=ROOT, env=python_env(), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        worker = cls(name, proc)
        try:
            line = await asyncio.wait_for(worker._readline(), WORKER_READY_TIMEOUT_S)
        except asyncio.TimeoutError:
            await worker.kill()
            raise RuntimeError(f"{name} did not become ready; stderr:\n"
                               f"{worker.stderr_text}") from None
        if line != "READY":
            await worker.kill()
            raise RuntimeError(f"{name} failed to start ({line!r}); stderr:\n"
                               f"{worker.stderr_text}")
        return worker

    @property
    def stderr_text(self) -> str:
        return "".join(self.stderr_lines[-40:])

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.stderr_lines.append(line.decode(errors="replace"))

    async def _readline(self) -> str:
        assert self.proc.stdout is not None
        raw = await self.proc.stdout.readline()
        if not raw:
            await self.proc.wait()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._drain), 2)
            return f"<exited with code {self.proc.returncode}>"
        return raw.decode().rstrip("\n")

    async def _command(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        await self.proc.stdin.drain()

    async def measure(self, seconds: float) -> dict[str, Any]:
        """Counters of exactly the next ``seconds`` (the worker times the window)."""
        await self._command(f"measure {seconds}")
        line = await asyncio.wait_for(self._readline(), seconds + 60)
        if not line.startswith("RESULT "):
            raise RuntimeError(f"{self.name}: expected a result, got {line!r}; stderr:\n"
                               f"{self.stderr_text}")
        return json.loads(line[len("RESULT "):])

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self._command("stop")
            try:
                await asyncio.wait_for(self.proc.wait(), WORKER_STOP_TIMEOUT_S)
            except asyncio.TimeoutError:
                await self.kill()
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(self._drain, 2)

    async def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()


async def measure_all(workers: Sequence[Worker], seconds: float) -> list[dict[str, Any]]:
    """One window measured by several workers at once."""
    return list(await asyncio.gather(*(w.measure(seconds) for w in workers)))


# ===================================================================== raw WebSocket client

_ZERO_MASK = b"\x00\x00\x00\x00"


def client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A final client frame. The mask key is all zeros, so masking is a no-op for us while
    the server still unmasks as usual: the client's CPU goes to load, not to XOR. (Mask
    keys only need to be unpredictable to defeat proxy cache poisoning; this is loopback.)
    """
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return header + _ZERO_MASK + payload


class RawWs(asyncio.Protocol):
    """A minimal WebSocket client: handshake, unmasked server frames in, masked frames
    out, ping/close answered. Complete data messages are handed to ``on_messages`` as
    one list per socket read, so a burst costs one callback."""

    def __init__(self, host: str, path: str,
                 on_messages: Callable[[list[bytes]], None]) -> None:
        self.host = host
        self.path = path or "/"
        self.on_messages = on_messages
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.is_open = False
        self.close_code: int | None = None
        self._buf = b""
        self._fragments: list[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport: no isinstance check
        self.transport = cast(asyncio.Transport, transport)
        key = base64.b64encode(os.urandom(16))
        # no Sec-WebSocket-Extensions: compression stays off, as on the real endpoints
        self.transport.write(b"GET " + self.path.encode() + b" HTTP/1.1\r\nHost: " +
                        self.host.encode() + b"\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key +
                        b"\r\nSec-WebSocket-Version: 13\r\n\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_open = False
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed during the handshake"))
        if not self.closed.done():
            self.closed.set_result(None)

    def send(self, payload: bytes) -> None:
        assert self.transport is not None
        self.transport.write(client_frame(payload))

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if self.is_open:
                self.transport.write(client_frame(b"\x03\xe8", 0x8))
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        if not self.is_open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self._buf = buf
                return
            status = buf[:buf.find(b"\r\n")]
            if not status.startswith(b"HTTP/1.1 101"):
                self.opened.set_exception(ConnectionError(f"handshake refused: {status!r}"))
                assert self.transport is not None
                self.transport.close()
                return
            self.is_open = True
            self.opened.set_result(None)
            buf = buf[end + 4:]
        messages: list[bytes] = []
        i, n = 0, len(buf)
        while n - i >= 2:
            b0 = buf[i]
            length = buf[i + 1] & 0x7F  # frames from a server are never masked
            if length < 126:
                head = 2
            elif length == 126:
                if n - i < 4:
                    break
                length = (buf[i + 2] << 8) | buf[i + 3]
                head = 4
            else:
                if n - i < 10:
                    break
                length = int.from_bytes(buf[i + 2:i + 10], "big")
                head = 10
            end = i + head + length
            if end > n:
                break
            opcode = b0 & 0x0F
            if opcode in (0x1, 0x2):
                if b0 & 0x80:
                    messages.append(buf[i + head:end])
                else:
                    self._fragments = [buf[i + head:end]]
            elif opcode == 0x0 and self._fragments is not None:
                self._fragments.append(buf[i + head:end])
                if b0 & 0x80:
                    messages.append(b"".join(self._fragments))
                    self._fragments = None
            elif opcode == 0x9:
                self.transport.write(client_frame(buf[i + head:end], 0xA))  # type: ignore[union-attr]
            elif opcode == 0x8:
                body = buf[i + head:end]
                self.close_code = int.from_bytes(body[:2], "big") if len(body) >= 2 else 1005
                self.close()
                break
            i = end
        self._buf = buf[i:] if i < n else b""
        if messages:
            self.on_messages(messages)


async def open_raw(uri: str, on_messages: Callable[[list[bytes]], None],
                   rcvbuf: int = 0) -> RawWs:
    """Connect and complete the handshake. ``rcvbuf`` pins the socket's receive buffer
    (0 leaves it to the kernel, which grows it to megabytes on loopback)."""
    parts = urlsplit(uri)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                         socket.SOCK_STREAM)
    try:
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    _, protocol = await loop.create_connection(
        lambda: RawWs(f"{host}:{port}", parts.path, on_messages), sock=sock)
    await asyncio.wait_for(protocol.opened, 10)
    return protocol


# ===================================================================== order flow

PASSIVE_MEAN_OFFSET = 3.0  # ticks behind the touch-side of the mid, on average
MAX_OFFSET = 10  # so nearly every resting order is inside a depth-10 view
MARKETABLE_THROUGH = 2  # ticks a marketable IOC is priced through the mid


class OrderFlow:
    """One trader's seeded order stream: mostly passive GTC limits near a fixed mid that
    rest, a few marketable IOC limits that trade with the other traders' resting orders,
    cancels of random live orders, and a cap on the trader's live orders kept by
    canceling its oldest one, so the book stays bounded however long the run."""

    def __init__(self, seed: int, symbol: str, max_live: int, cancel_share: float,
                 marketable_share: float, mid: int = REFERENCE_PRICE) -> None:
        self.rng = random.Random(seed)
        self.symbol = symbol
        self.max_live = max_live
        self.cancel_share = cancel_share
        self.marketable_share = marketable_share
        self.mid = mid
        self.live: dict[str, None] = {}  # client_order_id of resting orders, oldest first
        self.prefix = f"o{seed}-"
        self.next_id = 0

    def next(self) -> tuple[bytes, str, bool]:
        """(frame payload, client_order_id it concerns, whether it is a new order)."""
        live, rng = self.live, self.rng
        if len(live) >= self.max_live:
            return self._cancel(next(iter(live)))
        r = rng.random()
        if r < self.cancel_share and live:
            keys = list(live)
            return self._cancel(keys[rng.randrange(len(keys))])
        self.next_id += 1
        coid = self.prefix + str(self.next_id)
        buy = rng.random() < 0.5
        if r < self.cancel_share + self.marketable_share:
            price = self.mid + MARKETABLE_THROUGH if buy else self.mid - MARKETABLE_THROUGH
            order = {"type": "new_order", "client_order_id": coid, "symbol": self.symbol,
                     "side": "buy" if buy else "sell", "order_type": "limit", "price": price,
                     "qty": rng.randint(1, 10), "tif": "ioc"}
        else:
            offset = 1 + min(int(rng.expovariate(1 / PASSIVE_MEAN_OFFSET)), MAX_OFFSET - 1)
            price = self.mid - offset if buy else self.mid + offset
            order = {"type": "new_order", "client_order_id": coid, "symbol": self.symbol,
                     "side": "buy" if buy else "sell", "order_type": "limit", "price": price,
                     "qty": rng.randint(1, 10), "tif": "gtc"}
            live[coid] = None
        return orjson.dumps(order), coid, True

    def _cancel(self, coid: str) -> tuple[bytes, str, bool]:
        del self.live[coid]
        return orjson.dumps({"type": "cancel_order", "client_order_id": coid}), coid, False


# ===================================================================== gateway client


class GatewayStats:
    """Counters of one measurement window, shared by every connection of the worker."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.acks = 0  # order_ack for our new orders
        self.cancels = 0  # order_canceled (reason user) answering our cancels
        self.order_rejects = 0
        self.cancel_rejects = 0
        self.errors = 0
        self.fills = 0
        self.other = 0  # position, order_canceled (ioc/self_trade), ...
        self.sent_new = 0
        self.sent_cancel = 0
        self.reject_codes: Counter[str] = Counter()
        self.latencies: list[float] = []  # seconds, new_order -> order_ack
        self.send_lags: list[float] = []  # paced: actual send - scheduled send
        self.first_seq = 0  # the exchange's event counter as the window opened
        self.max_seq = 0


class GatewayConn:
    """One trader connection. Closed loop: the next request goes out from inside the
    callback that read the previous one's answer. Open loop: the pacer sends."""

    def __init__(self, worker: GatewayWorker, index: int, flow: OrderFlow) -> None:
        self.worker = worker
        self.index = index
        self.flow = flow
        self.ws: RawWs | None = None
        # client_order_id -> scheduled (paced) or actual (closed loop) send time
        self.pending_new: dict[str, float] = {}
        self.pending_cancel: set[str] = set()
        self.login: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    def send_next(self, scheduled: float | None = None) -> None:
        payload, coid, is_new = self.flow.next()
        now = time.perf_counter()
        stats = self.worker.stats
        if is_new:
            self.pending_new[coid] = now if scheduled is None else scheduled
            stats.sent_new += 1
        else:
            self.pending_cancel.add(coid)
            stats.sent_cancel += 1
        if scheduled is not None:
            stats.send_lags.append(now - scheduled)
        self.ws.send(payload)  # type: ignore[union-attr]

    def on_messages(self, payloads: list[bytes]) -> None:
        now = time.perf_counter()
        stats = self.worker.stats
        live = self.flow.live
        answered = False
        for payload in payloads:
            msg = orjson.loads(payload)
            kind = msg["type"]
            if kind == "order_ack":
                sent = self.pending_new.pop(msg["client_order_id"], None)
                if sent is not None:
                    stats.acks += 1
                    stats.latencies.append(now - sent)
                    answered = True
                seq = msg.get("seq", 0)
                if seq > stats.max_seq:
                    stats.max_seq = seq
                    if not stats.first_seq:
                        stats.first_seq = seq
            elif kind == "fill":
                stats.fills += 1
                if msg["leaves_qty"] == 0:
                    live.pop(msg["client_order_id"], None)
            elif kind == "order_canceled":
                coid = msg["client_order_id"]
                if msg["reason"] == "user" and coid in self.pending_cancel:
                    self.pending_cancel.discard(coid)
                    stats.cancels += 1
                    answered = True
                else:  # ioc remainder, self-trade prevention
                    live.pop(coid, None)
                    stats.other += 1
            elif kind == "order_reject":
                coid = msg["client_order_id"]
                live.pop(coid, None)
                if self.pending_new.pop(coid, None) is not None:
                    answered = True
                stats.order_rejects += 1
                stats.reject_codes[msg["code"]] += 1
            elif kind == "cancel_reject":
                # the order filled or was self-trade canceled before our cancel arrived
                self.pending_cancel.discard(msg["client_order_id"])
                stats.cancel_rejects += 1
                stats.reject_codes["cancel:" + msg["code"]] += 1
                answered = True
            elif kind == "login_ack":
                self.login.set_result(msg)
            elif kind == "error":
                stats.errors += 1
                stats.reject_codes["error:" + msg["code"]] += 1
                ref = msg.get("ref")
                self.pending_new.pop(ref, None)
                self.pending_cancel.discard(ref)
                answered = True
            else:
                stats.other += 1
        if answered and self.worker.closed_loop and self.worker.running \
                and not self.pending_new and not self.pending_cancel:
            self.send_next()


class GatewayWorker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.closed_loop = args.rate <= 0
        self.running = False
        self.stats = GatewayStats()
        self.conns: list[GatewayConn] = []
        self.skipped = 0  # open-loop sends shed because the server was far behind

    async def connect(self) -> None:
        args = self.args
        for i in range(args.conns):
            flow = OrderFlow(args.seed * 1000 + i, SYMBOL, args.max_live, args.cancel_share,
                             args.marketable_share)
            conn = GatewayConn(self, i, flow)
            conn.ws = await open_raw(args.uri, conn.on_messages)
            conn.ws.send(orjson.dumps({"type": "login",
                                       "trader_id": f"{args.trader_prefix}{i}"}))
            self.conns.append(conn)
        for conn in self.conns:
            ack = await asyncio.wait_for(conn.login, 10)
            instruments = ack.get("instruments") or [{"symbol": SYMBOL}]
            conn.flow.symbol = instruments[0]["symbol"]

    def start(self) -> None:
        self.running = True
        if self.closed_loop:
            for conn in self.conns:
                conn.send_next()
        else:
            threading.Thread(target=self._pacer, args=(asyncio.get_running_loop(),),
                             daemon=True).start()

    def _pacer(self, loop: asyncio.AbstractEventLoop) -> None:
        """Open loop: order k is due at start + k / rate, whatever happened to the others.

        Event-loop timers have millisecond resolution, too coarse for sub-millisecond
        latencies measured from the schedule, so a thread sleeps (~60 us precision) and
        hands each batch of due orders to the loop."""
        period = 1.0 / self.args.rate
        tick = max(period, 100e-6)  # below this, waking up costs more than it buys
        start = time.perf_counter()
        k = 0
        while self.running:
            now = time.perf_counter()
            due = int((now - start) / period) + 1
            if due > k:
                with contextlib.suppress(RuntimeError):  # the loop is closing
                    loop.call_soon_threadsafe(self._send_due, start, period, k, due)
                k = due
            time.sleep(max(start + k * period - time.perf_counter(), tick))

    def _send_due(self, start: float, period: float, first: int, end: int) -> None:
        if not self.running:
            return
        conns = self.conns
        limit = self.args.max_pending
        for k in range(first, end):
            conn = conns[k % len(conns)]
            if len(conn.pending_new) + len(conn.pending_cancel) >= limit:
                self.skipped += 1  # the server is far behind: shed, and report it
                continue
            conn.send_next(start + k * period)

    async def measure(self, seconds: float) -> dict[str, Any]:
        self.stats = stats = GatewayStats()
        skipped_before = self.skipped
        await asyncio.sleep(seconds)
        elapsed = time.perf_counter() - stats.started
        self.stats = GatewayStats()  # the window is closed: later answers count elsewhere
        lat = sorted(stats.latencies)
        lags = sorted(stats.send_lags)
        us = 1e6
        return {
            "elapsed": elapsed, "acks": stats.acks, "cancels": stats.cancels,
            "order_rejects": stats.order_rejects, "cancel_rejects": stats.cancel_rejects,
            "errors": stats.errors, "fills": stats.fills, "other": stats.other,
            "sent_new": stats.sent_new, "sent_cancel": stats.sent_cancel,
            "reject_codes": dict(stats.reject_codes), "max_seq": stats.max_seq,
            "first_seq": stats.first_seq,
            "skipped": self.skipped - skipped_before,
            "p50_us": percentile(lat, 50) * us, "p99_us": percentile(lat, 99) * us,
            "p999_us": percentile(lat, 99.9) * us, "max_us": (lat[-1] if lat else 0) * us,
            "send_lag_p99_us": percentile(lags, 99) * us,
            "send_lag_max_us": (lags[-1] if lags else 0) * us,
        }

    async def close(self) -> None:
        self.running = False
        for conn in self.conns:
            if conn.ws is not None:
                conn.ws.close()
        for conn in self.conns:
            if conn.ws is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(conn.ws.closed, 2)


# ===================================================================== subscribers

_MESSAGE_MARK = b'{"type":'
_SNAPSHOT_MARK = b'"type":"book_snapshot"'
_SUBSCRIBED_MARK = b'"type":"subscribed"'
_SEQ_MARK = b'"seq":'


class SubscriberStats:
    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.messages = 0
        self.frames = 0
        self.bytes = 0
        self.snapshots = 0  # book snapshots: after the first, each one is a resync
        self.first_seq = 0
        self.last_seq = 0


class Subscriber:
    def __init__(self, worker: SubscriberWorker) -> None:
        self.worker = worker
        self.ws: RawWs | None = None
        self.messages = 0  # this window, for the spread between subscribers
        self.subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_messages(self, payloads: list[bytes]) -> None:
        stats = self.worker.stats
        count = 0
        size = 0
        snapshots = 0
        for payload in payloads:
            size += len(payload)
            if payload[:1] == b"[":  # a batch: one JSON array of messages
                count += payload.count(_MESSAGE_MARK)
                snapshots += payload.count(_SNAPSHOT_MARK)
            else:
                count += 1
                if payload.startswith(b'{"type":"book_snapshot"'):
                    snapshots += 1
        if not self.subscribed.done():
            if any(_SUBSCRIBED_MARK in p for p in payloads):
                self.subscribed.set_result(None)
            return
        stats.messages += count
        stats.frames += len(payloads)
        stats.bytes += size
        stats.snapshots += snapshots
        self.messages += count
        # how far the feed has got: the last seq of the read (cheap: no full parse)
        last = payloads[-1]
        at = last.rfind(_SEQ_MARK)
        if at >= 0:
            end = at + len(_SEQ_MARK)
            stop = end
            while stop < len(last) and 48 <= last[stop] <= 57:
                stop += 1
            if stop > end:
                seq = int(last[end:stop])
                if seq > stats.last_seq:
                    stats.last_seq = seq
                    if not stats.first_seq:
                        stats.first_seq = seq


class SubscriberWorker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stats = SubscriberStats()
        self.subs: list[Subscriber] = []

    async def connect(self) -> None:
        args = self.args
        request = orjson.dumps({"type": "subscribe", "depth": args.depth,
                                "batch": args.batch})

        async def one() -> Subscriber:
            sub = Subscriber(self)
            # A stalled reader with the kernel's autotuned buffer would soak up megabytes
            # before the relay saw any backlog: a small one gets it there within the
            # warm-up, so the relay's slow-subscriber policy is what gets measured.
            sub.ws = await open_raw(args.uri, sub.on_messages,
                                    STALLED_RCVBUF if args.stall else 0)
            sub.ws.send(request)
            if args.stall:
                assert sub.ws.transport is not None
                sub.ws.transport.pause_reading()  # and never again: a stalled reader
                sub.subscribed.set_result(None)
            await sub.subscribed
            return sub

        # In waves, not one by one: a server busy feeding the first subscribers takes
        # a while to answer each new handshake, and 100 of those in a row add up.
        while len(self.subs) < args.count:
            wave = min(CONNECT_WAVE, args.count - len(self.subs))
            self.subs += await asyncio.wait_for(
                asyncio.gather(*(one() for _ in range(wave))), 30)

    async def measure(self, seconds: float) -> dict[str, Any]:
        for sub in self.subs:
            sub.messages = 0
        self.stats = stats = SubscriberStats()
        await asyncio.sleep(seconds)
        elapsed = time.perf_counter() - stats.started
        self.stats = SubscriberStats()
        per_sub = [s.messages for s in self.subs]
        return {"elapsed": elapsed, "messages": stats.messages, "frames": stats.frames,
                "bytes": stats.bytes, "snapshots": stats.snapshots, "last_seq": stats.last_seq,
                "first_seq": stats.first_seq,
                "min_per_sub": min(per_sub, default=0), "max_per_sub": max(per_sub, default=0),
                "open": sum(1 for s in self.subs if s.ws is not None and s.ws.is_open)}

    async def close(self) -> None:
        for sub in self.subs:
            if sub.ws is not None:
                sub.ws.close()


# ===================================================================== worker main


async def serve_commands(measure: Callable[[float], Coroutine[Any, Any, dict[str, Any]]]
                         ) -> None:
    print("READY", flush=True)
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        command, _, arg = line.strip().partition(" ")
        if command == "measure":
            result = await measure(float(arg))
            print("RESULT " + json.dumps(result), flush=True)
        elif command in ("stop", ""):
            return
        else:
            print(f"unknown command {line!r}", file=sys.stderr, flush=True)


async def gateway_client_main(args: argparse.Namespace) -> None:
    # The pacer thread needs the GIL promptly when it wakes up.
    sys.setswitchinterval(0.0005)
    worker = GatewayWorker(args)
    await worker.connect()
    worker.start()
    try:
        await serve_commands(worker.measure)
    finally:
        await worker.close()


async def subscribers_main(args: argparse.Namespace) -> None:
    worker = SubscriberWorker(args)
    await worker.connect()
    try:
        await serve_commands(worker.measure)
    finally:
        await worker.close()


# ===================================================================== reference servers


def _reference_stop() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _bound_uri(server: Any) -> str:
    host, port = server.sockets[0].getsockname()[:2]
    return f"ws://{host}:{port}"


# What the exchange answers to each request type: the echo rewrites only the type.
_ECHO_REPLY = {"new_order": "order_ack", "cancel_order": "order_canceled",
               "login": "login_ack", "ping": "pong"}


async def echo_server_main(args: argparse.Namespace) -> None:
    from websockets.asyncio.server import ServerConnection, serve
    from websockets.exceptions import ConnectionClosed

    async def handler(ws: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for frame in ws:
                msg = orjson.loads(frame)
                msg["type"] = _ECHO_REPLY.get(msg.get("type"), "error")
                if msg["type"] == "order_canceled":
                    msg["reason"] = "user"
                await ws.send(orjson.dumps(msg), text=True)

    stop = _reference_stop()
    async with serve(handler, args.host, args.port, compression=None) as server:
        print("READY " + json.dumps({"echo": _bound_uri(server)}), flush=True)
        await stop.wait()


async def push_server_main(args: argparse.Namespace) -> None:
    from websockets.asyncio.server import ServerConnection, broadcast, serve
    from websockets.exceptions import ConnectionClosed

    subscribers: dict[ServerConnection, None] = {}
    someone = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            await ws.recv()  # the subscribe request; its content does not matter here
            await ws.send('{"type":"subscribed"}')
            subscribers[ws] = None
            someone.set()
            await ws.wait_closed()
        subscribers.pop(ws, None)

    async def produce() -> None:
        rng = random.Random(args.seed)
        seq = 0
        while True:
            await someone.wait()
            while subscribers:
                targets = list(subscribers)
                for _ in range(16):
                    seq += 1
                    price = REFERENCE_PRICE - 1 - rng.randrange(10)
                    # encoded once per message and sent to all, as the relay does
                    data = orjson.dumps({"type": "book_update", "symbol": SYMBOL, "seq": seq,
                                         "bids": [[price, rng.randint(1, 500)]],
                                         "asks": []})
                    broadcast(targets, data, text=True)
                # everyone gets every message: wait for any socket over its high-water mark
                for ws in targets:
                    if ws.paused:  # type: ignore[attr-defined]
                        await ws.drain()  # type: ignore[attr-defined]
                await asyncio.sleep(0)
            someone.clear()

    stop = _reference_stop()
    async with serve(handler, args.host, args.port, compression=None) as server:
        producer = asyncio.create_task(produce())
        print("READY " + json.dumps({"push": _bound_uri(server)}), flush=True)
        await stop.wait()
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer


# ===================================================================== command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Helper processes of bench_gateway.py and bench_feed.py (not meant to "
                    "be run by hand, but it can be).")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--loop", choices=["auto", "asyncio"], default="auto",
                        help="auto: uvloop when installed (default %(default)s)")
    commands = parser.add_subparsers(dest="kind", required=True)
    for name in ("echo-server", "push-server"):
        server = commands.add_parser(name, parents=[common],
                                     help=f"the {name.split('-')[0]} reference server")
        server.add_argument("--host", default="127.0.0.1")
        server.add_argument("--port", type=int, default=0, help="0 picks a free port")
        server.add_argument("--seed", type=int, default=1)
    client = commands.add_parser("gateway-client", parents=[common],
                                 help="trader connections sending orders")
    client.add_argument("--uri", required=True)
    client.add_argument("--conns", type=int, default=1)
    client.add_argument("--rate", type=float, default=0.0,
                        help="offered requests/s over all connections; 0: closed loop")
    client.add_argument("--seed", type=int, default=1)
    client.add_argument("--trader-prefix", default="bench")
    client.add_argument("--max-live", type=int, default=32,
                        help="resting orders per trader before its oldest is canceled")
    client.add_argument("--cancel-share", type=float, default=0.10)
    client.add_argument("--marketable-share", type=float, default=0.05)
    client.add_argument("--max-pending", type=int, default=1_000_000,
                        help="open loop: unanswered requests per connection before sends "
                             "are shed")
    subs = commands.add_parser("subscribers", parents=[common],
                               help="feed subscribers counting messages")
    subs.add_argument("--uri", required=True)
    subs.add_argument("--count", type=int, default=1)
    subs.add_argument("--batch", action="store_true")
    subs.add_argument("--depth", type=int, default=10)
    subs.add_argument("--stall", action="store_true",
                      help="subscribe, then never read again")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    mains = {"echo-server": echo_server_main, "push-server": push_server_main,
             "gateway-client": gateway_client_main, "subscribers": subscribers_main}
    run_loop(mains[args.kind](args), args.loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
