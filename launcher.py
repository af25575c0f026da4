"""Start OpenMarketSim server processes and stop them cleanly.

``stop_on_signals`` is the other half: every process uses it to turn SIGINT/SIGTERM
into a clean shutdown, on Windows too.

Every server announces the URIs it bound on one stdout line,
``READY {"gateway": "ws://...", ...}``; ``start_server`` waits for that line (bounded)
and then keeps draining the process's output so it can never block on a full pipe.
Used by ``demo.py`` and by the end-to-end tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0


@dataclass
class ServerProcess:
    name: str
    proc: asyncio.subprocess.Process
    uris: dict[str, str] = field(default_factory=dict)
    stderr_lines: list[str] = field(default_factory=list)
    _drains: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def stderr_text(self) -> str:
        return "".join(self.stderr_lines)

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        code = await stop_process(self.proc, sig)
        for task in self._drains:
            with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                await asyncio.wait_for(task, STOP_TIMEOUT_S)
        return code


def python_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child: unbuffered, with the project on its import path."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


async def _drain(stream: asyncio.StreamReader | None, sink: list[str],
                 log: IO[str] | None) -> None:
    if stream is None:
        return
    while line := await stream.readline():
        text = line.decode(errors="replace")
        sink.append(text)
        if log is not None:
            log.write(text)
            log.flush()


async def _read_ready(proc: asyncio.subprocess.Process) -> dict[str, str]:
    assert proc.stdout is not None
    while True:
        raw = await proc.stdout.readline()
        if not raw:
            raise RuntimeError(f"exited with code {await proc.wait()} before it was ready")
        line = raw.decode()
        if line.startswith("READY "):
            return json.loads(line[len("READY "):])


async def start_server(script: str, *args: str, log: IO[str] | None = None,
                       cwd: Path | None = None,
                       env: dict[str, str] | None = None) -> ServerProcess:
    """Run ``python ROOT/script args`` and return once it printed its READY line.

    stderr (and stdout after READY) is kept in memory and copied to ``log`` if given.
    Raises ``RuntimeError`` with the server's stderr if it exits or hangs first.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / script), *args, cwd=cwd or ROOT, env=python_env(env),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    server = ServerProcess(script, proc)
    server._drains.append(asyncio.create_task(_drain(proc.stderr, server.stderr_lines, log)))
    try:
        server.uris = await asyncio.wait_for(_read_ready(proc), READY_TIMEOUT_S)
    except (asyncio.TimeoutError, RuntimeError) as exc:
        await server.stop()
        reason = "did not become ready in time" if isinstance(exc, asyncio.TimeoutError) \
            else str(exc)
        raise RuntimeError(f"{script} {reason}; its stderr:\n{server.stderr_text}") from None
    server._drains.append(asyncio.create_task(_drain(proc.stdout, server.stderr_lines, log)))
    return server


async def stop_process(proc: asyncio.subprocess.Process, sig: int = signal.SIGTERM) -> int:
    """Ask a process to stop, kill it if it has not within ``STOP_TIMEOUT_S``."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    return proc.returncode  # type: ignore[return-value]


def stop_on_signals(stop: asyncio.Event) -> None:
    """Set ``stop`` on SIGINT or SIGTERM. asyncio has no signal handlers on Windows;
    there the plain ``signal`` module hands the signal to the loop instead."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except NotImplementedError:
            signal.signal(sig, lambda _sig, _frame: loop.call_soon_threadsafe(stop.set))


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when it is installed (it is optional: a faster event loop
    for processes that live in their sockets), else on plain asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
