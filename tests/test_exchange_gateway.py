"""End-to-end: the order gateway of the real exchange process, over real WebSockets.

Each test starts its own ``exchange_server.py`` on free ports and talks to it as traders
would. Defaults: one symbol SIM, tick 0.01, reference price 10000, taker fee 1 bp.
"""

from __future__ import annotations

import csv
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from tests.stack import Client, logged_in, running_exchange


def order(cid: str, side: str, qty: int, price: int | None = None, **extra: Any) -> dict:
    message = {"type": "new_order", "client_order_id": cid, "side": side, "qty": qty, **extra}
    if price is not None:
        message["price"] = price
    return message


async def place(client: Client, message: dict) -> dict:
    """Send an order and return its ``order_ack``."""
    await client.send(message)
    ack = await client.recv_type("order_ack")
    assert ack["client_order_id"] == message["client_order_id"]
    return ack


async def next_types(client: Client, n: int) -> list[dict]:
    return [await client.recv() for _ in range(n)]


async def assert_quiet(client: Client) -> None:
    """Nothing is queued for ``client``: a ping's pong is the very next message."""
    await client.send({"type": "ping"})
    assert await client.recv() == {"type": "pong"}


def iso(ts_us: int) -> str:
    moment = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=ts_us)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def test_cross_sends_ack_fills_positions_and_writes_the_trade(tmp_path: Path) -> None:
    async with running_exchange(tmp_path) as ex, \
            logged_in(ex.uris["gateway"], "alice") as alice, \
            logged_in(ex.uris["gateway"], "bob") as bob:
        sell_ack = await place(alice, order("a1", "sell", 5, 10012))
        assert sell_ack["leaves_qty"] == 5 and sell_ack["order_type"] == "limit"
        await bob.send(order("b1", "buy", 3, 10020))
        ack, fill, position = await next_types(bob, 3)
        assert [ack["type"], fill["type"], position["type"]] == ["order_ack", "fill", "position"]
        assert fill["seq"] > ack["seq"]
        assert {k: fill[k] for k in ("order_id", "client_order_id", "side", "price", "qty",
                                     "leaves_qty", "liquidity", "symbol")} == {
            "order_id": ack["order_id"], "client_order_id": "b1", "side": "buy",
            "price": 10012, "qty": 3, "leaves_qty": 0, "liquidity": "taker", "symbol": "SIM"}
        assert fill["fee"] == 0.030036  # 1 bp of 3 x 100.12
        assert position["position"] == 3 and position["avg_price"] == 10012
        assert position["cash"] == 999699.609964 and position["status"] == "ok"
        maker_fill, maker_position = await next_types(alice, 2)
        assert maker_fill["type"] == "fill" and maker_fill["liquidity"] == "maker"
        assert maker_fill["trade_id"] == fill["trade_id"] and maker_fill["seq"] == fill["seq"]
        assert maker_fill["order_id"] == sell_ack["order_id"] and maker_fill["leaves_qty"] == 2
        assert maker_fill["fee"] == 0.0
        assert maker_position["position"] == -3 and maker_position["cash"] == 1000300.36
        # the row was flushed before the fill was sent
        with open(tmp_path / "trades.csv", newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["timestamp", "price", "qty", "buy_trader", "sell_trader", "symbol",
                           "trade_id", "aggressor", "buy_order_id", "sell_order_id", "seq"]
        assert rows[1:] == [[iso(fill["ts"]), "100.12", "3", "bob", "alice", "SIM",
                             str(fill["trade_id"]), "buy", str(ack["order_id"]),
                             str(sell_ack["order_id"]), str(fill["seq"])]]


async def test_price_time_priority_and_trade_at_resting_price(tmp_path: Path) -> None:
    async with running_exchange(tmp_path) as ex, \
            logged_in(ex.uris["gateway"], "alice") as alice, \
            logged_in(ex.uris["gateway"], "carol") as carol, \
            logged_in(ex.uris["gateway"], "bob") as bob:
        await place(carol, order("c1", "sell", 2, 10010))
        await place(alice, order("a1", "sell", 2, 10010))
        await place(alice, order("a2", "sell", 2, 10005))  # better price, later
        await bob.send(order("b1", "buy", 5, 10050))
        fills = [await bob.recv_type("fill") for _ in range(3)]
        assert [(f["price"], f["qty"]) for f in fills] == [(10005, 2), (10010, 2), (10010, 1)]
        carol_fill = await carol.recv_type("fill")
        assert carol_fill["qty"] == 2 and carol_fill["trade_id"] == fills[1]["trade_id"]
        alice_fills = [await alice.recv_type("fill") for _ in range(2)]
        assert [f["client_order_id"] for f in alice_fills] == ["a2", "a1"]
        assert alice_fills[1]["leaves_qty"] == 1


async def test_market_and_ioc_fill_what_they_can_and_cancel_the_rest(tmp_path: Path) -> None:
    async with running_exchange(tmp_path) as ex, \
            logged_in(ex.uris["gateway"], "alice") as alice, \
            logged_in(ex.uris["gateway"], "bob") as bob:
        await place(alice, order("a1", "sell", 3, 10000))
        await bob.send(order("m1", "buy", 5, order_type="market"))
        ack, fill, _position, canceled = await next_types(bob, 4)
        assert ack["order_type"] == "market" and ack["tif"] == "ioc" and ack["price"] is None
        assert fill["qty"] == 3 and fill["price"] == 10000
        assert canceled["type"] == "order_canceled"
        assert (canceled["canceled_qty"], canceled["reason"]) == (2, "ioc")
        await place(alice, order("a2", "sell", 1, 10000))
        await bob.send(order("i1", "buy", 4, 10000, tif="ioc"))
        _ack, fill, _position, canceled = await next_types(bob, 4)
        assert fill["qty"] == 1
        assert (canceled["canceled_qty"], canceled["reason"]) == (3, "ioc")
        await bob.send({"type": "get_open_orders"})
        assert (await bob.recv_type("open_orders"))["orders"] == []


async def test_fok_fills_completely_or_not_at_all(tmp_path: Path) -> None:
    async with running_exchange(tmp_path) as ex, \
            logged_in(ex.uris["gateway"], "alice") as alice, \
            logged_in(ex.uris["gateway"], "bob") as bob:
        await place(alice, order("a1", "sell", 3, 10000))
        await bob.send(order("f1", "buy", 5, 10000, tif="fok"))
        _ack, canceled = await next_types(bob, 2)
        assert canceled["type"] == "order_canceled"
        assert (canceled["canceled_qty"], canceled["reason"]) == (5, "fok")
        await alice.send({"type": "get_open_orders"})
        (resting,) = (await alice.recv_type("open_orders"))["orders"]
        assert resting["leaves_qty"] == 3  # untouched
        await bob.send(order("f2", "buy", 3, 10000, tif="fok"))
        _ack, fill = await next_types(bob, 2)
        assert fill["type"] == "fill" and fill["qty"] == 3 and fill["leaves_qty"] == 0


async def test_post_only_rests_or_is_rejected_when_it_would_cross(tmp_path: Path) -> None:
    async with running_exchange(tmp_path) as ex, \
            logged_in(ex.uris["gateway"], "alice") as alice, \
            logged_in(ex.uris["gateway"], "bob") as bob:
        await place(alice, order("a1", "sell", 1, 10010))
        await bob.send(order("p1", "buy", 1, 10010, post_only=True))
        reject = await bob.recv()
        assert reject["type"] == "order_reject" and reject["client_order_id"] == "p1"
        assert reject["code"] == "POST_ONLY_WOULD_CROSS"
        ack = await place(bob, order("p2", "buy", 1, 10009, post_only=True))
        assert ack["post_only"] is True
        await assert_quiet(alice)  # nothing traded


async def test_stop_and_stop_limit_trigger_on_a_print(tmp_path: Path) -> None:
    async with running_exchange(tmp_path) as ex, \
            logged_in(ex.uris["gateway"], "alice") as alice, \
            logged_in(ex.uris["gateway"], "bob") as bob, \
            logged_in(ex.uris["gateway"], "carol") as carol:
        await place(alice, order("a1", "sell", 3, 10020))
        stop = await place(bob, order("s1", "buy", 1, order_type="stop", stop_price=10020))
        stop_limit = await place(bob, order("s2", "buy", 1, 10020, order_type="stop_limit",
                                            stop_price=10020))
        assert stop["stop_price"] == 10020 and stop_limit["order_type"] == "stop_limit"
        await bob.send({"type": "get_open_orders"})
        waiting = (await bob.recv_type("open_orders"))["orders"]
        assert [o["status"] for o in waiting] == ["pending_trigger", "pending_trigger"]
        await place(carol, order("c1", "buy", 1, 10020))  # prints at 10020
        for expected in ("s1", "s2"):
            triggered = await bob.recv_type("order_triggered")
            assert triggered["client_order_id"] == expected
            fill = await bob.recv()
            assert fill["type"] == "fill" and fill["client_order_id"] == expected
            assert fill["price"] == 10020 and fill["seq"] > triggered["seq"]
        await bob.send({"type": "get_open_orders"})
        assert (await bob.recv_type("open_orders"))["orders"] == []


async def test_amend_down_keeps_priority_and_up_loses_it(tmp_path: Path) -> None:
    async with running_exchange(tmp_path) as ex, \
            logged_in(ex.uris["gateway"], "alice") as alice, \
            logged_in(ex.uris["gateway"], "carol") as carol, \
            logged_in(ex.uris["gateway"], "bob") as bob:
        a1 = await place(alice, order("a1", "buy", 5, 9990))
        await place(carol, order("c1", "buy", 5, 9990))
        await alice.send({"type": "amend_order", "order_id": a1["order_id"], "qty": 3})
        amended = await alice.recv()
        assert amended["type"] == "order_amended" and amended["priority_kept"] is True
        assert (amended["qty"], amended["leaves_qty"], amended["price"]) == (3, 3, 9990)
        await bob.send(order("b1", "sell", 1, 9990))
        assert (await alice.recv_type("fill"))["client_order_id"] == "a1"  # still first
        await alice.send({"type": "amend_order", "client_order_id": "a1", "qty": 10})
        amended = await alice.recv_type("order_amended")
        assert amended["priority_kept"] is False and amended["leaves_qty"] == 9
        await bob.send(order("b2", "sell", 1, 9990))
        assert (await carol.recv_type("fill"))["client_order_id"] == "c1"  # now ahead
        await carol.send({"type": "amend_order", "client_order_id": "c1", "price": 9991})
        amended = await carol.recv_type("order_amended")
        assert amended["priority_kept"] is False and amended["price"] == 9991
        await alice.send({"type": "amend_order", "client_order_id": "nope", "qty": 1})
        reject = await alice.recv()
        assert reject == {**reject, "type": "amend_reject", "client_order_id": "nope",
                          "code": "UNKNOWN_ORDER"}


async def test_cancel_and_cancel_all(tmp_path: Path) -> None:
    async with running_exchange(tmp_path) as ex, \
            logged_in(ex.uris["gateway"], "alice") as alice:
        a1 = await place(alice, order("a1", "buy", 1, 9990))
        for cid in ("a2", "a3", "a4"):
            await place(alice, order(cid, "buy", 1, 9980))
        await alice.send({"type": "cancel_order", "order_id": a1["order_id"]})
        canceled = await alice.recv()
        assert canceled == {**canceled, "type": "order_canceled", "order_id": a1["order_id"],
                            "client_order_id": "a1", "canceled_qty": 1, "reason": "user"}
        await alice.send({"type": "cancel_order", "client_order_id": "a2"})
        assert (await alice.recv())["client_order_id"] == "a2"
        await alice.send({"type": "cancel_order", "order_id": a1["order_id"]})  # gone already
        reject = await alice.recv()
        assert reject == {**reject, "type": "cancel_reject", "order_id": a1["order_id"],
                          "code": "UNKNOWN_ORDER"}
        await alice.send({"type": "cancel_all"})
        canceled = [await alice.recv() for _ in range(2)]
        assert {c["client_order_id"] for c in canceled} == {"a3", "a4"}
        assert {c["reason"] for c in canceled} == {"user"}
        await alice.send({"type": "get_open_orders"})
        assert (await alice.recv())["orders"] == []


async def test_self_trade_prevention_cancels_the_resting_order_by_default(
        tmp_path: Path) -> None:
    async with running_exchange(tmp_path) as ex, \
            logged_in(ex.uris["gateway"], "alice") as alice:
        await place(alice, order("a1", "sell", 2, 10000))
        await alice.send(order("a2", "buy", 2, 10000))
        ack, canceled = await next_types(alice, 2)
        assert ack["client_order_id"] == "a2"
        assert canceled == {**canceled, "type": "order_canceled", "client_order_id": "a1",
                            "reason": "self_trade", "canceled_qty": 2}
        await alice.send({"type": "get_open_orders"})
        (live,) = (await alice.recv())["orders"]
        assert live["client_order_id"] == "a2" and live["status"] == "new"


async def test_get_position_open_orders_and_ping(tmp_path: Path) -> None:
    async with running_exchange(tmp_path) as ex, \
            logged_in(ex.uris["gateway"], "alice") as alice:
        await alice.send({"type": "get_position"})
        position = await alice.recv()
        assert position == {"type": "position", "symbol": "SIM", "position": 0,
                            "avg_price": 0.0, "cash": 1000000.0, "realized_pnl": 0.0,
                            "unrealized_pnl": 0.0, "equity": 1000000.0, "margin_used": 0.0,
                            "status": "ok", "fees": 0.0}
        ack = await place(alice, order("a1", "buy", 2, 9990))
        await alice.send({"type": "get_open_orders", "symbol": "SIM"})
        (state,) = (await alice.recv())["orders"]
        assert {k: state[k] for k in ("order_id", "client_order_id", "side", "price", "qty",
                                      "leaves_qty", "tif", "status")} == {
            "order_id": ack["order_id"], "client_order_id": "a1", "side": "buy",
            "price": 9990, "qty": 2, "leaves_qty": 2, "tif": "gtc", "status": "new"}
        await alice.send({"type": "get_position", "symbol": "NOPE"})
        error = await alice.recv()
        assert error == {**error, "type": "error", "code": "UNKNOWN_SYMBOL"}
        await assert_quiet(alice)


async def test_a_trader_cannot_see_or_touch_another_traders_orders(tmp_path: Path) -> None:
    async with running_exchange(tmp_path) as ex, \
            logged_in(ex.uris["gateway"], "alice") as alice, \
            logged_in(ex.uris["gateway"], "mallory") as mallory:
        a1 = await place(alice, order("a1", "buy", 2, 9990))
        await mallory.send({"type": "cancel_order", "order_id": 999_999})
        unknown = await mallory.recv()
        await mallory.send({"type": "cancel_order", "order_id": a1["order_id"]})
        foreign = await mallory.recv()
        assert foreign["code"] == "UNKNOWN_ORDER"
        assert {k: v for k, v in foreign.items() if k not in ("order_id", "ts")} == \
            {k: v for k, v in unknown.items() if k not in ("order_id", "ts")}
        await mallory.send({"type": "cancel_order", "client_order_id": "a1"})
        assert (await mallory.recv())["code"] == "UNKNOWN_ORDER"
        await mallory.send({"type": "amend_order", "order_id": a1["order_id"], "qty": 1})
        assert (await mallory.recv())["code"] == "UNKNOWN_ORDER"
        await mallory.send({"type": "get_open_orders"})
        assert (await mallory.recv())["orders"] == []
        await mallory.send({"type": "cancel_all"})
        await assert_quiet(mallory)  # nothing of alice's was canceled for mallory
        await alice.send({"type": "get_open_orders"})
        (live,) = (await alice.recv())["orders"]  # and alice heard of nothing before this
        assert live["leaves_qty"] == 2


async def test_every_session_of_a_trader_gets_its_private_messages(tmp_path: Path) -> None:
    async with running_exchange(tmp_path) as ex, \
            logged_in(ex.uris["gateway"], "alice") as first, \
            logged_in(ex.uris["gateway"], "alice") as second:
        ack = await place(first, order("a1", "buy", 1, 9990))
        assert await second.recv() == ack
        await second.send({"type": "cancel_order", "client_order_id": "a1"})
        canceled = await second.recv()
        assert await first.recv() == canceled


async def test_margin_breach_sends_trader_status(tmp_path: Path) -> None:
    # 1000 of cash carries at most ~100 lots at 100.00; a 5.5% drop breaches maintenance.
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"margin": {"initial_cash": 1000}}))
    async with running_exchange(tmp_path, "--config", str(config)) as ex, \
            logged_in(ex.uris["gateway"], "alice") as alice, \
            logged_in(ex.uris["gateway"], "bob") as bob, \
            logged_in(ex.uris["gateway"], "carol") as carol:
        await place(bob, order("b1", "sell", 99, 10000))
        await place(alice, order("a1", "buy", 99, 10000))
        await place(carol, order("c1", "sell", 1, 9450))
        await place(bob, order("b2", "buy", 1, 9450))  # prints at 9450
        statuses = [(await alice.recv_type("trader_status"))["status"] for _ in range(2)]
        assert statuses == ["margin_call", "liquidating"]
        await alice.send({"type": "get_position"})
        position = await alice.recv_type("position")
        assert position["status"] == "liquidating" and position["position"] == 99
        await alice.send(order("a2", "buy", 1, 9450))
        reject = await alice.recv_type("order_reject")
        assert reject["code"] == "TRADER_LIQUIDATING"


