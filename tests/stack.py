"""Start the real OpenMarketSim processes for end-to-end tests, and always stop them.

Servers are started with ``--port 0`` (and ``--events-port 0``), so the OS picks free
ports; each server announces what it bound on one stdout line,
``READY {"gateway": "ws://...", ...}``, which ``running_process`` waits for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import websockets

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
RECV_TIMEOUT_S = 5.0


@dataclass
class ServerProcess:
    proc: asyncio.subprocess.Process
    uris: dict[str, str]
    stderr_lines: list[str] = field(default_factory=list)

    @property
    def stderr_text(self) -> str:
        return "".join(self.stderr_lines)


async def _drain(stream: asyncio.StreamReader | None, sink: list[str]) -> None:
    # Keep reading so a chatty server never blocks on a full pipe.
    if stream is None:
        return
    while line := await stream.readline():
        sink.append(line.decode(errors="replace"))


async def stop_process(proc: asyncio.subprocess.Process, sig: int = signal.SIGTERM) -> int:
    """Ask a process to stop (SIGTERM), kill it if it does not; returns its exit code."""
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


@contextlib.asynccontextmanager
async def running_process(script: str, *args: str, cwd: Path | None = None,
                          env: dict[str, str] | None = None) -> AsyncIterator[ServerProcess]:
    """Run ``python <ROOT/script> <args>`` until it prints READY; stop it afterwards."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), full_env.get("PYTHONPATH")]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / script), *args, cwd=cwd or ROOT, env=full_env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    server = ServerProcess(proc, {})
    stderr_task = asyncio.create_task(_drain(proc.stderr, server.stderr_lines))
    stdout_lines: list[str] = []
    stdout_task: asyncio.Task[None] | None = None
    try:
        server.uris = await asyncio.wait_for(_read_ready(proc, stdout_lines), READY_TIMEOUT_S)
        stdout_task = asyncio.create_task(_drain(proc.stdout, stdout_lines))
        yield server
    except (asyncio.TimeoutError, EOFError) as exc:
        await stop_process(proc)
        await stderr_task
        raise RuntimeError(f"{script} did not become ready ({exc!r}); stderr:\n"
                           f"{server.stderr_text}") from None
    finally:
        await stop_process(proc)
        for task in (stderr_task, stdout_task):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait_for(task, STOP_TIMEOUT_S)


async def _read_ready(proc: asyncio.subprocess.Process, lines: list[str]) -> dict[str, str]:
    assert proc.stdout is not None
    while True:
        raw = await proc.stdout.readline()
        if not raw:
            raise EOFError(f"exited with {await proc.wait()} before READY")
        line = raw.decode()
        lines.append(line)
        if line.startswith("READY "):
            return json.loads(line[len("READY "):])


def running_exchange(data_dir: Path, *args: str) -> contextlib.AbstractAsyncContextManager[
        ServerProcess]:
    return running_process("exchange_server.py", "--port", "0", "--events-port", "0",
                           "--data-dir", str(data_dir), *args)


def running_relay(exchange_events_uri: str, *args: str) -> contextlib.AbstractAsyncContextManager[
        ServerProcess]:
    return running_process("market_data_server.py", "--port", "0",
                           "--exchange-uri", exchange_events_uri, *args)


class Client:
    """A thin test client: send dicts, receive dicts, every wait bounded."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        await self.ws.send(message if isinstance(message, (str, bytes))
                           else orjson.dumps(message).decode())

    async def recv(self, timeout: float = RECV_TIMEOUT_S) -> Any:
        return orjson.loads(await asyncio.wait_for(self.ws.recv(), timeout))

    async def recv_until(self, predicate: Any, timeout: float = RECV_TIMEOUT_S) -> Any:
        """Receive until a message matches ``predicate``; return it (others are skipped)."""
        async def scan() -> Any:
            while True:
                message = orjson.loads(await self.ws.recv())
                if predicate(message):
                    return message
        return await asyncio.wait_for(scan(), timeout)

    async def recv_type(self, kind: str, timeout: float = RECV_TIMEOUT_S) -> Any:
        return await self.recv_until(
            lambda m: isinstance(m, dict) and m.get("type") == kind, timeout)

    async def close(self) -> None:
        await self.ws.close()


@contextlib.asynccontextmanager
async def connected(uri: str) -> AsyncIterator[Client]:
    async with websockets.connect(uri, compression=None, open_timeout=RECV_TIMEOUT_S) as ws:
        yield Client(ws)


@contextlib.asynccontextmanager
async def logged_in(uri: str, trader_id: str, token: str | None = None) -> AsyncIterator[Client]:
    """A gateway session already past ``login_ack``."""
    async with connected(uri) as client:
        login: dict[str, Any] = {"type": "login", "trader_id": trader_id}
        if token is not None:
            login["token"] = token
        await client.send(login)
        ack = await client.recv()
        assert ack["type"] == "login_ack", ack
        yield client
