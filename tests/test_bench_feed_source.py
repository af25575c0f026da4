"""The synthetic event source of bench/bench_feed.py (bench/_stream_source.py): its stream
is the exchange's event-stream protocol with gapless seq across cycles, and a real relay
fed by it serves the book the engine itself ended with."""

from __future__ import annotations

import sys
from typing import Any

import orjson

from tests.stack import ROOT, connected, running_process, running_relay
from tests.test_market_data_fake import BookMirror, collect_until

sys.path.insert(0, str(ROOT / "bench"))
import _stream_source

INPUTS = 3000
SEED = 7
LEADERBOARD_EVERY = 1000
LOOPS = 2  # the cycle, the teardown that empties the book, the cycle again
TIMEOUT_S = 10.0
SOURCE_ARGS = ("--inputs", str(INPUTS), "--seed", str(SEED), "--leaderboard-every",
               str(LEADERBOARD_EVERY), "--loops", str(LOOPS), "--log-level", "WARNING")


def expected_stream() -> tuple[_stream_source.SyntheticCycle, int, int]:
    """The cycle the source serves (same seed), its total event count over LOOPS and the
    seq of its last book_changed."""
    cycle = _stream_source.generate(INPUTS, SEED, LEADERBOARD_EVERY)
    seq = last_book = 0
    for item in [*cycle.body, *cycle.teardown] * (LOOPS - 1) + cycle.body:
        for prefix, _ in item.events:
            seq += 1
            if b'"book_changed"' in prefix:
                last_book = seq
    return cycle, seq, last_book


def l2_of(levels: dict[str, list[tuple[int, int]]]) -> dict[str, list[list[int]]]:
    return {side: [[p, q] for p, q in levels[side]] for side in ("bids", "asks")}


async def control(source_uri: str, rate: str | None = None) -> dict[str, Any]:
    query = "" if rate is None else f"?rate={rate}"
    async with connected(f"{source_uri}/control{query}") as client:
        return await client.recv()


async def test_stream_is_gapless_across_cycles_and_replays_the_engine_book() -> None:
    cycle, total, _ = expected_stream()
    assert {"order_accepted", "book_changed", "trade", "order_canceled", "order_amended",
            "position_changed", "leaderboard"} <= set(cycle.event_counts)
    book: dict[str, dict[int, dict[int, int]]] = {"buy": {}, "sell": {}}  # side, price, id
    actions: set[str] = set()
    async with running_process("bench/_stream_source.py", "--rate", "max", *SOURCE_ARGS
                               ) as source, connected(source.uris["events"]) as consumer:
        snapshot = await consumer.recv()
        assert snapshot["type"] == "snapshot" and snapshot["seq"] == 0
        assert snapshot["books"] == {"SIM": {"bids": [], "asks": []}}
        seq = 0
        while seq < total:
            event = await consumer.recv(TIMEOUT_S)
            assert isinstance(event, dict), "one event per frame without ?batch=1"
            assert event["seq"] == seq + 1, f"gap after seq {seq}: {event}"
            seq = event["seq"]
            if event["type"] == "book_changed":
                actions.add(event["action"])
                level = book[event["side"]].setdefault(event["price"], {})
                if event["order_qty"]:
                    level[event["order_id"]] = event["order_qty"]
                else:
                    level.pop(event["order_id"], None)
                assert sum(level.values()) == event["level_qty"], event
                if not level:
                    del book[event["side"]][event["price"]]
        assert actions == {"add", "cancel", "execute", "amend"}
        stats = await control(source.uris["events"])
        assert stats["seq"] == total
    got = {name: [[price, sum(orders.values())] for price, orders in
                  sorted(book[side].items(), reverse=side == "buy")]
           for side, name in (("buy", "bids"), ("sell", "asks"))}
    assert got == l2_of(cycle.final_l2)
    assert got["bids"] and got["asks"]  # a standing book, not a trivially empty one


async def test_relay_fed_by_the_source_serves_the_engine_book() -> None:
    cycle, total, last_book = expected_stream()
    async with running_process("bench/_stream_source.py", "--rate", "0", *SOURCE_ARGS
                               ) as source, \
            running_relay(source.uris["events"], "--log-level", "WARNING") as relay, \
            connected(relay.uris["feed"]) as sub:
        await sub.send({"type": "subscribe", "channels": ["book"], "depth": 1000})
        # the default view's snapshot on connect comes first: count from the ack on
        await collect_until(sub, lambda m: m.get("type") == "subscribed", TIMEOUT_S)
        mirror = BookMirror()
        for msg in await collect_until(sub, lambda m: m.get("type") == "book_snapshot"
                                       and m["seq"] == 0, TIMEOUT_S):
            mirror.apply(msg)
        assert mirror.view("SIM") == {"bids": [], "asks": []}
        # the relay asks for one frame per input: the source must honour that too
        assert (await control(source.uris["events"], "max"))["batched"] is True
        for msg in await collect_until(sub, lambda m: m.get("seq", 0) >= last_book, TIMEOUT_S):
            mirror.apply(msg)
        assert mirror.snapshots == {"SIM": 1}, "the relay resynced: its input broke"
        assert mirror.seqs["SIM"] == last_book
        assert mirror.view("SIM") == l2_of(cycle.final_l2)
        assert (await control(source.uris["events"]))["seq"] == total
    assert not [line for line in relay.stderr_lines if "WARNING" in line or "ERROR" in line]


async def test_control_rejects_a_bad_rate() -> None:
    async with running_process("bench/_stream_source.py", "--rate", "0", *SOURCE_ARGS
                               ) as source:
        assert "error" in await control(source.uris["events"], "-5")
        assert (await control(source.uris["events"]))["rate"] == 0


def test_seq_is_spliced_into_the_encoded_event() -> None:
    prefixes: dict[bytes, bytes] = {}
    prefix, suffix = _stream_source._split(
        orjson.dumps({"type": "trade", "seq": 0, "qty": 3}), prefixes)
    assert orjson.loads(b"%b%d%b" % (prefix, 1234, suffix)) == {
        "type": "trade", "seq": 1234, "qty": 3}

