"""The Textual monitor, driven by Pilot against a small scripted feed server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
from textual.widgets import DataTable, Static
from websockets.asyncio.server import ServerConnection, serve

from monitor_client import FeedConnection, MonitorApp, price_formatter

SUBSCRIBE_REPLY: list[dict[str, Any]] = [
    {"type": "subscribed", "channels": ["book", "trades", "leaderboard"], "symbols": [],
     "all_symbols": True, "depth": 10, "batch": True},
    {"type": "book_snapshot", "symbol": "ALT", "seq": 7, "bids": [[4990, 4]],
     "asks": [[5010, 6]]},
    {"type": "book_snapshot", "symbol": "SIM", "seq": 7, "bids": [[9999, 5], [9998, 7]],
     "asks": [[10001, 3]]},
    {"type": "book_update", "symbol": "SIM", "seq": 8, "bids": [[9999, 12]], "asks": []},
    {"type": "trade", "symbol": "SIM", "seq": 9, "trade_id": 1, "price": 10001, "qty": 2,
     "aggressor": "buy", "buy_trader": "alice", "sell_trader": "bob", "ts": 1},
    {"type": "leaderboard", "seq": 10, "ts": 1, "rows": [
        {"trader_id": "alice", "position": 2, "cash": -200.02, "realized_pnl": 0.0,
         "equity": 0.0}]},
]


@contextlib.asynccontextmanager
async def scripted_feed() -> AsyncIterator[tuple[str, list[ServerConnection]]]:
    """Answers like the relay: status on connect, snapshots on subscribe, pong on ping."""
    connections: list[ServerConnection] = []

    async def handle(ws: ServerConnection) -> None:
        connections.append(ws)
        await ws.send('{"type":"status","exchange":"online"}')
        async for raw in ws:
            kind = orjson.loads(raw)["type"]
            reply = SUBSCRIBE_REPLY if kind == "subscribe" else [{"type": "pong"}]
            await ws.send(orjson.dumps(reply).decode())

    async with serve(handle, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}", connections


class ObservedApp(MonitorApp):
    """The monitor, plus a way for the test to wait for the feed being lost."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.lost = asyncio.Event()

    def on_feed_connection(self, message: FeedConnection) -> None:
        super().on_feed_connection(message)
        if not message.connected:
            self.lost.set()


def rows(app: MonitorApp, selector: str) -> list[list[Any]]:
    table = app.query_one(selector, DataTable)
    return [table.get_row_at(i) for i in range(table.row_count)]


async def test_app_renders_the_book_trades_leaderboard_and_status() -> None:
    async with scripted_feed() as (uri, connections):
        app = ObservedApp(uri)
        async with app.run_test(size=(120, 40)) as pilot:
            await asyncio.wait_for(app.synced.wait(), 10)
            await pilot.pause()
            assert app.symbol == "ALT"  # the first symbol, alphabetically
            assert rows(app, "#bids") == [[4, "49.90"]]  # ticks shown as currency
            await pilot.press("n")
            assert app.symbol == "SIM"
            assert rows(app, "#bids") == [[12, "99.99"], [7, "99.98"]]
            assert rows(app, "#asks") == [["100.01", 3]]
            assert rows(app, "#trades") == [["SIM", "100.01", 2, "buy"]]
            assert rows(app, "#leaderboard") == [["alice", 2, 0.0, 0.0]]
            status = str(app.query_one("#status", Static).render())
            assert "connected" in status and "exchange: online" in status
            await connections[0].close()
            await asyncio.wait_for(app.lost.wait(), 10)
            await pilot.pause()
            assert "disconnected" in str(app.query_one("#status", Static).render())
            await pilot.press("q")


def test_format_prices_with_the_tick_decimals_when_a_tick_size_is_given() -> None:
    assert price_formatter("0.01")(10012) == "100.12"
    assert price_formatter("0.5")(3) == "1.5"
    assert price_formatter("1")(42) == "42"
    assert price_formatter("0.0001")(123456) == "12.3456"
