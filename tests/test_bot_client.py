"""The bot client: order tracking from gateway messages, the book from the feed, and the
connection life cycle (login, reconnect and reconcile, refusal, crash isolation) against
a scripted gateway on a real WebSocket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from websockets.asyncio.server import ServerConnection, serve

from bot_client import BotClient, BotContext
from bot_strategies import Book, FillEvent, OrderUpdate, Strategy, StrategyContext, TradeEvent

WAIT_S = 5.0


def _ctx() -> BotContext:
    return BotContext("t1", symbol="SIM", seed=3, clock=lambda: 42)


# --------------------------------------------------------------------------- context


def test_orders_are_tracked_from_send_through_ack_and_fills() -> None:
    ctx = _ctx()
    coid = ctx.buy(10, 9_990, post_only=True)
    assert ctx.outbox == [{"type": "new_order", "client_order_id": coid, "symbol": "SIM",
                           "side": "buy", "order_type": "limit", "qty": 10, "tif": "gtc",
                           "price": 9_990, "post_only": True}]
    assert ctx.open_orders[coid].status == "pending"
    hooks = ctx.apply_gateway({"type": "order_ack", "order_id": 77, "client_order_id": coid,
                               "leaves_qty": 10, "seq": 1})
    assert hooks[0][0] == "on_order_update" and hooks[0][1].kind == "ack"
    assert ctx.open_orders[coid].order_id == 77 and ctx.open_orders[coid].status == "open"
    fill = {"type": "fill", "order_id": 77, "client_order_id": coid, "side": "buy",
            "price": 9_990, "qty": 4, "leaves_qty": 6, "liquidity": "maker", "fee": 0.0}
    [(name, event)] = ctx.apply_gateway(fill)
    assert name == "on_fill" and isinstance(event, FillEvent) and event.qty == 4
    assert ctx.position == 4 and ctx.open_orders[coid].leaves_qty == 6
    ctx.apply_gateway({**fill, "qty": 6, "leaves_qty": 0})
    assert coid not in ctx.open_orders and ctx.position == 10 and ctx.fills == 2


def test_cancel_reject_amend_and_errors_update_the_order_book_keeping() -> None:
    ctx = _ctx()
    a, b, c, d = ctx.buy(1, 9_000), ctx.sell(2, 11_000), ctx.sell(3), ctx.buy(1, 9_001)
    assert ctx.outbox[2]["order_type"] == "market" and ctx.outbox[2]["tif"] == "ioc"
    assert ctx.cancel(a) and not ctx.cancel(a), "a second cancel while one is pending"
    assert ctx.outbox[-1] == {"type": "cancel_order", "client_order_id": a}
    [(_, update)] = ctx.apply_gateway({"type": "order_canceled", "client_order_id": a,
                                       "canceled_qty": 1, "reason": "user"})
    assert update.kind == "canceled" and update.reason == "user" and a not in ctx.orders
    assert ctx.amend(b, price=10_900)
    ctx.apply_gateway({"type": "order_amended", "client_order_id": b, "price": 10_900,
                       "qty": 2, "leaves_qty": 2, "priority_kept": False})
    assert ctx.orders[b].price == 10_900 and not ctx.orders[b].amend_pending
    ctx.amend(b, qty=1)
    ctx.apply_gateway({"type": "amend_reject", "client_order_id": b, "code": "X",
                       "message": "no"})
    assert not ctx.orders[b].amend_pending
    [(_, update)] = ctx.apply_gateway({"type": "order_reject", "client_order_id": c,
                                       "code": "RISK_PRICE_BAND", "message": "far"})
    assert update.kind == "reject" and update.code == "RISK_PRICE_BAND" and c not in ctx.orders
    [(_, update)] = ctx.apply_gateway({"type": "error", "code": "INVALID_FIELD",
                                       "message": "bad", "ref": d})
    assert update.kind == "reject" and d not in ctx.orders


def test_position_messages_set_the_account() -> None:
    ctx = _ctx()
    ctx.apply_gateway({"type": "position", "symbol": "SIM", "position": -3, "cash": 1000.5,
                       "realized_pnl": 2.5, "equity": 990.0})
    ctx.apply_gateway({"type": "position", "symbol": "OTHER", "position": 99})
    assert (ctx.position, ctx.cash, ctx.realized_pnl, ctx.equity) == (-3, 1000.5, 2.5, 990.0)


def test_bad_actions_raise_clear_errors() -> None:
    ctx = _ctx()
    with pytest.raises(ValueError, match="qty must be a positive integer"):
        ctx.buy(0, 100)
    with pytest.raises(ValueError, match="price must be a positive integer"):
        ctx.sell(1, 99.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tif"):
        ctx.buy(1, None, "gtc")
    assert ctx.outbox == [] and ctx.orders == {}


def test_feed_messages_keep_the_book_and_last_trade() -> None:
    ctx = _ctx()
    [(name, book)] = ctx.apply_feed({"type": "book_snapshot", "symbol": "SIM", "seq": 5,
                                     "bids": [[9_999, 3]], "asks": [[10_001, 4]]})
    assert name == "on_book" and isinstance(book, Book)
    assert ctx.apply_feed({"type": "book_update", "symbol": "SIM", "seq": 4, "bids": [],
                           "asks": [[10_001, 0]]}) == []
    ctx.apply_feed({"type": "book_update", "symbol": "SIM", "seq": 6, "bids": [[10_000, 1]],
                    "asks": []})
    assert (ctx.best_bid, ctx.best_ask) == (10_000, 10_001)
    [(name, trade)] = ctx.apply_feed({"type": "trade", "symbol": "SIM", "seq": 7, "price": 10_001,
                                      "qty": 2, "aggressor": "buy", "trade_id": 1})
    assert name == "on_trade" and isinstance(trade, TradeEvent)
    assert ctx.last_trade_price == 10_001
    assert ctx.apply_feed({"type": "trade", "symbol": "OTHER", "price": 5, "qty": 1}) == []
    assert ctx.now == 42


# --------------------------------------------------------------------------- life cycle

Handler = Callable[[ServerConnection, int], Awaitable[None]]


@contextlib.asynccontextmanager
async def fake_gateway(handler: Handler) -> AsyncIterator[str]:
    """A scripted gateway on a free port; ``handler`` gets each connection and its number."""
    count = 0

    async def serve_one(ws: ServerConnection) -> None:
        nonlocal count
        count += 1
        with contextlib.suppress(Exception):
            await handler(ws, count)

    async with serve(serve_one, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}"


def _closed_port_uri() -> str:
    """A URI nothing listens on: the feed is down in these tests."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"ws://127.0.0.1:{sock.getsockname()[1]}"


