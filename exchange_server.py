"""The exchange process: the order gateway and the internal event stream around one Engine.

- Order gateway (default ``ws://127.0.0.1:9001``): traders log in and send orders; each
  gets private messages about its own orders only (``../shared/PROTOCOL.md``).
- Internal event stream (default ``ws://127.0.0.1:9002``): a snapshot, then every
  sequenced event (``API_SPEC.md``), for the market-data relay and other trusted tools.
- Telemetry: ``trades.csv`` and ``performance.csv`` in ``--data-dir`` (``telemetry.py``).
- Crash safety: every input applied to the engine (commands, rejected ones included,
  disconnect cancels, leaderboard and performance ticks) is appended to a write-ahead
  journal in ``--data-dir/journal`` (``journal.py``) before anything it caused leaves
  the process: its messages and CSV rows are held until the journal write (and, with
  ``--journal-flush batch`` or ``every``, its fsync) that covers it. Periodic snapshots
  bound recovery; on start the state is rebuilt from them (``replay.recover``).

One sequencer, no threads: every accepted request is applied to the Engine at once,
inside the event loop, with a wall-clock timestamp that never goes backwards; every
resulting event but a rejection gets the next ``seq`` and its messages are queued
in that order before the next request is read. Nothing here awaits a client while
sequencing: messages are queued per connection without waiting (``Outbound``) and a
client whose unsent backlog passes a bound is closed (1008, "too slow").

Lockstep mode (``--clock sim``, ``lockstep.py``): the timestamp is simulated time, and
``submit`` queues each trader input for its step's boundary, where the step's inputs are
applied in canonical order (trader id, then the trader's own order) through the same
path; the leaderboard and performance timers run on simulated time.

Group commit (``--journal-flush batch``, the default): each event-loop turn's inputs are
written to the journal in one system call, and a helper thread fdatasyncs whatever has
been written since its last fsync, back to back while inputs keep coming, while the loop
goes on applying the next inputs; a group's messages and rows are released when an fsync
covering it returns. So nothing acknowledged is ever lost, and a crash loses at most
unacknowledged inputs: those written but not yet synced (at most ``MAX_GROUP``: past
that the loop waits for the disk itself).

Private messages beyond PROTOCOL.md's core (for API_SPEC.md):
- ``trader_status`` ``{status, ts, seq}``: the trader's margin status changed
  (``ok``, ``margin_call``, ``liquidating``), sent to all of its sessions.
- ``fill`` and ``order_ack`` also carry ``liquidation``; ``order_ack`` carries
  ``stop_price`` and ``post_only``; ``position`` carries ``fees``, and after a fill,
  ``ts`` and ``seq``; ``open_orders`` orders carry ``status`` and ``filled_qty``.
- ``login_ack`` also carries ``fees`` and ``margin`` (the configured rates).
- ``error`` code ``INTERNAL_ERROR`` if a request hit a bug (logged); nothing else changes.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import functools
import gc
import hmac
import json
import logging
import os
import sys
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterable
from decimal import Decimal
from enum import Enum
from pathlib import Path
from typing import Any

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

import native_core
from config import ConfigError, ExchangeConfig, load_config
from engine import Engine
from journal import (
    FORMAT_VERSION,
    LEADERBOARD,
    PERFORMANCE,
    JournalError,
    JournalWriter,
    command_record,
    core_fingerprint,
    journal_dir,
    list_segments,
    tick_record,
    write_snapshot,
)
from latency import DelayStream, LatencyModel
from launcher import run_event_loop, stop_on_signals
from lockstep import DEFAULT_STEP_MS, DEFAULT_STEP_TIMEOUT_MS, Lockstep, SimClock
from models import (
    PROTOCOL_VERSION,
    REJECT_EVENTS,
    TRADER_ID_RE,
    AmendRejected,
    CancelAll,
    CancelReason,
    CancelRejected,
    Event,
    GetOpenOrders,
    GetPosition,
    Login,
    OrderAccepted,
    OrderAmended,
    OrderCanceled,
    OrderRejected,
    OrderStatus,
    OrderTriggered,
    Ping,
    PositionChanged,
    ProtocolError,
    RejectCode,
    Request,
    Side,
    Trade,
    TraderStatusChanged,
    event_to_dict,
    parse_admin,
    parse_request,
)
from orderbook import Order
from positions import PositionReport, to_currency
from replay import Recovered, engine_config, leaderboard_message, recover, segment_header
from telemetry import PerformanceRow, Telemetry, performance_rows

log = logging.getLogger("exchange")

DEFAULT_CLIENT_BUFFER = 4 * 2**20  # bytes a trader session may leave unsent
DEFAULT_CONSUMER_BUFFER = 64 * 2**20  # an event consumer gets more: it carries everything
EVICT_TIMEOUT_S = 5.0  # a too-slow peer gets this long to take its close frame
CLOSE_TIMEOUT_S = 2.0
FLUSH_BYTES = 64 * 1024  # a peer's frames are written at once when this much is queued
SHUTDOWN_TIMEOUT_S = 5.0
TOO_SLOW = (1008, "too slow")
DEFAULT_SNAPSHOT_EVERY = 100_000  # inputs: bounds recovery to about a second of replay
MAX_GROUP = 4096  # batch: inputs written but not yet fsynced before the loop waits for it
# interval: the longest acked inputs stay in the OS cache only. Each background fsync
# costs the loop time too (measured in-process, one input per turn: +25 us per input at
# 10 ms, +6 us at 50 ms); PostgreSQL's asynchronous commit flushes every 200 ms and
# MongoDB's journal every 100 ms, so 50 ms is a modest window
DEFAULT_SYNC_MS = 50
EXIT_JOURNAL_FAILED = 3  # the journal could not be written or read


class FlushPolicy(str, Enum):
    """When journal records are made durable (``--journal-flush``)."""

    EVERY = "every"  # write + fsync per input, before its messages go out
    BATCH = "batch"  # write per loop turn, fsync per group; messages wait for the fsync
    # write per loop turn, messages go out at once; fsync in the background at most
    # --journal-sync-ms apart: a killed process loses nothing, an OS crash that window
    INTERVAL = "interval"
    OFF = "off"  # write per loop turn, never fsync: survives a killed process, not the OS


class Clock:
    """Wall-clock microseconds, never going backwards (the engine's ``ts``), not even
    across a restart (it starts at the last journaled ``ts``)."""

    def __init__(self, last: int = 0) -> None:
        self.last = last

    def now(self) -> int:
        now = time.time_ns() // 1000
        if now > self.last:
            self.last = now
        return self.last


class Session:
    """One gateway connection; ``trader_id`` is set by a successful login."""

    __slots__ = ("delay", "trader_id", "ws")

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws
        self.trader_id: str | None = None
        self.delay: DelayLine | None = None  # set at login if the latency model delays it


class DelayLine:
    """A session's inbound link under the latency model (``latency.py``): each frame is
    handled after its own sampled delay, but never before an earlier frame of the same
    connection (due = max(previous due, now + delay)), so the link keeps order as TCP does.
    """

    __slots__ = ("_deliver", "_due", "_queue", "_stream", "_timer")

    def __init__(self, stream: DelayStream,
                 deliver: Callable[[str | bytes | None], None]) -> None:
        self._stream = stream
        self._deliver = deliver
        self._queue: deque[tuple[float, str | bytes | None]] = deque()
        self._due = 0.0  # loop time the last queued frame is due at
        self._timer: asyncio.TimerHandle | None = None

    @property
    def idle(self) -> bool:
        return not self._queue

    def push(self, frame: str | bytes | None, delayed: bool = True) -> None:
        """Queue ``frame`` (``None``: the connection closed) to be delivered after a fresh
        delay, or (``delayed=False``) right after the frames already in flight."""
        loop = asyncio.get_running_loop()
        due = loop.time() + (self._stream.next_ns() / 1e9 if delayed else 0.0)
        self._due = due = max(due, self._due)
        self._queue.append((due, frame))
        if self._timer is None:
            self._timer = loop.call_at(due, self._release)

    def _release(self) -> None:
        self._timer = None
        queue = self._queue
        loop = asyncio.get_running_loop()
        now = loop.time()
        # the head is due (a timer may fire a clock tick early), and so may be others
        while True:
            self._deliver(queue.popleft()[1])
            if not queue:
                return
            if queue[0][0] > now:
                break
        self._timer = loop.call_at(queue[0][0], self._release)


def wants_batch(path: str) -> bool:
    """An event-stream consumer asks for one frame per input with ``?batch=1``."""
    return urllib.parse.parse_qs(urllib.parse.urlsplit(path).query).get("batch") == ["1"]


class Outbound:
    """Writes to peers that never wait on them.

    ``send`` queues a text frame in each peer's websockets protocol buffer at once (so
    order is kept) and the queued frames of a peer go out in one socket write at the end
    of the current event-loop turn: one system call per peer per turn, not per frame,
    which is what fan-out costs. Peers whose unsent backlog passes ``limit`` bytes are
    closed with 1008 "too slow".
    """

    def __init__(self, limit: int, kind: str) -> None:
        self.limit = limit
        self.kind = kind
        self._pending: dict[ServerConnection, int] = {}  # peer -> bytes queued this turn
        self._flush_scheduled = False
        self._evicting: set[ServerConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def send(self, peers: Iterable[ServerConnection], data: bytes) -> None:
        pending = self._pending
        size = len(data)
        for ws in peers:
            if ws.protocol.state is not State.OPEN or ws in self._evicting:
                continue
            ws.protocol.send_text(data)
            queued = pending.get(ws, 0) + size
            if queued < FLUSH_BYTES:
                pending[ws] = queued
            else:  # one turn may answer many requests: keep the backlog check honest
                pending.pop(ws, None)
                self._write(ws)
        if pending and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, {}
        for ws in pending:
            self._write(ws)

    def _write(self, ws: ServerConnection) -> None:
        # websockets may have written them already (it flushes with its own frames)
        data = b"".join(ws.protocol.data_to_send())
        transport = ws.transport
        if not data or transport.is_closing():
            return
        transport.write(data)
        if transport.get_write_buffer_size() > self.limit and ws not in self._evicting:
            self._evict(ws)

    def _evict(self, ws: ServerConnection) -> None:
        log.warning("closing %s %s: %d bytes unsent (limit %d)", self.kind, ws.remote_address,
                    ws.transport.get_write_buffer_size(), self.limit)
        self._evicting.add(ws)
        task = asyncio.get_running_loop().create_task(self._close(ws))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _close(self, ws: ServerConnection) -> None:
        try:
            # close() waits for the backlog to drain; a peer that never reads is cut off.
            await asyncio.wait_for(ws.close(*TOO_SLOW), EVICT_TIMEOUT_S)
        except asyncio.TimeoutError:
            ws.transport.abort()
        finally:
            self._evicting.discard(ws)


def order_state(order: Order, resting: bool) -> dict[str, Any]:
    """A live order as the ``open_orders`` reply lists it."""
    if not resting:
        status = OrderStatus.PENDING_TRIGGER
    elif order.leaves_qty < order.qty:
        status = OrderStatus.PARTIALLY_FILLED
    else:
        status = OrderStatus.NEW
    return {"order_id": order.order_id, "client_order_id": order.client_order_id,
            "symbol": order.symbol, "side": order.side.value,
            "order_type": order.order_type.value, "price": order.price,
            "stop_price": order.stop_price, "qty": order.qty, "leaves_qty": order.leaves_qty,
            "filled_qty": order.qty - order.leaves_qty, "tif": order.tif.value,
            "post_only": order.post_only, "status": status.value, "ts": order.ts}


def reject_message(event: OrderRejected | CancelRejected | AmendRejected) -> dict[str, Any]:
    if isinstance(event, OrderRejected):
        return {"type": "order_reject", "client_order_id": event.client_order_id,
                "code": event.code.value, "message": event.message, "ts": event.ts}
    kind = "cancel_reject" if isinstance(event, CancelRejected) else "amend_reject"
    return {"type": kind, "order_id": event.order_id, "client_order_id": event.client_order_id,
            "code": event.code.value, "message": event.message, "ts": event.ts}


def fill_message(trade: Trade, seq: int, side: Side) -> dict[str, Any]:
    """One side's view of a trade."""
    buy = side is Side.BUY
    return {"type": "fill",
            "order_id": trade.buy_order_id if buy else trade.sell_order_id,
            "client_order_id": trade.buy_client_order_id if buy else trade.sell_client_order_id,
            "trade_id": trade.trade_id, "symbol": trade.symbol, "side": side.value,
            "price": trade.price, "qty": trade.qty,
            "leaves_qty": trade.buy_leaves_qty if buy else trade.sell_leaves_qty,
            "liquidity": "taker" if trade.aggressor is side else "maker",
            "fee": to_currency(trade.buy_fee if buy else trade.sell_fee),
            "ts": trade.ts, "seq": seq, "liquidation": trade.liquidation}


