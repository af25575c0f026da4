"""A synthetic exchange event stream for ``bench_feed.py``: the relay's input without the
exchange's cost, so the relay's fan-out, not the exchange's order throughput, is measured.

The events are real: a seeded order flow (passive limits near a slowly moving mid,
cancels, amends, marketable IOCs, traders capping their live orders) is run through
``engine.Engine`` in-process before anything is served, and every event is encoded with
``models.event_to_dict`` + orjson exactly as ``exchange_server.py`` encodes it, with a
``leaderboard`` every ``--leaderboard-every`` inputs. That sequence (one *cycle*) is then
served over the exchange's internal event-stream protocol (API_SPEC.md, "Internal event
stream"): a ``snapshot`` on connect, then the events with gapless ``seq``; one event per
frame, or one frame per input for a consumer that connects with ``?batch=1``, as the
exchange does. Only ``seq`` is filled in at send time (spliced into the pre-encoded
bytes), so serving costs far less per event than the relay's parsing does.

Looping keeps the consumer's replica consistent: every cycle but the last ends with each
trader canceling all its orders (``CancelAll``, real engine events), so each cycle starts
and ends on an empty book and the next one replays the same events with later ``seq``
numbers (order and trade ids repeat, which the relay does not mind: they are gone from the
book by then). ``--loops 1`` serves the cycle once and leaves its book standing, equal to
the engine's own at the end (``SyntheticCycle.final_l2``).

The pace is ``--rate`` events/s (``max``: as fast as the consumer reads, bounded by TCP
backpressure; ``0``: paused) and can be changed while running: a WebSocket connection to
``/control?rate=R`` sets it; ``/control`` alone only asks. Either answers with one text
frame of counters (``seq``: the last seq sent, ``events``, ``inputs``, ``frames``,
``bytes`` sent so far over all consumers, ``consumers``, ``batched``, ``rate``, ``time``:
the source's monotonic clock) and closes. It prints ``READY {"events": uri}`` like the
project's servers, so ``launcher.start_server`` runs it.

The WebSocket server side is hand-written (handshake, unmasking, ping/pong, close) so
that writing pre-framed bytes costs the source next to nothing: with the websockets
library's per-frame send the source would cost about what the relay does per event.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import random
import signal
import socket
import sys
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import orjson

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from config import ExchangeConfig, config_from_dict  # noqa: E402
from engine import Engine  # noqa: E402
from models import (  # noqa: E402
    REJECT_EVENTS,
    AmendOrder,
    CancelAll,
    CancelOrder,
    Command,
    NewOrder,
    OrderCanceled,
    OrderType,
    Side,
    TimeInForce,
    Trade,
    event_to_dict,
)
from replay import leaderboard_message  # noqa: E402

log = logging.getLogger("stream_source")

SYMBOL = "SIM"
REFERENCE_PRICE = 10_000  # ticks; the exchange's default band centre
TS0 = 1_700_000_000_000_000  # microseconds; the cycle's clock starts here
TS_STEP = 100  # microseconds between inputs
N_TRADERS = 16
MAX_LIVE = 24  # resting orders per trader before it cancels its oldest
PASSIVE_MEAN_OFFSET = 3.0  # ticks from the mid, on average: most levels in a depth-10 view
MAX_OFFSET = 12
MID_STEP_EVERY = 400  # inputs between moves of the mid, on average
MID_MAX_DRIFT = 20  # ticks either side of the reference: the price band is far away
# per input, what a trader does (the rest: a passive GTC limit)
CANCEL_SHARE = 0.14
AMEND_SHARE = 0.06
MARKETABLE_SHARE = 0.06
MARKETABLE_THROUGH = 2  # ticks a marketable IOC is priced through the mid
MAX_QTY = 20
DEFAULT_INPUTS = 50_000
DEFAULT_LEADERBOARD_EVERY = 5_000  # inputs; the exchange sends one a second
DEFAULT_SNDBUF_BYTES = 256 * 1024  # bounds what sits in the kernel between us and the relay
WRITE_HIGH_WATER = 256 * 1024
CHUNK_BYTES = 64 * 1024  # frames written to the transport at once
PACE_TICK_S = 0.001
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SEQ_MARK = b'"seq":0,'


def bench_config() -> ExchangeConfig:
    """The config ``bench_feed.py`` gives the real exchange: risk limits that this flow
    never reaches, margin off, so no order is refused."""
    return config_from_dict({
        "risk": {"max_order_qty": 1_000_000, "max_position": 10**12,
                 "max_open_orders": 1_000_000, "rate_limit_per_sec": 1e9,
                 "rate_limit_burst": 10**9},
        "margin": {"enabled": False}})


# ===================================================================== generation

# One pre-encoded event: the bytes before and after its seq number.
Encoded = tuple[bytes, bytes]


@dataclass(slots=True)
class Input:
    """The events one engine input caused, in order; ``alone`` (a leaderboard) is always
    sent as a single object, never inside a batch array, as the exchange does."""

    events: tuple[Encoded, ...]
    alone: bool = False


@dataclass
class SyntheticCycle:
    body: list[Input]  # from an empty book
    teardown: list[Input]  # every order canceled: the book is empty again after it
    final_l2: dict[str, list[tuple[int, int]]]  # the engine's book after ``body``
    event_counts: dict[str, int] = field(default_factory=dict)  # of the body, by type

    @property
    def body_events(self) -> int:
        return sum(len(i.events) for i in self.body)


def _split(encoded: bytes, prefixes: dict[bytes, bytes]) -> Encoded:
    """``{"type":"x","seq":0,...}`` as (``{"type":"x","seq":``, ``,...}``)."""
    at = encoded.index(SEQ_MARK) + len(SEQ_MARK) - 2
    prefix = encoded[:at]
    return prefixes.setdefault(prefix, prefix), encoded[at + 1:]


class TraderFlow:
    """One trader's orders: client order ids of its resting orders, oldest first."""

    def __init__(self, trader_id: str) -> None:
        self.trader_id = trader_id
        self.live: dict[str, bool] = {}  # client order id -> is a buy
        self.next_id = 0

    def new_id(self) -> str:
        self.next_id += 1
        return f"{self.trader_id}-{self.next_id}"