async def _send(ws: ServerConnection, message: dict[str, Any]) -> None:
    await ws.send(orjson.dumps(message).decode())


async def _login(ws: ServerConnection) -> None:
    login = orjson.loads(await ws.recv())
    assert login["type"] == "login"
    await _send(ws, {"type": "login_ack", "trader_id": login["trader_id"],
                     "protocol_version": 1, "instruments": [], "limits": {}})


async def _answer_requests(ws: ServerConnection, seen: list[tuple[int, dict[str, Any]]],
                           n: int) -> None:
    """Answer what a session sends after login, recording it."""
    async for raw in ws:
        msg = orjson.loads(raw)
        seen.append((n, msg))
        if msg["type"] == "get_position":
            await _send(ws, {"type": "position", "symbol": "SIM", "position": 0,
                             "cash": 1_000_000.0, "realized_pnl": 0.0, "equity": 1_000_000.0})
        elif msg["type"] == "get_open_orders":
            await _send(ws, {"type": "open_orders", "orders": []})
        elif msg["type"] == "ping":
            await _send(ws, {"type": "pong"})


def _client(ctx: BotContext, strategy: Strategy, uri: str, timer: float = 10.0) -> BotClient:
    return BotClient(ctx, strategy, exchange_uri=uri, market_data_uri=_closed_port_uri(),
                     timer_interval_s=timer, backoff_initial_s=0.05, start_wait_s=0.05)


