"""End-to-end: bad input, authentication, oversize frames and too-slow clients at the
gateway of the real exchange process. Bad input gets an ``error`` with a stable code and
the connection keeps working."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from tests.stack import Client, connected, logged_in, running_exchange

LONG_ORDER = {"type": "new_order", "client_order_id": "x1", "side": "buy", "qty": 1,
              "price": 10000}

MALFORMED: list[tuple[str | bytes | dict[str, Any], str, Any]] = [
    ("{not json", "BAD_JSON", None),
    ("", "BAD_JSON", None),
    ("[1, 2]", "BAD_JSON", None),
    ('"just a string"', "BAD_JSON", None),
    ("42", "BAD_JSON", None),
    (b'{"type": "ping"}', "BAD_JSON", None),  # binary frames are refused
    ({"type": "fly_to_moon"}, "UNKNOWN_TYPE", None),
    ({"no_type": 1}, "UNKNOWN_TYPE", None),
    ({"type": 7}, "UNKNOWN_TYPE", None),
    ({**LONG_ORDER, "qty": "5"}, "INVALID_FIELD", "x1"),
    ({**LONG_ORDER, "qty": 0}, "INVALID_FIELD", "x1"),
    ({**LONG_ORDER, "qty": True}, "INVALID_FIELD", "x1"),
    ({**LONG_ORDER, "price": 100.5}, "INVALID_FIELD", "x1"),
    ({**LONG_ORDER, "side": "sideways"}, "INVALID_FIELD", "x1"),
    ({**LONG_ORDER, "tif": "forever"}, "INVALID_FIELD", "x1"),
    ({**LONG_ORDER, "post_only": "yes"}, "INVALID_FIELD", "x1"),
    ({k: v for k, v in LONG_ORDER.items() if k != "price"}, "INVALID_FIELD", "x1"),
    ({k: v for k, v in LONG_ORDER.items() if k != "client_order_id"}, "INVALID_FIELD", None),
    ({"type": "cancel_order"}, "INVALID_FIELD", None),
    ({"type": "amend_order", "order_id": 3}, "INVALID_FIELD", 3),
    ({"type": "login", "trader_id": "again"}, "ALREADY_LOGGED_IN", None),
]


async def test_every_malformed_frame_gets_an_error_and_the_session_keeps_working(
        tmp_path: Path) -> None:
    async with running_exchange(tmp_path) as ex, \
            logged_in(ex.uris["gateway"], "alice") as alice:
        for frame, code, ref in MALFORMED:
            await alice.send(frame)
            error = await alice.recv()
            assert error["type"] == "error", (frame, error)
            assert (error["code"], error["ref"]) == (code, ref), (frame, error)
            assert error["message"], frame
            await alice.send({"type": "ping"})
            assert await alice.recv() == {"type": "pong"}, frame
        # nothing was applied: no order exists
        await alice.send({"type": "get_open_orders"})
        assert (await alice.recv())["orders"] == []
        await alice.send(LONG_ORDER)
        assert (await alice.recv())["type"] == "order_ack"


async def test_requests_before_login_are_refused(tmp_path: Path) -> None:
    async with running_exchange(tmp_path) as ex, connected(ex.uris["gateway"]) as client:
        await client.send(LONG_ORDER)
        error = await client.recv()
        assert (error["type"], error["code"], error["ref"]) == ("error", "NOT_LOGGED_IN", "x1")
        await client.send({"type": "get_position"})
        assert (await client.recv())["code"] == "NOT_LOGGED_IN"
        await client.send({"type": "ping"})
        assert await client.recv() == {"type": "pong"}
        await client.send({"type": "login", "trader_id": "bad id!"})
        assert (await client.recv())["code"] == "INVALID_FIELD"
        await client.send({"type": "login", "trader_id": "x" * 33})
        assert (await client.recv())["code"] == "INVALID_FIELD"
        await client.send({"type": "login", "trader_id": "alice"})
        ack = await client.recv()
        assert ack["type"] == "login_ack" and ack["trader_id"] == "alice"
        assert ack["protocol_version"] == 1
        assert ack["instruments"] == [{"symbol": "SIM", "tick_size": 0.01, "lot_size": 1}]
        assert ack["limits"]["max_order_qty"] == 1000


async def test_unknown_symbol_is_refused(tmp_path: Path) -> None:
    async with running_exchange(tmp_path) as ex, \
            logged_in(ex.uris["gateway"], "alice") as alice:
        await alice.send({**LONG_ORDER, "symbol": "NOPE"})
        reject = await alice.recv()
        assert (reject["type"], reject["code"]) == ("order_reject", "UNKNOWN_SYMBOL")
        await alice.send({"type": "get_open_orders", "symbol": "NOPE"})
        assert (await alice.recv())["code"] == "UNKNOWN_SYMBOL"
        await alice.send({"type": "cancel_all", "symbol": "NOPE"})
        assert (await alice.recv())["code"] == "UNKNOWN_SYMBOL"


async def test_accounts_file_requires_the_right_token(tmp_path: Path) -> None:
    accounts = tmp_path / "accounts.json"
    accounts.write_text(json.dumps({"alice": "s3cret"}))
    async with running_exchange(tmp_path, "--accounts", str(accounts)) as ex, \
            connected(ex.uris["gateway"]) as client:
        for login in ({"trader_id": "alice", "token": "wrong"}, {"trader_id": "alice"},
                      {"trader_id": "eve", "token": "s3cret"}):
            await client.send({"type": "login", **login})
            error = await client.recv()
            assert (error["type"], error["code"]) == ("error", "AUTH_FAILED"), login
        await client.send(LONG_ORDER)
        assert (await client.recv())["code"] == "NOT_LOGGED_IN"
        await client.send({"type": "login", "trader_id": "alice", "token": "s3cret"})
        assert (await client.recv())["type"] == "login_ack"
        async with logged_in(ex.uris["gateway"], "alice", token="s3cret") as again:
            await again.send({"type": "ping"})
            assert await again.recv() == {"type": "pong"}


async def test_oversize_frame_closes_with_1009_and_the_exchange_lives_on(
        tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"server": {"max_message_bytes": 1024}}))
    async with running_exchange(tmp_path, "--config", str(config)) as ex:
        async with logged_in(ex.uris["gateway"], "alice") as alice:
            await alice.send({"type": "ping", "pad": "x" * 900})  # under the limit: fine
            assert await alice.recv() == {"type": "pong"}
            await alice.send({"type": "ping", "pad": "x" * 2000})
            with pytest.raises(ConnectionClosed) as closed:
                await alice.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        async with logged_in(ex.uris["gateway"], "bob") as bob:
            await bob.send({"type": "ping"})
            assert await bob.recv() == {"type": "pong"}


async def test_abrupt_disconnect_does_not_hurt_the_exchange(tmp_path: Path) -> None:
    async with running_exchange(tmp_path) as ex:
        async with logged_in(ex.uris["gateway"], "alice") as alice:
            await alice.send(LONG_ORDER)
            await alice.recv_type("order_ack")
            alice.ws.transport.abort()  # a crash: no close frame, a reset socket
        async with logged_in(ex.uris["gateway"], "bob") as bob:
            await bob.send({"type": "ping"})
            assert await bob.recv() == {"type": "pong"}
        assert ex.proc.returncode is None


async def test_a_client_that_does_not_read_is_closed_as_too_slow(tmp_path: Path) -> None:
    async with running_exchange(tmp_path, "--client-buffer", "65536") as ex, \
            logged_in(ex.uris["gateway"], "watcher") as watcher:
        host, port = ex.uris["gateway"].removeprefix("ws://").rsplit(":", 1)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # little kernel slack
        sock.connect((host, int(port)))
        sock.setblocking(False)
        async with websockets.connect(ex.uris["gateway"], sock=sock, compression=None,
                                      max_queue=4) as ws:
            slow = Client(ws)
            await slow.send({"type": "login", "trader_id": "slow"})
            assert (await slow.recv())["type"] == "login_ack"
            for i in range(100):
                await slow.send({**LONG_ORDER, "client_order_id": f"o{i}", "price": 9900 + i})
            # ~25 KB answers, never read while asking: far more than the 64 KiB allowed
            with contextlib.suppress(ConnectionClosed):
                for _ in range(800):
                    await slow.send({"type": "get_open_orders"})
            closed = await asyncio.wait_for(drain_until_closed(slow), 30)
        assert (closed.code, closed.reason) == (1008, "too slow")
        await watcher.send({"type": "ping"})
        assert await watcher.recv() == {"type": "pong"}


async def drain_until_closed(client: Client) -> Any:
    try:
        while True:
            await client.ws.recv()
    except ConnectionClosed as exc:
        return exc.rcvd
