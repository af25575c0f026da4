"""Lockstep (simulated-time) mode of the exchange: ``exchange_server.py --clock sim``.

Time advances in steps of ``step_us`` microseconds of simulated time. Step ``k`` starts
when the exchange sends every registered bot ``{"type": "tick", "step": k, "ts": ...}``
(``ts = k * step_us``, since the simulation's fixed start instant) carrying the public
market data of the step before: its trades and each symbol's L2 book. Each bot answers
with its orders and ``step_done``. When every registered bot is done (or
``timeout_s`` of wall time has passed: the laggards are skipped and logged), the
step's inputs are applied in canonical order, by trader id and then in the order each
trader sent them, each through the exchange's normal sequencer (seq, journal, acks,
fills, the event stream); then the timer-driven leaderboard and performance rows are
due on simulated time, and the next tick goes out. Private replies of step ``k`` are
queued before tick ``k + 1`` on the same connection, so they reach the bot first.

Everything a bot decides on therefore comes from one connection in a fixed order, and
the order the exchange applies inputs in does not depend on which socket delivered
first: the same seed gives the same run.

Inputs are kept by the step they are due in (``Lockstep.inputs``), so a latency model
only has to choose a later step. While no step is open (before the first bot joins,
while waiting for the announced participants, after the last one left) the clock
stands still: a registered bot's inputs wait for the first step, anyone else's are
applied at the end of the event-loop turn, in canonical order, at the current
simulated time.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from latency import steps_for
from models import (
    CancelAll,
    CancelReason,
    LockstepJoin,
    LockstepLeave,
    ProtocolError,
    RejectCode,
    Side,
    StepDone,
    Trade,
)

if TYPE_CHECKING:
    from websockets.asyncio.server import ServerConnection

    from exchange_server import Exchange, Session

log = logging.getLogger("lockstep")

DEFAULT_STEP_MS = 10
DEFAULT_STEP_TIMEOUT_MS = 2000
TICK_DEPTH = 10  # L2 levels per side a tick carries


class SimClock:
    """The engine's ``ts`` in lockstep mode: simulated microseconds, set by the steps
    and standing still between them. Same interface as the wall ``Clock``."""

    def __init__(self, last: int = 0) -> None:
        self.last = last

    def now(self) -> int:
        return self.last

    def advance_to(self, ts: int) -> None:
        self.last = max(self.last, ts)


@dataclass(slots=True)
class Member:
    """A bot taking part in the lockstep."""

    trader_id: str
    ws: ServerConnection  # the session that joined: ticks go there
    first_step: int  # the first step it is waited for
    leaving: bool = False  # sent lockstep_leave: removed when the open step closes


class Lockstep:
    """The step scheduler. It owns no socket and no engine: it sends through the
    exchange's ordered outbound path and applies inputs with ``Exchange.submit``."""

    def __init__(self, exchange: Exchange, step_ms: int = DEFAULT_STEP_MS,
                 timeout_ms: int = DEFAULT_STEP_TIMEOUT_MS) -> None:
        if step_ms <= 0 or timeout_ms <= 0:
            raise ValueError("step and timeout must be positive")
        self.exchange = exchange
        self.step_us = step_ms * 1000
        self.step_ms = step_ms
        self.timeout_s = timeout_ms / 1000
        clock = exchange.clock
        assert isinstance(clock, SimClock)
        self.clock = clock
        # steps continue after what a recovered journal holds: time never goes back
        self.step = clock.last // self.step_us  # the open step, or the last closed one
        self.running = False
        self.expected: int | None = None  # participants the first join announced
        self.members: dict[str, Member] = {}
        self.done: set[str] = set()  # members that finished the open step
        # due step -> (trader_id, arrival number, command): the canonical order's key
        self.inputs: dict[int, list[tuple[str, int, Any]]] = {}
        self._arrival = itertools.count()
        self.latency = exchange.latency
        self._last_due: dict[str, int] = {}  # trader -> step its latest input is due in
        self.applying = False  # inputs submitted now are applied, not deferred
        self.trades: list[dict[str, Any]] = []  # public trades since the last tick
        self.skips = 0
        self._timer: asyncio.TimerHandle | None = None
        self._idle_flush = False
        self._last_leaderboard = clock.last
        self._last_performance = clock.last

    # ------------------------------------------------------------ inputs

    def defer(self, command: Any) -> bool:
        """Queue a command for its step boundary; False: apply it now (while a step's
        inputs are being applied, or a command no trader sent)."""
        trader_id = getattr(command, "trader_id", None)
        if self.applying or trader_id is None:
            return False
        if self.running:
            due = self.step + self._delay_steps(command)
        elif trader_id in self.members:
            due = self.step + 1 + self._delay_steps(command)  # waits for the first step
        else:
            due = self.step  # the clock stands still: applied at the end of this turn
            self._schedule_idle_flush()
        # a trader's inputs never overtake each other, whatever their delays
        due = max(due, self._last_due.get(trader_id, due))
        self._last_due[trader_id] = due
        self.inputs.setdefault(due, []).append((trader_id, next(self._arrival), command))
        return True

    def _delay_steps(self, command: Any) -> int:
        """Whole steps the latency model holds this input back. A cancel-on-disconnect
        crossed no network: it is not delayed (only kept behind the trader's inputs)."""
        if not self.latency.enabled or (type(command) is CancelAll
                                        and command.reason is CancelReason.DISCONNECT):
            return 0
        return steps_for(self.latency.delay_ns(command.trader_id), self.step_us * 1000)

    def _schedule_idle_flush(self) -> None:
        if not self._idle_flush:
            self._idle_flush = True
            asyncio.get_running_loop().call_soon(self._flush_idle)

    def _flush_idle(self) -> None:
        self._idle_flush = False
        if not self.running and not self.exchange.stopping:
            self._apply_all()

    def _apply_all(self) -> None:
        """The clock stands still: whatever is queued, for any step, is applied now,
        step by step (a latency model may have put inputs past the last step)."""
        for step in sorted(self.inputs):
            self._apply(step)

    def _apply(self, step: int) -> None:
        """Apply the inputs due in ``step`` in canonical order."""
        batch = self.inputs.pop(step, None)
        if not batch:
            return
        batch.sort(key=lambda item: (item[0], item[1]))
        self.applying = True
        try:
            for _trader, _n, command in batch:
                try:
                    self.exchange.submit(command)
                except Exception:  # one bad input must not stall the simulation
                    log.exception("step %d: input %r failed", step, command)
        finally:
            self.applying = False

    def on_trade(self, trade: Trade, seq: int) -> None:
        """A trade printed: the next tick carries it, as the feed would."""
        self.trades.append({
            "type": "trade", "symbol": trade.symbol, "seq": seq, "trade_id": trade.trade_id,
            "price": trade.price, "qty": trade.qty, "aggressor": trade.aggressor.value,
            "buy_trader": trade.buy_trader, "sell_trader": trade.sell_trader,
            "ts": trade.ts})

    # ------------------------------------------------------------ session messages

    @staticmethod
    def request_types() -> tuple[type, ...]:
        return (LockstepJoin, StepDone, LockstepLeave)

    def handlers(self) -> dict[type, Any]:
        return {LockstepJoin: self.join, StepDone: self.step_done,
                LockstepLeave: self.leave}

    def join(self, session: Session, request: LockstepJoin) -> None:
        trader_id = session.trader_id
        assert trader_id is not None
        if trader_id in self.members:
            raise ProtocolError(RejectCode.LOCKSTEP_ALREADY_JOINED,
                                f"{trader_id} has already joined the lockstep")
        if self.expected is not None and request.participants != self.expected:
            raise ProtocolError(RejectCode.LOCKSTEP_PARTICIPANTS_MISMATCH,
                                f"this lockstep runs {self.expected} participants, "
                                f"not {request.participants}")
        self.expected = request.participants
        first = self.step + 1  # a join during a step takes part from the next one
        self.members[trader_id] = Member(trader_id, session.ws, first)
        log.info("lockstep: %s joined (%d of %d), from step %d", trader_id,
                 len(self.members), self.expected, first)
        self._send(session.ws, {"type": "lockstep_joined", "participants": self.expected,
                                "joined": len(self.members), "first_step": first,
                                "step_ms": self.step_ms})
        if not self.running and len(self.members) >= self.expected:
            log.info("lockstep: all %d participants joined; starting at step %d",
                     self.expected, first)
            self.running = True
            self._start_step()

    def step_done(self, session: Session, request: StepDone) -> None:
        member = self._member(session)
        if request.step > self.step or (request.step == self.step and not self.running) \
                or request.step < member.first_step:
            raise ProtocolError(RejectCode.LOCKSTEP_BAD_STEP,
                                f"step {request.step} is not open (the open step is "
                                f"{self.step if self.running else 'none'})")
        if request.step < self.step:
            log.debug("lockstep: %s finished step %d late (now %d)", member.trader_id,
                      request.step, self.step)
            return  # it was skipped; what it sent meanwhile went into the open step
        self.done.add(member.trader_id)
        self._maybe_close()

    def leave(self, session: Session, _request: LockstepLeave) -> None:
        member = self._member(session)
        member.leaving = True
        if not self.running:
            self._remove(member)
            return
        self.done.add(member.trader_id)
        self._maybe_close()

    def _member(self, session: Session) -> Member:
        member = self.members.get(session.trader_id or "")
        if member is None or member.ws is not session.ws:
            raise ProtocolError(RejectCode.LOCKSTEP_NOT_JOINED,
                                "send lockstep_join on this connection first")
        return member

    def session_ended(self, session: Session) -> None:
        """A member's connection closed: stop waiting for it (its cancel-on-disconnect,
        if any, is an input like the others, applied at the next boundary)."""
        member = self.members.get(session.trader_id or "")
        if member is None or member.ws is not session.ws:
            return
        log.info("lockstep: %s disconnected at step %d", member.trader_id, self.step)
        del self.members[member.trader_id]
        self.done.discard(member.trader_id)
        if self.running:
            self._maybe_close()
        elif not self.members:
            self.expected = None

    # ------------------------------------------------------------ steps

    def _waited_for(self) -> list[str]:
        return [t for t, m in self.members.items() if m.first_step <= self.step]

    def _maybe_close(self) -> None:
        if self.running and all(t in self.done for t in self._waited_for()):
            self._close_step()

    def _on_timeout(self, step: int) -> None:
        self._timer = None
        if self.running and self.step == step and not self.exchange.stopping:
            self._close_step()

    def _close_step(self) -> None:
        step = self.step
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for trader_id in self._waited_for():
            if trader_id not in self.done:
                self.skips += 1
                log.warning("lockstep: step %d: %s did not answer within %.0f ms; skipped "
                            "(its late inputs go into the next step)", step, trader_id,
                            self.timeout_s * 1000)
        self._apply(step)
        self._timers_due()
        for member in [m for m in self.members.values() if m.leaving]:
            self._remove(member)
        if not self.members:
            log.info("lockstep: every participant left after step %d; the clock stops",
                     step)
            self.running = False
            self.expected = None
            self._apply_all()
            return
        self._start_step()

    def _remove(self, member: Member) -> None:
        del self.members[member.trader_id]
        self.done.discard(member.trader_id)
        log.info("lockstep: %s left after step %d", member.trader_id, self.step)
        self._send(member.ws, {"type": "lockstep_left", "step": self.step})
        if not self.members and not self.running:
            self.expected = None

    def _timers_due(self) -> None:
        """The exchange's timers run on simulated time: a leaderboard and performance
        rows at the first boundary at or past each interval."""
        server = self.exchange.config.server
        ts = self.clock.last
        leaderboard_us = round(server.leaderboard_interval_s * 1_000_000)
        if ts // leaderboard_us > self._last_leaderboard // leaderboard_us:
            self._last_leaderboard = ts
            self.exchange.publish_leaderboard()
        performance_us = round(server.performance_interval_s * 1_000_000)
        if ts // performance_us > self._last_performance // performance_us:
            self._last_performance = ts
            self.exchange.write_performance()

    def _start_step(self) -> None:
        self._apply(self.step)  # anything queued while the clock stood still
        self.step += 1
        self.done = set()
        ts = self.step * self.step_us
        self.clock.advance_to(ts)
        tick = orjson.dumps({"type": "tick", "step": self.step, "ts": ts,
                             "seq": self.exchange.seq, "trades": self.trades,
                             "books": self._books()})
        self.trades = []
        peers = tuple(m.ws for m in self.members.values())
        self.exchange.send_to_clients(peers, tick)
        self._timer = asyncio.get_running_loop().call_later(
            self.timeout_s, self._on_timeout, self.step)

    def _books(self) -> dict[str, dict[str, list[tuple[int, int]]]]:
        return {symbol: {"bids": book.depth(Side.BUY, TICK_DEPTH),
                         "asks": book.depth(Side.SELL, TICK_DEPTH)}
                for symbol, book in self.exchange.engine.books.items()}

    def _send(self, ws: ServerConnection, message: dict[str, Any]) -> None:
        self.exchange.send_to_clients((ws,), orjson.dumps(message))

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending = sum(len(batch) for batch in self.inputs.values())
        if pending:
            log.info("lockstep: %d queued inputs not applied at shutdown", pending)
        log.info("lockstep: stopped at step %d (ts %d), %d skips", self.step, self.clock.last,
                 self.skips)
