"""Open or close markets on a running exchange: ``exchange_admin.py close SIM``.

A halt is an input like any other: the exchange sequences and journals it, publishes
``market_status_changed`` on its internal event stream, and rejects new orders and
amends in a closed symbol with ``MARKET_CLOSED`` (cancels still work; resting orders
stay). The command speaks to the internal event stream (``--exchange-uri``, default
``ws://127.0.0.1:9002``), which only trusted tools should reach.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import orjson
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

PROG = "exchange_admin"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="exchange_admin.py",
        description="Open or close markets on a running exchange (a journaled halt).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("action", choices=["open", "close"],
                        help="open or close trading")
    parser.add_argument("symbol", nargs="?", default=None,
                        help="the symbol (default: every symbol)")
    parser.add_argument("--exchange-uri", default="ws://127.0.0.1:9002",
                        help="the exchange's internal event stream")
    parser.add_argument("--timeout", type=float, default=5.0,
                        help="seconds to wait for the exchange's answer")
    return parser.parse_args(argv)


async def send_admin(uri: str, message: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Send one admin message; the exchange's answer (``admin_ack`` or ``error``)."""
    return await asyncio.wait_for(_exchange_answer(uri, message), timeout)


async def _exchange_answer(uri: str, message: dict[str, Any]) -> dict[str, Any]:
    async with connect(uri, compression=None, max_size=None) as ws:
        await ws.recv()  # the snapshot every consumer gets first
        await ws.send(orjson.dumps(message).decode())
        async for frame in ws:  # events may come first; the answer is a single object
            reply = orjson.loads(frame)
            if isinstance(reply, dict) and reply.get("type") in ("admin_ack", "error"):
                return reply
    raise ConnectionError("the exchange closed the connection without answering")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    message: dict[str, Any] = {"type": "set_market_open", "is_open": args.action == "open"}
    if args.symbol is not None:
        message["symbol"] = args.symbol
    try:
        reply = asyncio.run(send_admin(args.exchange_uri, message, args.timeout))
    except (OSError, asyncio.TimeoutError, ConnectionError, WebSocketException) as exc:
        print(f"{PROG}: cannot reach the exchange at {args.exchange_uri}: {exc}",
              file=sys.stderr)
        return 1
    if reply["type"] == "error":
        print(f"{PROG}: {reply['code']}: {reply['message']}", file=sys.stderr)
        return 1
    for symbol, is_open in reply["market_open"].items():
        print(f"{symbol}: {'open' if is_open else 'closed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
