"""The seeded latency model: how long each trader's inputs take to reach the sequencer.

Pure (no clock, no I/O): the gateway asks ``LatencyModel.stream(trader_id)`` once per
login and draws one delay per input from it; a lockstep runner turns a delay into a
number of steps with ``steps_for``. Each trader gets its own random stream, seeded from
``(latency.seed, trader_id)`` through SHA-256, so a trader's delays are the same in every
run with the same seed whatever the other traders do or the order they connect in.

Only ``random.Random.random()`` is used: it is the one method whose sequence Python
promises to keep across versions for the same seed, so the uniform and normal draws are
built on it here rather than on ``uniform``/``normalvariate``.
"""

from __future__ import annotations

import hashlib
import math
import random
from fnmatch import fnmatchcase

from config import LatencyConfig, LatencyProfile

NS_PER_MS = 1_000_000

__all__ = ["NS_PER_MS", "DelayStream", "LatencyModel", "steps_for", "stream_seed"]


def stream_seed(seed: int, trader_id: str) -> int:
    """A 64-bit seed for one trader's stream: stable across runs, processes, versions
    (never ``hash()``, which is salted per process for strings)."""
    digest = hashlib.sha256(f"{seed}\x00{trader_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _ns(ms: float) -> int:
    return max(0, round(ms * NS_PER_MS))


class DelayStream:
    """One trader's sequence of delays, in whole nanoseconds, never negative."""

    __slots__ = ("_rng", "profile")

    def __init__(self, profile: LatencyProfile, seed: int, trader_id: str) -> None:
        self.profile = profile
        self._rng = random.Random(stream_seed(seed, trader_id))

    def next_ns(self) -> int:
        profile = self.profile
        if profile.model == "fixed":
            return _ns(profile.ms or 0.0)
        u = self._rng.random()
        if profile.model == "uniform":
            low, high = profile.low_ms or 0.0, profile.high_ms or 0.0
            return _ns(low + (high - low) * u)
        # normal, by Box-Muller from two uniforms; 1 - u is in (0, 1], so log() is defined
        z = math.sqrt(-2.0 * math.log(1.0 - u)) * math.cos(2.0 * math.pi * self._rng.random())
        return _ns((profile.mean_ms or 0.0) + (profile.stdev_ms or 0.0) * z)  # clamped at 0


def _always_zero(profile: LatencyProfile) -> bool:
    params = (profile.ms, profile.low_ms, profile.high_ms, profile.mean_ms, profile.stdev_ms)
    return all(not value for value in params)


class LatencyModel:
    """The ``latency`` section made usable: profile lookup by trader id (glob patterns,
    the first matching profile wins) and one cached ``DelayStream`` per trader."""

    def __init__(self, config: LatencyConfig) -> None:
        self.config = config
        self._streams: dict[str, DelayStream | None] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.config.profiles)

    def profile_for(self, trader_id: str) -> LatencyProfile | None:
        for profile in self.config.profiles:
            if any(fnmatchcase(trader_id, pattern) for pattern in profile.traders):
                return profile
        return None

    def stream(self, trader_id: str) -> DelayStream | None:
        """The trader's delay stream, or ``None`` if its inputs are never delayed (no
        profile matches, or the first match is always 0 ms): those take the direct path.
        All of a trader's connections share the one stream."""
        try:
            return self._streams[trader_id]
        except KeyError:
            pass
        profile = self.profile_for(trader_id)
        stream = None
        if profile is not None and not _always_zero(profile):
            stream = DelayStream(profile, self.config.seed, trader_id)
        self._streams[trader_id] = stream
        return stream

    def delay_ns(self, trader_id: str) -> int:
        """Draw the trader's next delay (0 without a profile)."""
        stream = self.stream(trader_id)
        return 0 if stream is None else stream.next_ns()


def steps_for(delay_ns: int, step_ns: int) -> int:
    """Lockstep: how many steps later an input delayed ``delay_ns`` lands (rounded up, so
    any positive delay is at least one step; 0 lands in the current step)."""
    if step_ns <= 0:
        raise ValueError(f"step_ns must be positive, got {step_ns}")
    if delay_ns <= 0:
        return 0
    return -(-delay_ns // step_ns)
