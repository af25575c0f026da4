"""End-to-end: opening and closing markets through the trusted event stream, and the
``exchange_admin.py`` command that does it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.stack import (
    Client,
    connected,
    logged_in,
    run_to_exit,
    running_exchange,
    running_relay,
)


def order(cid: str, side: str, price: int, qty: int = 1) -> dict[str, Any]:
    return {"type": "new_order", "client_order_id": cid, "side": side, "price": price,
            "qty": qty}


async def admin(stream: Client, message: dict[str, Any]) -> dict[str, Any]:
    """Send an admin message; the answer to it (events may come first)."""
    await stream.send(message)
    return await stream.recv_until(
        lambda m: isinstance(m, dict) and m.get("type") in ("admin_ack", "error"))


async def test_a_closed_market_refuses_orders_and_amends_but_not_cancels(
        tmp_path: Path) -> None:
    async with running_exchange(tmp_path) as ex, \
            connected(ex.uris["events"]) as stream, \
            logged_in(ex.uris["gateway"], "alice") as alice:
        await stream.recv()  # snapshot
        await alice.send(order("a1", "buy", 9_990))
        await alice.recv_type("order_ack")
        ack = await admin(stream, {"type": "set_market_open", "symbol": "SIM",
                                   "is_open": False})
        assert ack["market_open"] == {"SIM": False}
        await alice.send(order("a2", "buy", 9_980))
        reject = await alice.recv_type("order_reject")
        assert (reject["client_order_id"], reject["code"]) == ("a2", "MARKET_CLOSED")
        await alice.send({"type": "amend_order", "client_order_id": "a1", "qty": 2})
        assert (await alice.recv_type("amend_reject"))["code"] == "MARKET_CLOSED"
        await alice.send({"type": "cancel_order", "client_order_id": "a1"})
        assert (await alice.recv_type("order_canceled"))["client_order_id"] == "a1"
        ack = await admin(stream, {"type": "set_market_open", "is_open": True})
        assert ack["market_open"] == {"SIM": True}
        await alice.send(order("a3", "buy", 9_980))
        assert (await alice.recv_type("order_ack"))["client_order_id"] == "a3"


async def test_a_halt_is_a_sequenced_journaled_input(tmp_path: Path) -> None:
    async with running_exchange(tmp_path) as ex, \
            connected(ex.uris["events"]) as stream, \
            connected(ex.uris["events"]) as watcher:
        first = await stream.recv()
        await watcher.recv()
        await admin(stream, {"type": "set_market_open", "symbol": "SIM", "is_open": False})
        event = await watcher.recv_type("market_status_changed")
        assert (event["symbol"], event["is_open"], event["seq"]) == (
            "SIM", False, first["seq"] + 1)
    async with running_exchange(tmp_path) as again, connected(again.uris["events"]) as stream:
        assert (await stream.recv())["market_open"] == {"SIM": False}  # recovered


async def test_the_feed_announces_a_halt_to_subscribers_old_and_new(tmp_path: Path) -> None:
    def is_status(message: dict[str, Any]) -> bool:
        return message.get("type") == "market_status"

    async with running_exchange(tmp_path) as ex, running_relay(ex.uris["events"]) as relay, \
            connected(relay.uris["feed"]) as early, connected(ex.uris["events"]) as stream:
        await early.recv_type("book_snapshot")
        await stream.recv()
        ack = await admin(stream, {"type": "set_market_open", "symbol": "SIM",
                                   "is_open": False})
        closed = await early.recv_until(is_status)
        assert closed == {"type": "market_status", "symbol": "SIM", "seq": ack["seq"],
                          "is_open": False}
        async with connected(relay.uris["feed"]) as late:
            snapshot = await late.recv_type("book_snapshot")
            status = await late.recv()  # right after the book it qualifies
            assert status == {"type": "market_status", "symbol": "SIM",
                              "seq": snapshot["seq"], "is_open": False}
        await admin(stream, {"type": "set_market_open", "is_open": True})
        reopened = await early.recv_until(is_status)
        assert (reopened["symbol"], reopened["is_open"]) == ("SIM", True)


@pytest.mark.parametrize(("frame", "code"), [
    ("not json", "BAD_JSON"),
    ('{"type": "new_order"}', "UNKNOWN_TYPE"),
    ('{"type": "set_market_open", "symbol": "SIM"}', "INVALID_FIELD"),
    ('{"type": "set_market_open", "is_open": "no"}', "INVALID_FIELD"),
    ('{"type": "set_market_open", "symbol": "NOPE", "is_open": false}', "UNKNOWN_SYMBOL"),
])
async def test_a_bad_admin_message_gets_an_error_and_changes_nothing(
        tmp_path: Path, frame: str, code: str) -> None:
    async with running_exchange(tmp_path) as ex, connected(ex.uris["events"]) as stream:
        before = await stream.recv()
        await stream.send(frame)
        error = await stream.recv()
        assert error["type"] == "error" and error["code"] == code, error
        # nothing was sequenced, and the connection still works
        ack = await admin(stream, {"type": "set_market_open", "is_open": True})
        assert ack == {"type": "admin_ack", "seq": before["seq"], "market_open": {"SIM": True}}


async def test_the_admin_command_closes_and_names_a_bad_symbol(tmp_path: Path) -> None:
    async with running_exchange(tmp_path) as ex:
        uri = ex.uris["events"]
        code, out, err = await run_to_exit("exchange_admin.py", "close", "SIM",
                                           "--exchange-uri", uri, timeout=30)
        assert (code, out) == (0, "SIM: closed\n"), err
        code, out, err = await run_to_exit("exchange_admin.py", "open", "--exchange-uri", uri,
                                           timeout=30)
        assert (code, out) == (0, "SIM: open\n"), err
        code, _, err = await run_to_exit("exchange_admin.py", "close", "NOPE",
                                         "--exchange-uri", uri, timeout=30)
        assert code == 1 and "UNKNOWN_SYMBOL" in err and "NOPE" in err
    code, _, err = await run_to_exit("exchange_admin.py", "close", "--exchange-uri",
                                     "ws://127.0.0.1:1", "--timeout", "2", timeout=30)
    assert code == 1 and "cannot reach the exchange" in err