class FlowGenerator:
    """The seeded command stream, kept in step with the engine's answers (fills and
    IOC remainders take orders out of a trader's live set)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.traders = [TraderFlow(f"syn{i:02d}") for i in range(N_TRADERS)]
        self.by_coid: dict[str, TraderFlow] = {}
        self.mid = REFERENCE_PRICE

    def next(self) -> Command:
        rng = self.rng
        if rng.random() < 1 / MID_STEP_EVERY:
            step = rng.choice((-1, 1))
            if abs(self.mid + step - REFERENCE_PRICE) <= MID_MAX_DRIFT:
                self.mid += step
        trader = self.traders[rng.randrange(N_TRADERS)]
        live = trader.live
        if len(live) >= MAX_LIVE:
            return self._cancel(trader, next(iter(live)))
        roll = rng.random()
        if live and roll < CANCEL_SHARE:
            keys = list(live)
            return self._cancel(trader, keys[rng.randrange(len(keys))])
        if live and roll < CANCEL_SHARE + AMEND_SHARE:
            keys = list(live)
            coid = keys[rng.randrange(len(keys))]
            if rng.random() < 0.5:  # smaller in place: keeps its priority
                return AmendOrder(trader.trader_id, client_order_id=coid, qty=1)
            return AmendOrder(trader.trader_id, client_order_id=coid,
                              price=self._passive_price(live[coid]))
        buy = rng.random() < 0.5
        coid = trader.new_id()
        self.by_coid[coid] = trader
        qty = rng.randint(1, MAX_QTY)
        side = Side.BUY if buy else Side.SELL
        if roll < CANCEL_SHARE + AMEND_SHARE + MARKETABLE_SHARE:
            price = self.mid + MARKETABLE_THROUGH if buy else self.mid - MARKETABLE_THROUGH
            return NewOrder(trader.trader_id, coid, SYMBOL, side, OrderType.LIMIT, qty, price,
                            tif=TimeInForce.IOC)
        live[coid] = buy
        return NewOrder(trader.trader_id, coid, SYMBOL, side, OrderType.LIMIT, qty,
                        self._passive_price(buy))

    def _passive_price(self, buy: bool) -> int:
        offset = 1 + min(int(self.rng.expovariate(1 / PASSIVE_MEAN_OFFSET)), MAX_OFFSET - 1)
        return self.mid - offset if buy else self.mid + offset

    def _cancel(self, trader: TraderFlow, coid: str) -> Command:
        del trader.live[coid]
        return CancelOrder(trader.trader_id, client_order_id=coid)

    def gone(self, coid: str) -> None:
        """The order left the book (filled, or canceled by the engine)."""
        trader = self.by_coid.get(coid)
        if trader is not None:
            trader.live.pop(coid, None)


def generate(inputs: int = DEFAULT_INPUTS, seed: int = 42,
             leaderboard_every: int = DEFAULT_LEADERBOARD_EVERY) -> SyntheticCycle:
    """Run ``inputs`` seeded commands through a real engine from an empty book; encode
    every sequenced event as the exchange's event stream does (``seq`` left to fill)."""
    engine = Engine(bench_config())
    flow = FlowGenerator(seed)
    prefixes: dict[bytes, bytes] = {}
    counts: dict[str, int] = {}
    ts = TS0

    def run(command: Command) -> Input:
        nonlocal ts
        ts += TS_STEP
        encoded = []
        for event in engine.process(command, ts):
            if isinstance(event, REJECT_EVENTS):
                continue  # not sequenced: private to its trader
            if type(event) is Trade:
                if not event.buy_leaves_qty:
                    flow.gone(event.buy_client_order_id)
                if not event.sell_leaves_qty:
                    flow.gone(event.sell_client_order_id)
            elif type(event) is OrderCanceled:
                flow.gone(event.client_order_id)
            message = event_to_dict(event, 0)
            counts[message["type"]] = counts.get(message["type"], 0) + 1
            encoded.append(_split(orjson.dumps(message), prefixes))
        return Input(tuple(encoded))

    body: list[Input] = []
    for number in range(1, inputs + 1):
        item = run(flow.next())
        if item.events:  # a refused command (a cancel that lost a race) is not sequenced
            body.append(item)
        if leaderboard_every and number % leaderboard_every == 0:
            board = orjson.dumps(leaderboard_message(engine, 0, ts))
            counts["leaderboard"] = counts.get("leaderboard", 0) + 1
            body.append(Input((_split(board, prefixes),), alone=True))
    book = engine.books[SYMBOL]
    final_l2 = {"bids": book.depth(Side.BUY), "asks": book.depth(Side.SELL)}
    teardown = [item for item in (run(CancelAll(t.trader_id)) for t in flow.traders)
                if item.events]
    if book.resting_orders:
        raise RuntimeError("the cycle's teardown left orders in the book")
    return SyntheticCycle(body, teardown, final_l2, counts)