def exit_on_journal_failure(exc: BaseException) -> None:
    """Fail-stop: inputs the engine applied cannot be made durable, so nothing they caused
    may go out. Exit at once; recovery restarts from what the journal holds."""
    log.critical("cannot write the journal (%r): stopping without acknowledging what it "
                 "does not hold", exc)
    logging.shutdown()
    os._exit(EXIT_JOURNAL_FAILED)


class HeldGroup:
    """What a group of inputs caused, held until the journal holds those inputs."""

    __slots__ = ("messages", "performance", "through", "trades")

    def __init__(self) -> None:
        self.through = 0  # the last input whose outputs it holds (set when it is cut)
        self.messages: list[tuple[Outbound, tuple[ServerConnection, ...], bytes]] = []
        self.trades: list[bytes] = []  # trades.csv rows
        self.performance: list[bytes] = []  # performance.csv rows


class JournalFlusher:
    """``batch``'s fsyncs, on one helper thread: whenever the loop has written inputs the
    last fsync did not cover, the thread fdatasyncs and tells the loop how far the journal
    is durable. Under load it syncs back to back without waiting to be woken, and the
    loop never waits for it: each step costs the loop one lock and, on the way back, one
    ``call_soon_threadsafe``. (A pool future per fsync, started from the loop after the
    previous one's completion had gone through the loop, cost a thread wake-up and two
    loop turns per group: a millisecond and more on a busy machine.)"""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_durable: Callable[[int], None],
                 on_failed: Callable[[BaseException], None]) -> None:
        self._loop = loop
        self._on_durable = on_durable
        self._on_failed = on_failed
        self._cond = threading.Condition(threading.Lock())
        self._journal: JournalWriter | None = None
        self._wanted = 0  # the last input written, which the loop wants durable
        self._synced = 0  # the last input known durable
        self._busy = False  # an fsync is running
        self._stopping = False
        self.syncs = 0
        self._thread = threading.Thread(target=self._run, name="journal-sync", daemon=True)
        self._thread.start()

    def request(self, journal: JournalWriter, through: int) -> None:
        """Inputs up to ``through`` are written to ``journal``: make them durable."""
        with self._cond:
            self._journal = journal
            if through > self._wanted:
                self._wanted = through
                if not self._busy:
                    self._cond.notify()

    def pause(self) -> None:
        """Wait out a running fsync and hold the thread until ``resume``: the loop then
        writes and syncs itself (and may switch segments) with no fsync in flight."""
        self._cond.acquire()
        while self._busy:
            self._cond.wait()

    def resume(self, durable: int) -> None:
        """End ``pause``; the loop made everything up to ``durable`` durable itself."""
        self._synced = max(self._synced, durable)
        self._wanted = max(self._wanted, durable)
        self._cond.release()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(SHUTDOWN_TIMEOUT_S)

    def _run(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while self._wanted <= self._synced and not self._stopping:
                    cond.wait()
                if self._stopping:
                    return
                # everything up to `wanted` was written before it was requested
                through, journal = self._wanted, self._journal
                self._busy = True
            try:
                assert journal is not None
                journal.sync()
            except BaseException as exc:  # fail-stop: nothing after this is acknowledged
                with cond:
                    self._busy = False
                    self._stopping = True
                    cond.notify_all()
                self._tell(self._on_failed, exc)
                return
            with cond:
                self._busy = False
                self.syncs += 1
                self._synced = max(self._synced, through)
                cond.notify_all()  # a pause() waiting for this fsync
            self._tell(self._on_durable, through)

    def _tell(self, callback: Callable[[Any], None], arg: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
            self._loop.call_soon_threadsafe(callback, arg)


class CommitQueue:
    """Group commit: every output waits for the journal write (and, with ``every`` and
    ``batch``, the fsync) that covers the inputs before it, then goes out in the order it
    was produced. Outputs of one group never overtake those of an earlier one. With
    ``interval`` an fsync follows the write on the helper thread within the period."""

    def __init__(self, journal: JournalWriter, policy: FlushPolicy, telemetry: Telemetry,
                 max_group: int = MAX_GROUP, sync_interval_s: float = DEFAULT_SYNC_MS / 1000,
                 ) -> None:
        self.journal = journal
        self.policy = policy
        self.sync_interval_s = sync_interval_s  # interval: the background fsync's period
        self.telemetry = telemetry
        self.max_group = max_group  # batch: written but unsynced inputs before we wait
        self.open = HeldGroup()  # collecting this turn's outputs
        self.held: deque[HeldGroup] = deque()  # batch: cut, waiting for their fsync
        self.durable = journal.written_number  # the last input known to be fsynced
        self.on_fatal: Callable[[BaseException], None] = exit_on_journal_failure
        self.on_idle: Callable[[], None] | None = None  # between groups: snapshots
        self.csv_failed = False
        self.closed = False
        self._scheduled = False
        self._last_sync = 0.0  # when the last background fsync started (monotonic)
        self._syncs = 0  # fsyncs run by the loop and the interval thread
        self._flusher: JournalFlusher | None = None  # batch: started on the first group
        self._settled: list[asyncio.Future[None]] = []
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        # interval: the background fsync running now, and the timer that starts the next
        self._background: concurrent.futures.Future[None] | None = None
        self._sync_timer: asyncio.TimerHandle | None = None
        self._unsynced = False  # written since the last background fsync started

    @property
    def syncs(self) -> int:
        """fsyncs so far (inputs / syncs: the mean group size)."""
        return self._syncs + (self._flusher.syncs if self._flusher is not None else 0)

    def hold(self, outbound: Outbound, peers: Iterable[ServerConnection], data: bytes) -> None:
        # the peers are fixed now: a consumer that connects later must not get this
        self.open.messages.append(
            (outbound, peers if type(peers) is tuple else tuple(peers), data))
        if not self._scheduled:
            self._schedule()

    def input_done(self) -> None:
        """An input was journaled and applied (its outputs are held)."""
        if self.policy is FlushPolicy.EVERY:
            self.commit_now()
            if self.on_idle is not None:
                self.on_idle()
        elif not self._scheduled:
            self._schedule()

    def _schedule(self) -> None:
        self._scheduled = True
        asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """End of a loop turn: write the turn's records; with ``batch`` the turn's outputs
        go out when an fsync covering them returns (at once with ``off``)."""
        self._scheduled = False
        if self.closed:  # shutdown committed everything; late replies just go out
            self.release(self._cut())
            return
        if self.policy is FlushPolicy.INTERVAL:
            self._flush_interval()
            return
        if self.on_idle is not None:
            self.on_idle()
        written = self._write()
        group = self._cut()
        if self.policy is not FlushPolicy.BATCH or \
                (not self.held and group.through <= self.durable):
            self.release(group)  # nothing it waits for is still unsynced
            return
        self.held.append(group)
        if self.journal.written_number - self.durable >= self.max_group:
            self.commit_now()  # bound what a crash can take: wait for the disk now
        elif written:
            if self._flusher is None:
                self._flusher = JournalFlusher(asyncio.get_running_loop(), self._durable,
                                               self._flusher_failed)
            self._flusher.request(self.journal, self.journal.written_number)

    def _durable(self, through: int) -> None:
        """The flusher's fsync covered every input up to ``through``."""
        if through > self.durable:
            self.durable = through
        held = self.held
        while held and held[0].through <= self.durable:
            self.release(held.popleft())
        if not held:
            self._wake_settled()

    def _flusher_failed(self, exc: BaseException) -> None:
        if not self.closed:
            self.on_fatal(exc)

    def settled(self) -> asyncio.Future[None]:
        """Done when no output is held for an fsync any more (tests, shutdown)."""
        future = asyncio.get_running_loop().create_future()
        self._settled.append(future)
        if not self.held:
            self._wake_settled()
        return future

    def _wake_settled(self) -> None:
        waiters, self._settled = self._settled, []
        for future in waiters:
            if not future.done():
                future.set_result(None)

    def _flush_interval(self) -> None:
        """``interval``: the turn's records are written (so a killed process loses
        none of them) and its outputs go out now; an fsync follows within the period."""
        if self.on_idle is not None:
            self.on_idle()
        if self._write():
            self._unsynced = True
            self._sync_later()
        self.release(self._cut())

    def _sync_later(self) -> None:
        if self._sync_timer is not None or self._background is not None or self.closed:
            return  # the running fsync's completion looks again
        wait = max(0.0, self._last_sync + self.sync_interval_s - time.monotonic())
        self._sync_timer = asyncio.get_running_loop().call_later(wait, self._sync_background)

    def _sync_background(self) -> None:
        self._sync_timer = None
        if self.closed or not self._unsynced:
            return
        self._unsynced = False
        self._syncs += 1
        self._last_sync = time.monotonic()
        self._background = self._thread().submit(self.journal.sync)
        asyncio.wrap_future(self._background).add_done_callback(self._background_synced)

    def _background_synced(self, future: asyncio.Future[None]) -> None:
        self._background = None
        exc = future.exception() if not future.cancelled() else None
        if exc is not None and not self.closed:
            self.on_fatal(exc)
            return
        if self._unsynced:
            self._sync_later()

    def _thread(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="journal-sync")
        return self._executor

    def commit_now(self, force_sync: bool = False) -> None:
        """Make everything journaled so far durable and release every held output, now
        (each input with ``every``; a group at its bound; shutdown; snapshots, which
        always fsync)."""
        if self._background is not None:  # a segment may be closed after this returns
            try:
                self._background.result()
            except OSError as exc:
                self.on_fatal(exc)
                raise
        flusher = self._flusher
        if flusher is not None:
            flusher.pause()  # no fsync in flight, none starting, until resume
        try:
            written = self._write()
            if force_sync or (self.policy is not FlushPolicy.OFF and
                              (written or self.journal.written_number > self.durable)):
                self._syncs += 1
                self.journal.sync()  # covers what the flusher has not synced yet too
                self.durable = self.journal.written_number
        except OSError as exc:
            self.on_fatal(exc)
            raise
        finally:
            if flusher is not None:
                flusher.resume(self.durable)
        held = self.held
        while held:
            self.release(held.popleft())
        self.release(self._cut())
        self._wake_settled()

    def _cut(self) -> HeldGroup:
        group, self.open = self.open, HeldGroup()
        group.through = self.journal.next_number - 1
        return group

    def _write(self) -> int:
        try:
            return self.journal.write()
        except OSError as exc:
            self.on_fatal(exc)
            raise

    def release(self, group: HeldGroup) -> None:
        if group.trades or group.performance:
            self._write_csv(group)  # the rows are written before anyone is told
        for outbound, peers, data in group.messages:
            outbound.send(peers, data)

    def _write_csv(self, group: HeldGroup) -> None:
        if self.csv_failed:
            return
        try:
            if group.trades:
                self.telemetry.trades.append(b"".join(group.trades))
            if group.performance:
                self.telemetry.performance.append(b"".join(group.performance))
        except OSError:
            # appending after a torn row would bury it mid-file; stop, and let the next
            # start append what is missing (the journal has it)
            log.exception("cannot write telemetry: no more CSV rows this run; a restart "
                          "appends the missing ones from the journal")
            self.csv_failed = True

    def close(self) -> None:
        """Commit everything, stop the fsync threads and close the journal."""
        self.commit_now(force_sync=True)
        self.closed = True
        if self._flusher is not None:
            self._flusher.stop()
        if self._sync_timer is not None:
            self._sync_timer.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self.journal.close()


class Exchange:
    """The sequencer and both endpoints' handlers (transport-agnostic up to the socket)."""

    def __init__(self, config: ExchangeConfig, telemetry: Telemetry,
                 accounts: dict[str, str] | None = None,
                 client_buffer: int = DEFAULT_CLIENT_BUFFER,
                 consumer_buffer: int = DEFAULT_CONSUMER_BUFFER, *,
                 recovered: Recovered | None = None,
                 flush: FlushPolicy = FlushPolicy.BATCH,
                 sync_ms: int = DEFAULT_SYNC_MS,
                 snapshot_every: int = DEFAULT_SNAPSHOT_EVERY,
                 step_ms: int | None = None,
                 step_timeout_ms: int = DEFAULT_STEP_TIMEOUT_MS) -> None:
        """Without ``recovered`` the exchange starts empty and journals nothing; with it,
        it continues from the recovered state and journals every input. ``step_ms``
        selects lockstep mode (``--clock sim``, ``lockstep.py``)."""
        self.config = config
        self.engine = recovered.engine if recovered else Engine(config)
        self.telemetry = telemetry
        self.accounts = accounts
        last_ts = recovered.last_ts if recovered else 0
        self.clock: Clock | SimClock = Clock(last_ts) if step_ms is None else SimClock(last_ts)
        self.seq = recovered.seq if recovered else 0
        self.commits = CommitQueue(recovered.journal, flush, telemetry,
                                   sync_interval_s=sync_ms / 1000) if recovered else None
        self.snapshot_every = snapshot_every
        # inputs the newest snapshot covers: a long replayed tail is snapshotted soon
        self._snapshot_at = (recovered.snapshot_at or 0) if recovered else 0
        if self.commits is not None:
            self.commits.on_idle = self._maybe_snapshot
        self._fingerprint = core_fingerprint() if recovered else ""
        self.stopping = False
        self.latency = LatencyModel(config.latency)
        self.sessions: dict[str, dict[ServerConnection, None]] = {}  # trader -> its sessions
        self.consumers: dict[ServerConnection, None] = {}  # one event per frame
        self.batch_consumers: dict[ServerConnection, None] = {}  # ?batch=1: per input
        self.to_clients = Outbound(client_buffer, "trader session")
        self.to_consumers = Outbound(consumer_buffer, "event consumer")
        symbols = self.engine.symbols
        self.default_symbol = symbols[0] if len(symbols) == 1 else None
        # last trade price per symbol, for `position` (between inputs: the engine's)
        self._fill_prices: dict[str, int] = {
            symbol: price for symbol, price in self.engine.last_prices.items()
            if price is not None}
        self._login_info = self._build_login_info()
        self._private: dict[type, Callable[[Any, int], None]] = {
            OrderAccepted: self._on_accepted, Trade: self._on_trade,
            PositionChanged: self._on_position, OrderCanceled: self._on_canceled,
            OrderAmended: self._on_amended, OrderTriggered: self._on_triggered,
            TraderStatusChanged: self._on_trader_status,
        }
        self._requests: dict[type, Callable[[Session, Any], None]] = {
            Login: self._login, Ping: self._ping, GetPosition: self._get_position,
            GetOpenOrders: self._get_open_orders,
        }
        # lockstep mode: simulated time, inputs applied per step in canonical order
        self.lockstep = None if step_ms is None else Lockstep(self, step_ms, step_timeout_ms)
        self._requests.update(self.lockstep.handlers() if self.lockstep is not None else
                              dict.fromkeys(Lockstep.request_types(), self._no_lockstep))

    def _build_login_info(self) -> dict[str, Any]:
        config = self.config
        risk, fees, margin = config.risk, config.fees, config.margin
        return {
            "protocol_version": PROTOCOL_VERSION,
            "instruments": [{"symbol": i.symbol, "tick_size": float(Decimal(i.tick_size)),
                             "lot_size": i.lot_size} for i in config.instruments],
            "limits": {"max_order_qty": risk.max_order_qty, "max_position": risk.max_position,
                       "max_open_orders": risk.max_open_orders,
                       "rate_limit_per_sec": risk.rate_limit_per_sec,
                       "rate_limit_burst": risk.rate_limit_burst,
                       "max_message_bytes": config.server.max_message_bytes},
            "fees": {"maker_fee_bps": fees.maker_fee_bps, "taker_fee_bps": fees.taker_fee_bps},
            "margin": {"enabled": margin.enabled, "initial_cash": margin.initial_cash,
                       "initial_margin_pct": margin.initial_margin_pct,
                       "maintenance_margin_pct": margin.maintenance_margin_pct},
        }

    # ================================================================= sequencer

    def submit(self, command: Any) -> None:
        """Apply one command to the engine now and send out what it caused.

        The command is journaled first, whatever its outcome: a rejection still spends a
        rate-limit token, and a command the engine fails on may have changed something,
        which a replay then reproduces the same way."""
        if self.lockstep is not None and self.lockstep.defer(command):
            return  # lockstep: applied at its step's boundary, in canonical order
        ts = self.clock.now()
        commits = self.commits
        if commits is None:
            self.publish(self.engine.process(command, ts))
            return
        commits.journal.append(command_record(command, self.seq, ts))
        try:
            self.publish(self.engine.process(command, ts))
        finally:
            commits.input_done()

    def publish(self, events: list[Event]) -> None:
        # batch consumers get an input's events in one frame: fewer frames to write here
        # and to parse in the relay, the bulk of both sides' per-event cost
        batch: list[bytes] | None = [] if self.batch_consumers else None
        for event in events:
            if isinstance(event, REJECT_EVENTS):
                self._send_private(event.trader_id, reject_message(event))
                continue
            self.seq += 1
            seq = self.seq
            if type(event) is Trade:
                self._record_trade(event, seq)
            if self.consumers or batch is not None:
                data = orjson.dumps(event_to_dict(event, seq))
                if self.consumers:
                    self._out(self.to_consumers, self.consumers, data)
                if batch is not None:
                    batch.append(data)
            handler = self._private.get(type(event))
            if handler is not None:
                try:
                    handler(event, seq)
                except Exception:  # a bug here must not cut the stream short
                    log.exception("private message for %r failed", event)
        if batch:
            self._out(self.to_consumers, self.batch_consumers,
                      b"[" + b",".join(batch) + b"]")

    def _record_trade(self, trade: Trade, seq: int) -> None:
        self._fill_prices[trade.symbol] = trade.price
        if self.lockstep is not None:
            self.lockstep.on_trade(trade, seq)
        row = self.telemetry.format.trade(trade, seq)
        if self.commits is not None:
            self.commits.open.trades.append(row)  # written when its input is durable
            return
        try:
            # the row is on disk before anyone is told of the fill
            self.telemetry.trades.append(row)
        except OSError:
            log.exception("trades.csv: cannot write trade %d", trade.trade_id)

    def publish_leaderboard(self) -> None:
        """A sequenced leaderboard event on the internal stream (money in currency). It
        spends a ``seq``, so it is journaled like any input."""
        ts = self.clock.now()
        if self.commits is not None:
            self.commits.journal.append(tick_record(LEADERBOARD, self.seq, ts))
        self.seq += 1
        if self.consumers or self.batch_consumers:
            self._out(self.to_consumers, (*self.consumers, *self.batch_consumers),
                      orjson.dumps(leaderboard_message(self.engine, self.seq, ts)))
        if self.commits is not None:
            self.commits.input_done()

    def snapshot(self) -> dict[str, Any]:
        """The exchange after event ``seq``: L3 books and market state."""
        engine = self.engine
        books = {symbol: {"bids": [[o.order_id, o.price, o.leaves_qty]
                                   for o in book.iter_orders(Side.BUY)],
                          "asks": [[o.order_id, o.price, o.leaves_qty]
                                   for o in book.iter_orders(Side.SELL)]}
                 for symbol, book in engine.books.items()}
        return {"type": "snapshot", "seq": self.seq, "ts": self.clock.now(),
                "instruments": [{"symbol": i.symbol, "tick_size": i.tick_size,
                                 "lot_size": i.lot_size} for i in self.config.instruments],
                "books": books, "market_open": dict(engine.market_open),
                "last_prices": dict(engine.last_prices)}

    # ================================================================= private messages

    def _out(self, outbound: Outbound, peers: Iterable[ServerConnection], data: bytes) -> None:
        """Send now, or (journaling) when the inputs before it are in the journal."""
        if self.commits is None:
            outbound.send(peers, data)
        else:
            self.commits.hold(outbound, peers, data)

    def send_to_clients(self, peers: Iterable[ServerConnection], data: bytes) -> None:
        """Trader sessions get ``data`` after everything queued before it."""
        self._out(self.to_clients, peers, data)

    def _no_lockstep(self, _session: Session, _request: Any) -> None:
        raise ProtocolError(RejectCode.LOCKSTEP_NOT_ENABLED,
                            "lockstep messages need an exchange started with --clock sim")

    def _send_private(self, trader_id: str, message: dict[str, Any]) -> None:
        sessions = self.sessions.get(trader_id)
        if sessions:
            self._out(self.to_clients, sessions, orjson.dumps(message))

    def _reply(self, session: Session, message: dict[str, Any]) -> None:
        self._out(self.to_clients, (session.ws,), orjson.dumps(message))

    def _on_accepted(self, event: OrderAccepted, seq: int) -> None:
        self._send_private(event.trader_id, {
            "type": "order_ack", "order_id": event.order_id,
            "client_order_id": event.client_order_id, "symbol": event.symbol,
            "side": event.side.value, "order_type": event.order_type.value,
            "price": event.price, "stop_price": event.stop_price, "qty": event.qty,
            "leaves_qty": event.qty, "tif": event.tif.value, "post_only": event.post_only,
            "ts": event.ts, "seq": seq, "liquidation": event.liquidation})

    def _on_trade(self, event: Trade, seq: int) -> None:
        self._send_private(event.buy_trader, fill_message(event, seq, Side.BUY))
        self._send_private(event.sell_trader, fill_message(event, seq, Side.SELL))

    def _on_position(self, event: PositionChanged, seq: int) -> None:
        if event.trader_id not in self.sessions:
            return  # valuing it costs a little; nobody would read it
        symbol = event.symbol
        mark = self._fill_prices.get(symbol) or self.engine.mark_price(symbol)
        tick_value = self.engine.tick_values[symbol]
        held_value = event.position * mark * tick_value
        report = PositionReport(
            event.trader_id, symbol, event.position,
            event.open_cost / event.position if event.position else 0.0, event.cash,
            event.realized_pnl, held_value - event.open_cost * tick_value,
            event.cash + held_value + self._other_holdings(event.trader_id, symbol),
            event.fees)
        message = self._position_message(report)
        message["ts"], message["seq"] = event.ts, seq
        self._send_private(event.trader_id, message)

    def _other_holdings(self, trader_id: str, symbol: str) -> int:
        """Value at the marks of the trader's positions in symbols other than ``symbol``."""
        account = self.engine.ledger.accounts.get(trader_id)
        if account is None or len(account.positions) <= 1:
            return 0
        marks = self.engine.marks()
        tick_values = self.engine.tick_values
        return sum(p.qty * marks[s] * tick_values[s]
                   for s, p in account.positions.items() if s != symbol and p.qty)

    def _position_message(self, report: PositionReport) -> dict[str, Any]:
        trader_id = report.trader_id
        return {"type": "position", "symbol": report.symbol, "position": report.position,
                "avg_price": report.avg_price, "cash": to_currency(report.cash),
                "realized_pnl": to_currency(report.realized_pnl),
                "unrealized_pnl": to_currency(report.unrealized_pnl),
                "equity": to_currency(report.equity),
                "margin_used": to_currency(self.engine.margin_used(trader_id)),
                "status": self.engine.trader_status(trader_id).value,
                "fees": to_currency(report.fees)}

    def _on_canceled(self, event: OrderCanceled, seq: int) -> None:
        self._send_private(event.trader_id, {
            "type": "order_canceled", "order_id": event.order_id,
            "client_order_id": event.client_order_id, "symbol": event.symbol,
            "side": event.side.value, "canceled_qty": event.canceled_qty,
            "reason": event.reason.value, "ts": event.ts, "seq": seq})

    def _on_amended(self, event: OrderAmended, seq: int) -> None:
        self._send_private(event.trader_id, {
            "type": "order_amended", "order_id": event.order_id,
            "client_order_id": event.client_order_id, "symbol": event.symbol,
            "side": event.side.value, "price": event.price, "qty": event.qty,
            "leaves_qty": event.leaves_qty, "priority_kept": event.priority_kept,
            "ts": event.ts, "seq": seq})

    def _on_triggered(self, event: OrderTriggered, seq: int) -> None:
        self._send_private(event.trader_id, {
            "type": "order_triggered", "order_id": event.order_id,
            "client_order_id": event.client_order_id, "symbol": event.symbol,
            "ts": event.ts, "seq": seq})

    def _on_trader_status(self, event: TraderStatusChanged, seq: int) -> None:
        self._send_private(event.trader_id, {"type": "trader_status",
                                             "status": event.status.value,
                                             "ts": event.ts, "seq": seq})

    # ================================================================= gateway

    async def gateway(self, ws: ServerConnection) -> None:
        session = Session(ws)
        try:
            async for frame in ws:
                if session.delay is None:  # no latency model for it: the direct path
                    self.on_frame(session, frame)
                else:
                    session.delay.push(frame)
        except ConnectionClosed:
            pass  # a client that vanishes is normal; its session just ends
        finally:
            if session.delay is None or session.delay.idle:
                self.end_session(session)
            else:  # its inputs still in flight are sequenced first, then it ends
                session.delay.push(None, delayed=False)

    def _delayed_frame(self, session: Session, frame: str | bytes | None) -> None:
        """A frame (``None``: the disconnect) leaving a session's ``DelayLine``."""
        if frame is None:
            self.end_session(session)
        else:
            self.on_frame(session, frame)

    def on_frame(self, session: Session, frame: str | bytes) -> None:
        """Handle one inbound frame completely (synchronously: this is the sequencer)."""
        if self.stopping:
            return  # the final performance rows are written; nothing more is applied
        try:
            request = self._decode(session, frame)
            handler = self._requests.get(type(request))
            if handler is None:
                self.submit(request)
            else:
                handler(session, request)
        except ProtocolError as exc:
            self._reply(session, {"type": "error", "code": exc.code.value,
                                  "message": exc.message, "ref": exc.ref})
        except Exception:
            log.exception("request from %s failed: %.200r", session.trader_id, frame)
            self._reply(session, {"type": "error", "code": RejectCode.INTERNAL_ERROR.value,
                                  "message": "the exchange failed to process this request",
                                  "ref": None})

    def _decode(self, session: Session, frame: str | bytes) -> Request:
        if not isinstance(frame, str):
            raise ProtocolError(RejectCode.BAD_JSON,
                                "binary frames are not accepted; send JSON in a text frame")
        try:
            message = orjson.loads(frame)
        except orjson.JSONDecodeError as exc:
            raise ProtocolError(RejectCode.BAD_JSON, f"not valid JSON: {exc}") from None
        try:
            return parse_request(message, session.trader_id, self.default_symbol)
        except ProtocolError as exc:
            if exc.ref is None and isinstance(message, dict):
                ref = message.get("client_order_id", message.get("order_id"))
                exc.ref = ref if type(ref) in (str, int) else None
            raise

    def end_session(self, session: Session) -> None:
        trader_id = session.trader_id
        if trader_id is None:
            return
        if self.lockstep is not None:
            self.lockstep.session_ended(session)
        sessions = self.sessions.get(trader_id, {})
        sessions.pop(session.ws, None)
        if sessions:
            return
        self.sessions.pop(trader_id, None)
        log.info("trader %s disconnected", trader_id)
        if self.config.server.cancel_on_disconnect and not self.stopping:
            try:
                self.submit(CancelAll(trader_id, reason=CancelReason.DISCONNECT))
            except Exception:
                log.exception("cancel-on-disconnect for %s failed", trader_id)

    def _login(self, session: Session, request: Login) -> None:
        if self.accounts is not None:
            expected = self.accounts.get(request.trader_id)
            token = request.token or ""
            if expected is None or not hmac.compare_digest(expected.encode(), token.encode()):
                raise ProtocolError(RejectCode.AUTH_FAILED,
                                    "unknown trader_id or wrong token")
        session.trader_id = request.trader_id
        self.sessions.setdefault(request.trader_id, {})[session.ws] = None
        stream = self.latency.stream(request.trader_id)
        # real time: every later frame of this connection waits its delay (lockstep
        # delays by whole steps instead, with latency.steps_for, when it defers inputs)
        if stream is not None and self.lockstep is None:
            session.delay = DelayLine(stream, functools.partial(self._delayed_frame, session))
        log.info("trader %s logged in from %s", request.trader_id, session.ws.remote_address)
        self._reply(session, {"type": "login_ack", "trader_id": request.trader_id,
                              **self._login_info})

    def _ping(self, session: Session, _request: Ping) -> None:
        self._reply(session, {"type": "pong"})

    def _symbols(self, symbol: str | None) -> list[str]:
        if symbol is None:
            return self.engine.symbols
        if symbol not in self.engine.books:
            raise ProtocolError(RejectCode.UNKNOWN_SYMBOL, f"unknown symbol {symbol!r}", symbol)
        return [symbol]

    def _get_position(self, session: Session, request: GetPosition) -> None:
        trader_id = session.trader_id
        assert trader_id is not None
        for symbol in self._symbols(request.symbol):
            self._reply(session, self._position_message(self._report(trader_id, symbol)))

    def _report(self, trader_id: str, symbol: str) -> PositionReport:
        return self.engine.position_report(trader_id, symbol)  # read-only: opens no account

    def _get_open_orders(self, session: Session, request: GetOpenOrders) -> None:
        trader_id = session.trader_id
        assert trader_id is not None
        self._symbols(request.symbol)  # validates it
        orders = self.engine.open_orders(trader_id, request.symbol)
        books = self.engine.books
        self._reply(session, {"type": "open_orders", "symbol": request.symbol, "orders": [
            order_state(o, o.order_id in books[o.symbol].resting_orders) for o in orders]})

    # ================================================================= event stream

    async def events(self, ws: ServerConnection) -> None:
        # Snapshot and registration happen with no await between: no event can slip in.
        batched = wants_batch(ws.request.path if ws.request is not None else "/")
        consumers = self.batch_consumers if batched else self.consumers
        self._out(self.to_consumers, (ws,), orjson.dumps(self.snapshot()))
        consumers[ws] = None
        log.info("event consumer connected from %s at seq %d%s", ws.remote_address, self.seq,
                 " (batched)" if batched else "")
        try:
            async for frame in ws:
                self.on_admin(ws, frame)
        except ConnectionClosed:
            pass
        finally:
            consumers.pop(ws, None)

    def on_admin(self, ws: ServerConnection, frame: str | bytes) -> None:
        """A trusted consumer opens or closes markets: an input like any other, sequenced
        and journaled; the consumer then gets ``admin_ack`` with every market's state."""
        try:
            command = parse_admin(orjson.loads(frame))
            if command.symbol is not None and command.symbol not in self.engine.books:
                raise ProtocolError(RejectCode.UNKNOWN_SYMBOL,
                                    f"unknown symbol {command.symbol!r}")
        except orjson.JSONDecodeError as exc:
            self._admin_reply(ws, {"type": "error", "code": RejectCode.BAD_JSON.value,
                                   "message": f"not valid JSON: {exc}"})
            return
        except ProtocolError as exc:
            self._admin_reply(ws, {"type": "error", "code": exc.code.value,
                                   "message": exc.message})
            return
        log.info("admin: %s %s", "opening" if command.is_open else "closing",
                 command.symbol or "every symbol")
        self.submit(command)
        self._admin_reply(ws, {"type": "admin_ack", "seq": self.seq,
                               "market_open": dict(self.engine.market_open)})

    def _admin_reply(self, ws: ServerConnection, message: dict[str, Any]) -> None:
        self._out(self.to_consumers, (ws,), orjson.dumps(message))

    # ================================================================= telemetry

    def performance_rows(self) -> list[PerformanceRow]:
        return performance_rows(self.engine)

    def write_performance(self) -> None:
        """A performance snapshot: journaled, since its rows depend on when it ran."""
        ts = self.clock.now()
        rows = self.telemetry.format.performance(ts, self.performance_rows())
        if self.commits is not None:
            self.commits.journal.append(tick_record(PERFORMANCE, self.seq, ts))
            self.commits.open.performance.append(rows)
            self.commits.input_done()
            return
        try:
            self.telemetry.performance.append(rows)
        except OSError:
            log.exception("performance.csv: cannot write")

    # ================================================================= durability

    def _maybe_snapshot(self) -> None:
        commits = self.commits
        if commits is None or not self.snapshot_every or commits.csv_failed:
            return
        if commits.journal.next_number - 1 - self._snapshot_at >= self.snapshot_every:
            self.snapshot_now()

    def snapshot_now(self) -> None:
        """Write the full state after the last journaled input and start a new journal
        segment there. Everything before is committed first, so the snapshot, the journal
        and the CSV sizes it records agree. A failure only costs recovery time."""
        commits = self.commits
        assert commits is not None
        commits.commit_now(force_sync=True)
        number = commits.journal.next_number - 1
        self._snapshot_at = number  # even if it fails: retry after another interval
        started = time.perf_counter()
        try:
            self.telemetry.sync()
            sizes = self.telemetry.sizes()
            directory = commits.journal.directory
            write_snapshot(directory, number, {
                "version": FORMAT_VERSION, "number": number, "seq": self.seq,
                "ts": self.clock.last, "trades_offset": sizes[0],
                "performance_offset": sizes[1], "engine": self.engine,
                "state_hash": self.engine.state_hash(), "fingerprint": self._fingerprint,
                "config": engine_config(self.config)})
            journal = JournalWriter.create(directory, number + 1, segment_header(
                self.seq, self.clock.last, sizes, self.config))
        except Exception:  # pickling runs arbitrary code; the journal still has it all
            log.exception("snapshot after input #%d failed; recovery replays more instead",
                          number)
            return
        commits.journal.close()
        commits.journal = journal
        log.info("snapshot after input #%d (seq %d) in %.3f s", number, self.seq,
                 time.perf_counter() - started)

    def finish(self) -> None:
        """Shutdown: commit and release everything, snapshot, close the journal."""
        if self.commits is None:
            return
        self.commits.commit_now(force_sync=True)
        if self.commits.journal.next_number - 1 > self._snapshot_at and \
                not self.commits.csv_failed:
            self.snapshot_now()  # so the next start has nothing to replay
        self.commits.close()
        log.info("journal: %d fsyncs this run", self.commits.syncs)
        log.info("final state after input #%d, seq %d: state_hash=%s",
                 self.commits.journal.next_number - 1, self.seq, self.engine.state_hash())


# ===================================================================== process


async def every(interval_s: float, action: Callable[[], None]) -> None:
    """Run ``action`` every ``interval_s`` seconds until canceled; a failure is logged."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            action()
        except Exception:
            log.exception("periodic %s failed", getattr(action, "__name__", action))


def endpoint_uri(server: Server) -> str:
    host, port = server.sockets[0].getsockname()[:2]
    return f"ws://[{host}]:{port}" if ":" in host else f"ws://{host}:{port}"


async def run(args: argparse.Namespace, exchange: Exchange) -> None:
    options: dict[str, Any] = {"compression": None, "close_timeout": CLOSE_TIMEOUT_S,
                               "max_size": exchange.config.server.max_message_bytes}
    stop = asyncio.Event()
    stop_on_signals(stop)
    gateway = await serve(exchange.gateway, args.host, args.port, **options)
    events = await serve(exchange.events, args.host, args.events_port, **options)
    print("READY " + json.dumps({"gateway": endpoint_uri(gateway),
                                 "events": endpoint_uri(events)}), flush=True)
    server_config = exchange.config.server
    tasks = [] if exchange.lockstep is not None else [  # lockstep: timers on sim time
        asyncio.create_task(every(server_config.leaderboard_interval_s,
                                  exchange.publish_leaderboard)),
        asyncio.create_task(every(server_config.performance_interval_s,
                                  exchange.write_performance))]
    await stop.wait()
    log.info("shutting down")
    await shutdown(exchange, (gateway, events), tasks)


async def shutdown(exchange: Exchange, servers: tuple[Server, ...],
                   tasks: list[asyncio.Task[None]]) -> None:
    exchange.stopping = True
    if exchange.lockstep is not None:
        exchange.lockstep.stop()  # the last rows below carry the last step's sim ts
    for task in tasks:
        task.cancel()
    for server in servers:
        server.server.close()  # stop accepting; open sessions close below
    exchange.write_performance()
    exchange.finish()  # everything journaled is durable and sent before the sessions close
    for server in servers:
        server.close()
    try:
        await asyncio.wait_for(asyncio.gather(*(s.wait_closed() for s in servers)),
                               SHUTDOWN_TIMEOUT_S)
    except asyncio.TimeoutError:
        log.warning("some connections did not close within %.0f s", SHUTDOWN_TIMEOUT_S)
    exchange.telemetry.close()


def load_accounts(path: str) -> dict[str, str]:
    """``{"trader_id": "token", ...}``; a problem is a ConfigError naming it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read accounts {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected an object of trader_id -> token")
    for trader_id, token in data.items():
        if not TRADER_ID_RE.fullmatch(trader_id):
            raise ConfigError(f"{path}: {trader_id!r}: not a valid trader_id")
        if not isinstance(token, str) or not token:
            raise ConfigError(f"{path}: {trader_id}: token must be a non-empty string")
    return data


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="OpenMarketSim exchange: order gateway, internal event stream, "
                    "CSV telemetry.")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (%(default)s)")
    parser.add_argument("--port", type=int, default=9001,
                        help="order gateway port; 0 picks a free one (%(default)s)")
    parser.add_argument("--events-port", type=int, default=9002,
                        help="internal event stream port; 0 picks a free one (%(default)s)")
    parser.add_argument("--config", help="exchange config JSON (default: built-in defaults)")
    parser.add_argument("--data-dir", default=".",
                        help="where trades.csv and performance.csv are appended and the "
                             "journal is kept; a restart continues from it (%(default)s)")
    parser.add_argument("--journal-flush", choices=[p.value for p in FlushPolicy],
                        default=FlushPolicy.BATCH.value,
                        help="every: fsync each input before its replies go out; batch: "
                             "group commit, one fsync per group of inputs (at most every "
                             "1 ms), replies wait for it (nothing acknowledged is ever lost); "
                             "interval: replies wait for the write only, fsync in the "
                             "background every --journal-sync-ms (a killed process loses "
                             "nothing, an OS crash at most that window); "
                             "off: never fsync (survives a killed process, not a power "
                             "loss) (%(default)s)")
    parser.add_argument("--journal-sync-ms", type=int, default=DEFAULT_SYNC_MS, metavar="MS",
                        help="--journal-flush interval: the longest acknowledged inputs "
                             "wait for their fsync (%(default)s)")
    parser.add_argument("--snapshot-every", type=int, default=DEFAULT_SNAPSHOT_EVERY,
                        metavar="N", help="snapshot the state every N journaled inputs, "
                        "which bounds recovery time; 0: only at shutdown (%(default)s)")
    parser.add_argument("--no-journal", action="store_true",
                        help="journal nothing: a restart starts empty (benchmarks, "
                             "throwaway runs)")
    parser.add_argument("--clock", choices=["wall", "sim"], default="wall",
                        help="wall: inputs are applied as they arrive, at wall-clock time; "
                             "sim: lockstep mode, simulated time advancing in steps of "
                             "--step-ms that registered bots answer (API_SPEC.md, "
                             "\"Lockstep mode\") (%(default)s)")
    parser.add_argument("--step-ms", type=int, default=DEFAULT_STEP_MS,
                        help="--clock sim: simulated milliseconds per step (%(default)s)")
    parser.add_argument("--step-timeout-ms", type=int, default=DEFAULT_STEP_TIMEOUT_MS,
                        help="--clock sim: wall-clock milliseconds a bot may take to answer "
                             "a tick before it is skipped for that step (%(default)s)")
    parser.add_argument("--accounts",
                        help="JSON object trader_id -> token; when given, login needs a token")
    parser.add_argument("--client-buffer", type=int, default=DEFAULT_CLIENT_BUFFER,
                        help="bytes a trader session may leave unsent before it is closed "
                             "as too slow (%(default)s)")
    parser.add_argument("--consumer-buffer", type=int, default=DEFAULT_CONSUMER_BUFFER,
                        help="the same bound for event stream consumers (%(default)s)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="(%(default)s)")
    parser.set_defaults(parser=parser)
    return parser.parse_args(argv)



def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "DEBUG":
        logging.getLogger("websockets").setLevel(logging.WARNING)
    try:
        config = load_config(args.config)
        accounts = load_accounts(args.accounts) if args.accounts else None
    except ConfigError as exc:
        args.parser.exit(2, f"exchange_server: config error: {exc}\n")
    if args.snapshot_every < 0:
        args.parser.exit(2, "exchange_server: --snapshot-every must be >= 0\n")
    if args.journal_sync_ms <= 0:
        args.parser.exit(2, "exchange_server: --journal-sync-ms must be > 0\n")
    if args.step_ms <= 0 or args.step_timeout_ms <= 0:
        args.parser.exit(2, "exchange_server: --step-ms and --step-timeout-ms must be > 0\n")
    data_dir = Path(args.data_dir)
    if args.no_journal and list_segments(journal_dir(data_dir)):
        args.parser.exit(2, f"exchange_server: {data_dir} has a journal; --no-journal would "
                            "start from an empty book and reuse its order and trade ids: use "
                            "another --data-dir\n")
    try:
        if args.no_journal:
            recovered = None
            telemetry = Telemetry(data_dir, config.instruments)
        else:
            recovered = recover(data_dir, config)
            telemetry = recovered.telemetry
            log.info("%s", recovered.summary())
    except JournalError as exc:
        log.error("cannot recover %s: %s", data_dir, exc)
        args.parser.exit(EXIT_JOURNAL_FAILED, f"exchange_server: cannot recover {data_dir}: "
                                              f"{exc}\n")
    except OSError as exc:
        args.parser.exit(2, f"exchange_server: cannot use {data_dir}: {exc}\n")
    log.info("matching core: %s", native_core.implementation())
    exchange = Exchange(config, telemetry, accounts, args.client_buffer, args.consumer_buffer,
                        recovered=recovered, flush=FlushPolicy(args.journal_flush),
                        sync_ms=args.journal_sync_ms,
                        snapshot_every=args.snapshot_every,
                        step_ms=args.step_ms if args.clock == "sim" else None,
                        step_timeout_ms=args.step_timeout_ms)
    # Modules and the recovered state live as long as the process: keep them out of the
    # cyclic collector, whose full passes over everything (~6 ms here) land in the ack
    # latency tail. Only what the run allocates is scanned from now on.
    gc.collect()
    gc.freeze()
    try:
        run_event_loop(run(args, exchange))
    except OSError as exc:
        log.error("cannot serve: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