class OneOrder(Strategy):
    def __init__(self) -> None:
        self.updates: list[OrderUpdate] = []
        self.lost = asyncio.Event()

    def on_start(self, ctx: StrategyContext) -> None:
        ctx.buy(5, 9_990)

    def on_order_update(self, ctx: StrategyContext, update: OrderUpdate) -> None:
        self.updates.append(update)
        if update.kind == "canceled" and update.reason == "disconnect":
            self.lost.set()


async def test_reconnects_and_reconciles_orders_lost_with_the_connection() -> None:
    seen: list[tuple[int, dict[str, Any]]] = []

    async def handler(ws: ServerConnection, n: int) -> None:
        await _login(ws)
        if n == 1:  # ack the first order, then drop the session with it live
            while (msg := orjson.loads(await ws.recv()))["type"] != "new_order":
                pass
            await _send(ws, {"type": "order_ack", "order_id": 1, "leaves_qty": 5,
                             "client_order_id": msg["client_order_id"]})
            await ws.close()
            return
        await _answer_requests(ws, seen, n)

    strategy = OneOrder()
    async with fake_gateway(handler) as uri:
        client = _client(_ctx(), strategy, uri)
        task = asyncio.create_task(client.run())
        await asyncio.wait_for(strategy.lost.wait(), WAIT_S)
        assert [u.kind for u in strategy.updates] == ["ack", "canceled"]
        assert client.ctx.open_orders == {}
        client.stop()
        result = await asyncio.wait_for(task, WAIT_S)
    assert result.status == "stopped" and result.logged_in
    assert result.cash == 1_000_000.0
    second = [m["type"] for n, m in seen if n == 2]
    assert second[:2] == ["get_position", "get_open_orders"]
    assert second[-3:] == ["cancel_all", "get_position", "ping"]  # the orderly stop


async def test_a_refused_login_fails_the_bot_with_the_reason() -> None:
    async def handler(ws: ServerConnection, n: int) -> None:
        await ws.recv()
        await _send(ws, {"type": "error", "code": "AUTH_FAILED", "message": "bad token"})

    async with fake_gateway(handler) as uri:
        client = _client(_ctx(), OneOrder(), uri)
        result = await asyncio.wait_for(client.run(), WAIT_S)
    assert result.status == "failed" and not result.logged_in
    assert "AUTH_FAILED: bad token" in (result.error or "")


class Crasher(Strategy):
    def on_timer(self, ctx: StrategyContext) -> None:
        ctx.buy(1, 9_000)  # queued, then dropped: a failing hook's actions are suspect
        raise RuntimeError("strategy bug")


class Ticker(Strategy):
    def __init__(self) -> None:
        self.ticks = 0
        self.after_crash = asyncio.Event()
        self.crashed: BotClient | None = None

    def on_timer(self, ctx: StrategyContext) -> None:
        self.ticks += 1
        if self.crashed is not None and self.crashed.status == "crashed" and self.ticks > 5:
            self.after_crash.set()