# ===================================================================== serving


def _frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One final, unmasked server frame."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big") + payload


def _unmask(payload: bytes, mask: bytes) -> bytes:
    if not payload:
        return payload
    key = int.from_bytes((mask * (len(payload) // 4 + 1))[:len(payload)], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(len(payload), "big")


@dataclass
class Counters:
    seq: int = 0  # the last seq sent to any consumer
    events: int = 0
    inputs: int = 0
    frames: int = 0
    bytes: int = 0


class Source:
    """The stream's state shared by every connection: the cycle, the pace, counters."""

    def __init__(self, cycle: SyntheticCycle, rate: float | None, loops: int) -> None:
        self.cycle = cycle
        self.rate = rate  # events/s; None: as fast as the consumer reads; 0: paused
        self.loops = loops  # 0: forever
        self.counters = Counters()
        self.consumers: set[Consumer] = set()
        self.batched = False
        self.pace_changed = asyncio.Event()

    def set_rate(self, rate: float | None) -> None:
        self.rate = rate
        self.pace_changed.set()
        log.info("rate set to %s", "max" if rate is None else f"{rate:g} events/s")

    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {"seq": c.seq, "events": c.events, "inputs": c.inputs, "frames": c.frames,
                "bytes": c.bytes, "consumers": len(self.consumers), "batched": self.batched,
                "rate": "max" if self.rate is None else self.rate,
                "cycle_inputs": len(self.cycle.body), "cycle_events": self.cycle.body_events,
                "time": time.monotonic()}

    def inputs(self) -> Any:
        """The inputs to serve, cycle after cycle, teardown between cycles."""
        loop_no = 0
        while True:
            loop_no += 1
            yield from self.cycle.body
            if self.loops and loop_no >= self.loops:
                return
            yield from self.cycle.teardown


def parse_rate(text: str) -> float | None:
    if text == "max":
        return None
    rate = float(text)
    if rate < 0:
        raise ValueError(f"rate must be 'max' or >= 0, got {text!r}")
    return rate


class Consumer(asyncio.Protocol):
    """One WebSocket connection: an event-stream consumer, or a ``/control`` request."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.open = False
        self.closed = asyncio.get_running_loop().create_future()
        self.writable = asyncio.Event()
        self.writable.set()
        self.task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, DEFAULT_SNDBUF_BYTES)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.source.consumers.discard(self)
        self.writable.set()
        if not self.closed.done():
            self.closed.set_result(None)
        if self.task is not None:
            self.task.cancel()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.open:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buf = self.buf[:end].decode("latin-1"), self.buf[end + 4:]
            self._handshake(head)
        self._read_frames()

    # ------------------------------------------------------------ WebSocket

    def _handshake(self, head: str) -> None:
        assert self.transport is not None
        lines = head.split("\r\n")
        target = lines[0].split(" ")[1] if len(lines[0].split(" ")) == 3 else "/"
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        key = headers.get("sec-websocket-key")
        if key is None or headers.get("upgrade", "").lower() != "websocket":
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            self.transport.close()
            return
        accept = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest())
        self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                             b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept +
                             b"\r\n\r\n")
        self.open = True
        parts = urllib.parse.urlsplit(target)
        query = urllib.parse.parse_qs(parts.query)
        if parts.path.rstrip("/") == "/control":
            self._control(query)
            return
        batched = query.get("batch") == ["1"]
        self.source.batched = batched
        self.source.consumers.add(self)
        self.task = asyncio.get_running_loop().create_task(self._stream(batched))

    def _control(self, query: dict[str, list[str]]) -> None:
        assert self.transport is not None
        if "rate" in query:
            try:
                self.source.set_rate(parse_rate(query["rate"][0]))
            except ValueError as exc:
                self.transport.write(_frame(orjson.dumps({"error": str(exc)})))
                self._close()
                return
        self.transport.write(_frame(orjson.dumps(self.source.stats())))
        self._close()

    def _close(self, code: int = 1000) -> None:
        assert self.transport is not None
        if not self.transport.is_closing():
            self.transport.write(_frame(code.to_bytes(2, "big"), 0x8))
            self.transport.close()

    def _read_frames(self) -> None:
        """Client frames: ping answered, close returned; data ignored (consumers send
        nothing that matters)."""
        buf = self.buf
        while len(buf) >= 2:
            opcode, length = buf[0] & 0x0F, buf[1] & 0x7F
            at = 2
            if length == 126:
                if len(buf) < 4:
                    break
                length, at = int.from_bytes(buf[2:4], "big"), 4
            elif length == 127:
                if len(buf) < 10:
                    break
                length, at = int.from_bytes(buf[2:10], "big"), 10
            masked = buf[1] & 0x80
            end = at + (4 if masked else 0) + length
            if len(buf) < end:
                break
            payload = buf[end - length:end]
            if masked:
                payload = _unmask(payload, buf[at:at + 4])
            buf = buf[end:]
            if opcode == 0x9:
                cast(asyncio.Transport, self.transport).write(_frame(payload, 0xA))
            elif opcode == 0x8:
                self._close()
                break
        self.buf = buf

    # ------------------------------------------------------------ the stream

    async def _stream(self, batched: bool) -> None:
        source = self.source
        counters = source.counters
        transport = self.transport
        assert transport is not None
        seq = counters.seq  # never backwards: a reconnect continues the numbering
        snapshot = {"type": "snapshot", "seq": seq, "ts": TS0,
                    "instruments": [{"symbol": SYMBOL, "tick_size": "0.01", "lot_size": 1}],
                    "books": {SYMBOL: {"bids": [], "asks": []}},
                    "market_open": {SYMBOL: True}, "last_prices": {SYMBOL: None}}
        transport.write(_frame(orjson.dumps(snapshot)))
        log.info("consumer connected (%s), snapshot at seq %d",
                 "one frame per input" if batched else "one event per frame", seq)
        pending = source.inputs()
        paced_from = time.monotonic()
        paced_events = 0
        rate = source.rate
        done = False
        while not done and not transport.is_closing():
            if source.pace_changed.is_set() or rate != source.rate:
                source.pace_changed.clear()
                rate, paced_from, paced_events = source.rate, time.monotonic(), 0
            if rate == 0:
                await source.pace_changed.wait()
                continue
            budget = None
            if rate is not None:
                budget = int((time.monotonic() - paced_from) * rate) - paced_events
                if budget <= 0:
                    await asyncio.sleep(PACE_TICK_S)
                    continue
            chunk: list[bytes] = []
            size = events = inputs = 0
            while size < CHUNK_BYTES and (budget is None or events < budget):
                item = next(pending, None)
                if item is None:
                    done = True
                    break
                inputs += 1
                if batched and not item.alone:
                    parts = []
                    for prefix, suffix in item.events:
                        seq += 1
                        parts.append(b"%b%d%b" % (prefix, seq, suffix))
                    if not parts:
                        continue
                    frame = _frame(b"[" + b",".join(parts) + b"]")
                    chunk.append(frame)
                    size += len(frame)
                    events += len(parts)
                else:
                    for prefix, suffix in item.events:
                        seq += 1
                        frame = _frame(b"%b%d%b" % (prefix, seq, suffix))
                        chunk.append(frame)
                        size += len(frame)
                    events += len(item.events)
            transport.write(b"".join(chunk))
            paced_events += events
            counters.seq = max(counters.seq, seq)
            counters.events += events
            counters.inputs += inputs
            counters.frames += len(chunk)
            counters.bytes += size
            if not self.writable.is_set():
                await self.writable.wait()
            else:
                await asyncio.sleep(0)  # let control requests and pings in
        if done:
            log.info("stream complete at seq %d", seq)


async def serve(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    cycle = generate(args.inputs, args.seed, args.leaderboard_every)
    log.info("cycle: %d inputs, %d events (%s) generated in %.1f s", len(cycle.body),
             cycle.body_events, ", ".join(f"{k} {v}" for k, v in sorted(
                 cycle.event_counts.items())), time.perf_counter() - started)
    source = Source(cycle, args.rate, args.loops)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Consumer(source), args.host, args.port)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    host, port = server.sockets[0].getsockname()[:2]
    print("READY " + json.dumps({"events": f"ws://{host}:{port}"}), flush=True)
    async with server:
        await stop.wait()
        for consumer in list(source.consumers):
            if consumer.transport is not None:
                consumer.transport.close()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="A synthetic exchange event stream (the exchange's internal "
                    "event-stream protocol) for bench_feed.py: a seeded order flow run "
                    "through the real engine up front, served pre-encoded.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--seed", type=int, default=42, help="seed of the order flow")
    parser.add_argument("--inputs", type=int, default=DEFAULT_INPUTS,
                        help="engine inputs (orders, cancels, amends) per cycle")
    parser.add_argument("--leaderboard-every", type=int, default=DEFAULT_LEADERBOARD_EVERY,
                        help="inputs between leaderboard events (0: none)")
    parser.add_argument("--rate", type=parse_rate, default=None, metavar="EVENTS_PER_S",
                        help="pace: events/s, 'max' (as fast as the consumer reads) or 0 "
                             "(paused until /control?rate=... says otherwise); default max")
    parser.add_argument("--loops", type=int, default=0,
                        help="cycles served per consumer (0: forever); the last one leaves "
                             "its book standing")
    parser.add_argument("--loop", choices=["auto", "asyncio"], default="auto",
                        help="event loop (auto: uvloop when installed)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.loop == "auto":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(serve(args))
            return 0
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
