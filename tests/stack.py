"""Start the real OpenMarketSim processes for end-to-end tests, and always stop them.

Servers are started with ``--port 0`` (and ``--events-port 0``), so the OS picks free
ports; each server announces what it bound on one stdout line,
``READY {"gateway": "ws://...", ...}``, which ``running_process`` waits for.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import websockets

from launcher import ROOT, ServerProcess, python_env, start_server, stop_process

__all__ = ["ROOT", "Client", "ServerProcess", "connected", "logged_in", "run_to_exit",
           "running_exchange", "running_process", "running_relay", "stop_process"]

RECV_TIMEOUT_S = 5.0


@contextlib.asynccontextmanager
async def running_process(script: str, *args: str, cwd: Path | None = None,
                          env: dict[str, str] | None = None) -> AsyncIterator[ServerProcess]:
    """Run ``python <ROOT/script> <args>`` until it prints READY; always stop it after."""
    server = await start_server(script, *args, cwd=cwd, env=env)
    try:
        yield server
    finally:
        await server.stop()


async def run_to_exit(script: str, *args: str, timeout: float, cwd: Path = ROOT,
                      pythonpath: Path | None = None) -> tuple[int, str, str]:
    """``python <ROOT/script> <args>`` to its exit (stopped if it is still running after
    ``timeout`` seconds): exit code, stdout, stderr. ``pythonpath`` is importable too."""
    env = python_env({"PYTHONPATH": str(pythonpath)} if pythonpath is not None else None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / script), *args, cwd=cwd, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        await stop_process(proc)
    return proc.returncode or 0, out.decode(), err.decode()


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