async def test_a_raising_hook_stops_only_its_own_bot(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[tuple[int, dict[str, Any]]] = []

    async def handler(ws: ServerConnection, n: int) -> None:
        await _login(ws)
        await _answer_requests(ws, seen, n)

    ticker = Ticker()
    async with fake_gateway(handler) as uri:
        bad = _client(BotContext("bad"), Crasher(), uri, timer=0.02)
        good = _client(BotContext("good"), ticker, uri, timer=0.02)
        ticker.crashed = bad
        good_task = asyncio.create_task(good.run())
        with caplog.at_level(logging.ERROR):
            bad_result = await asyncio.wait_for(bad.run(), WAIT_S)
        await asyncio.wait_for(ticker.after_crash.wait(), WAIT_S)
        assert good.alive
        good.stop()
        good_result = await asyncio.wait_for(good_task, WAIT_S)
    assert bad_result.status == "crashed"
    assert bad_result.error == "on_timer: RuntimeError: strategy bug"
    assert good_result.status == "stopped"
    record = next(r for r in caplog.records if "raised in on_timer" in r.getMessage())
    assert record.exc_info is not None  # logged with its traceback
    sent = [m["type"] for _, m in seen]
    assert "new_order" not in sent
    assert sent.count("cancel_all") == 2  # the crashed bot's orders are canceled too


# --------------------------------------------------------------------------- lockstep


class SimRecorder(Strategy):
    """Records each hook with the simulated time it saw; orders on start and first ack."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def on_start(self, ctx: StrategyContext) -> None:
        self.calls.append(("start", ctx.now, ctx.best_bid))
        ctx.buy(1, 9_990)

    def on_order_update(self, ctx: StrategyContext, update: OrderUpdate) -> None:
        if update.kind == "ack" and update.client_order_id == "o1":
            self.calls.append(("ack", ctx.now))
            ctx.sell(1, 10_100)  # sent with the next step's inputs

    def on_trade(self, ctx: StrategyContext, trade: TradeEvent) -> None:
        self.calls.append(("trade", ctx.now, trade.price))

    def on_book(self, ctx: StrategyContext, book: Book) -> None:
        self.calls.append(("book", ctx.now, book.best_ask, book.depth(1).asks))

    def on_timer(self, ctx: StrategyContext) -> None:
        self.calls.append(("timer", ctx.now))

    def on_stop(self, ctx: StrategyContext) -> None:
        self.calls.append(("stop", ctx.now))


async def test_a_lockstep_bot_answers_ticks_on_simulated_time() -> None:
    received: list[dict[str, Any]] = []
    after_leaving: list[tuple[int, dict[str, Any]]] = []
    book = {"bids": [[9_995, 5]], "asks": [[10_005, 5]]}
    trade = {"type": "trade", "symbol": "SIM", "seq": 9, "trade_id": 1, "price": 10_005,
             "qty": 1, "aggressor": "buy", "buy_trader": "x", "sell_trader": "y",
             "ts": 20_000}

    async def next_message(ws: ServerConnection) -> dict[str, Any]:
        message = orjson.loads(await ws.recv())
        received.append(message)
        return message

    async def handler(ws: ServerConnection, n: int) -> None:
        await _login(ws)
        assert (await next_message(ws))["type"] == "get_position"
        assert await next_message(ws) == {"type": "lockstep_join", "participants": 1}
        await _send(ws, {"type": "lockstep_joined", "participants": 1, "joined": 1,
                         "first_step": 1, "step_ms": 10})
        for step in range(1, 10):
            after_trade = step >= 3
            await _send(ws, {"type": "tick", "step": step, "ts": step * 10_000, "seq": 0,
                             "trades": [trade] if step == 3 else [],
                             "books": {"SIM": {**book, "asks": [[10_005, 4]]}
                                       if after_trade else book}})
            while (message := await next_message(ws))["type"] not in (
                    "step_done", "lockstep_leave"):
                if message["type"] == "new_order":
                    await _send(ws, {"type": "order_ack", "order_id": step, "leaves_qty": 1,
                                     "client_order_id": message["client_order_id"]})
            if message["type"] == "lockstep_leave":
                await _send(ws, {"type": "lockstep_left", "step": step})
                break
        await _answer_requests(ws, after_leaving, n)

    strategy = SimRecorder()
    async with fake_gateway(handler) as uri:
        client = BotClient(BotContext("t1", symbol="SIM"), strategy, exchange_uri=uri,
                           market_data_uri=_closed_port_uri(), timer_interval_s=0.02,
                           lockstep_participants=1, duration_s=0.05)
        result = await asyncio.wait_for(client.run(), WAIT_S)
    assert result.status == "stopped" and result.sim_seconds == 0.05
    assert strategy.calls == [
        ("start", 10_000, 9_995), ("ack", 10_000),
        ("trade", 30_000, 10_005), ("book", 30_000, 10_005, [(10_005, 4)]),
        ("timer", 30_000), ("timer", 50_000), ("stop", 60_000)]
    sent = [(m["type"], m.get("client_order_id") or m.get("step"))
            for m in received + [m for _, m in after_leaving]]
    assert sent == [
        ("get_position", None), ("lockstep_join", None),
        ("new_order", "o1"), ("step_done", 1),
        ("new_order", "o2"), ("step_done", 2),  # the ack's order, with the next step
        ("step_done", 3), ("step_done", 4), ("step_done", 5),
        ("cancel_all", None), ("lockstep_leave", None),  # the tick at 0.05 s: leave
        ("get_position", None), ("ping", None)]
