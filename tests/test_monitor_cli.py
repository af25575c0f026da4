"""monitor_client.py as a real process: --once against a real relay following the fake
exchange stream, and a clear failure when the feed is unreachable."""

from __future__ import annotations

import random

import orjson

from tests.stack import ROOT, connected, run_to_exit, running_relay
from tests.test_market_data_fake import SYMBOLS, FakeExchange, running_fake

MONITOR = str(ROOT / "monitor_client.py")


async def run_monitor(*args: str, timeout: float = 30.0) -> tuple[int, str, str]:
    return await run_to_exit("monitor_client.py", *args, timeout=timeout)


async def test_once_json_prints_one_consistent_snapshot() -> None:
    async with running_fake() as fake, running_relay(fake.uri) as relay:
        feed = relay.uris["feed"]
        await fake.random_flow(random.Random(21), 300)
        board_seq = await fake.leaderboard()
        async with connected(feed) as client:  # the relay has caught up with the marker
            await client.recv_until(lambda m: m.get("type") == "leaderboard"
                                    and m["seq"] == board_seq)
        code, out, err = await run_monitor("--uri", feed, "--once", "--json", "--depth", "5")
        assert code == 0, err
        shown = orjson.loads(out)
        assert shown["status"] == "online"
        assert set(shown["books"]) == set(SYMBOLS)
        for symbol in SYMBOLS:
            book = shown["books"][symbol]
            assert {"bids": book["bids"], "asks": book["asks"]} == fake.depth(symbol, 5)
            assert book["seq"] == fake.seq
        assert shown["leaderboard"]["seq"] == board_seq
        assert shown["leaderboard"]["rows"] == fake.sent[-1]["rows"]
        assert shown["trades"] == []  # none printed since it connected


async def test_once_text_and_offline_exchange() -> None:
    fake = FakeExchange()
    port = int((await fake.start()).rsplit(":", 1)[1])
    await fake.stop()  # nobody serves the exchange stream: the relay stays offline
    async with running_relay(f"ws://127.0.0.1:{port}") as relay:
        code, out, err = await run_monitor("--uri", relay.uris["feed"], "--once")
    assert code == 0, err
    assert out.startswith("exchange: offline")


async def test_unreachable_feed_is_a_clear_error_and_non_zero_exit() -> None:
    fake = FakeExchange()
    port = int((await fake.start()).rsplit(":", 1)[1])
    await fake.stop()  # a port nobody listens on
    code, out, err = await run_monitor("--uri", f"ws://127.0.0.1:{port}", "--once", "--json",
                                       "--timeout", "3")
    assert code == 1 and out == ""
    assert f"cannot reach the feed at ws://127.0.0.1:{port}" in err


async def test_help_and_usage_errors() -> None:
    code, out, _ = await run_monitor("--help")
    assert code == 0 and "--uri" in out and "--once" in out and "--timeout" in out
    code, _, err = await run_monitor("--json")
    assert code == 2 and "--json needs --once" in err