async def test_several_instruments(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"instruments": [
        {"symbol": "SIM"}, {"symbol": "ABC", "tick_size": "0.5", "reference_price": 200}]}))
    async with running_exchange(tmp_path, "--config", str(config)) as ex, \
            logged_in(ex.uris["gateway"], "alice") as alice, \
            logged_in(ex.uris["gateway"], "bob") as bob:
        await bob.send(order("b0", "buy", 1, 10000))  # no symbol: ambiguous now
        error = await bob.recv()
        assert (error["type"], error["code"], error["ref"]) == ("error", "INVALID_FIELD", "b0")
        await place(alice, order("a1", "sell", 2, 10000, symbol="SIM"))
        await place(bob, order("b1", "buy", 2, 10000, symbol="SIM"))
        await place(alice, order("a2", "sell", 1, 201, symbol="ABC"))
        await place(bob, order("b2", "buy", 1, 201, symbol="ABC"))
        fill = await bob.recv_type("fill")
        assert (fill["symbol"], fill["price"]) == ("ABC", 201)
        after_fill = await bob.recv()
        assert after_fill["type"] == "position" and after_fill["symbol"] == "ABC"
        await bob.send({"type": "get_position"})
        sim, abc = await bob.recv(), await bob.recv()
        assert (sim["symbol"], sim["position"], abc["symbol"], abc["position"]) == \
            ("SIM", 2, "ABC", 1)
        # both symbols' holdings count in the equity, after the fill as when asked
        assert abc["equity"] == sim["equity"] == after_fill["equity"]
        assert round(abc["cash"] + 2 * 100 + 100.5, 6) == abc["equity"]
        with open(tmp_path / "trades.csv", newline="") as f:
            prices = [(row[5], row[1]) for row in list(csv.reader(f))[1:]]
        assert prices == [("SIM", "100.00"), ("ABC", "100.5")]
