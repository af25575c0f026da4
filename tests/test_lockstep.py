"""Lockstep (simulated-time) mode: ``exchange_server.py --clock sim`` at the gateway, and
whole battles (``bot_battle_runner.py --lockstep``) that must reproduce byte for byte."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.stack import (
    Client,
    ServerProcess,
    connected,
    logged_in,
    run_to_exit,
    running_exchange,
    running_relay,
)

STEP_US = 10_000  # the default --step-ms 10
RUN_TIMEOUT_S = 90.0

BATTLE = {"timer_interval_s": 0.1, "bots": [
    {"name": "mm", "class": "bot_strategies:MarketMaker", "count": 2,
     "params": {"size": 5, "levels": 2}},
    {"name": "noise", "class": "bot_strategies:NoiseTrader", "count": 3,
     "params": {"trade_probability": 0.8, "market_ratio": 0.5}},
    {"name": "momo", "class": "bot_strategies:MomentumTrader",
     "params": {"fast_window": 3, "slow_window": 8, "threshold_ticks": 0.5}},
]}


BATTLE_IDS = sorted(["mm-1", "mm-2", "noise-1", "noise-2", "noise-3", "momo"])


def sim_exchange(data_dir: Path, *args: str) -> contextlib.AbstractAsyncContextManager[
        ServerProcess]:
    return running_exchange(data_dir, "--clock", "sim", *args)


@contextlib.asynccontextmanager
async def members(uri: str, participants: int, *trader_ids: str) -> AsyncIterator[
        list[Client]]:
    """Logged-in sessions that have joined the lockstep, in order (the last join
    starts step 1 when it completes the participants)."""
    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for trader_id in trader_ids:
            client = await stack.enter_async_context(logged_in(uri, trader_id))
            await client.send({"type": "lockstep_join", "participants": participants})
            joined = await client.recv_type("lockstep_joined")
            assert joined["participants"] == participants
            clients.append(client)
        yield clients


def order(coid: str, side: str, price: int, qty: int = 1) -> dict[str, Any]:
    return {"type": "new_order", "client_order_id": coid, "symbol": "SIM", "side": side,
            "order_type": "limit", "price": price, "qty": qty}


async def tick(client: Client, step: int) -> dict[str, Any]:
    message = await client.recv_type("tick")
    assert message["step"] == step and message["ts"] == step * STEP_US, message
    return message


async def until_tick(client: Client, step: int) -> tuple[list[dict[str, Any]],
                                                         dict[str, Any]]:
    """The messages before tick ``step``, and the tick."""
    before = []
    while (message := await client.recv())["type"] != "tick":
        before.append(message)
    assert message["step"] == step and message["ts"] == step * STEP_US, message
    return before, message


async def finish_step(clients: list[Client], step: int) -> list[tuple[
        list[dict[str, Any]], dict[str, Any]]]:
    """Every client says it is done with ``step``; what each receives up to the next
    tick (its private replies of ``step``), and that tick."""
    for client in clients:
        await client.send({"type": "step_done", "step": step})
    return [await until_tick(client, step + 1) for client in clients]


def of_type(messages: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in messages if m["type"] == kind]


async def nothing_pending(client: Client) -> None:
    """The next message is the answer to a ping: nothing was queued before it."""
    await client.send({"type": "ping"})
    assert (await client.recv())["type"] == "pong"


# --------------------------------------------------------------------------- protocol


async def test_ticks_wait_for_every_participant_and_carry_the_market(tmp_path: Path) -> None:
    async with sim_exchange(tmp_path) as exchange:
        uri = exchange.uris["gateway"]
        async with members(uri, 2, "a") as (a,):
            await nothing_pending(a)  # one of two joined: no step yet
            async with members(uri, 2, "b") as (b,):
                first = [await tick(a, 1), await tick(b, 1)]
                assert first[0] == first[1]
                assert first[0]["trades"] == [] and first[0]["books"]["SIM"] == {
                    "bids": [], "asks": []}
                await a.send(order("s1", "sell", 10_010, 5))
                (a_before, _), (_, b_tick) = await finish_step([a, b], 1)
                # a's private replies of step 1 come before tick 2, stamped with its ts
                [ack] = of_type(a_before, "order_ack")
                assert ack["ts"] == 1 * STEP_US
                assert b_tick["books"]["SIM"] == {"bids": [], "asks": [[10_010, 5]]}
                await b.send(order("b1", "buy", 10_010, 2))
                (_, a_tick), (b_before, _) = await finish_step([a, b], 2)
                [fill] = of_type(b_before, "fill")
                assert (fill["qty"], fill["ts"]) == (2, 2 * STEP_US)
                assert [(t["price"], t["qty"], t["buy_trader"], t["ts"])
                        for t in a_tick["trades"]] == [(10_010, 2, "b", 2 * STEP_US)]
                assert a_tick["books"]["SIM"]["asks"] == [[10_010, 3]]


async def test_inputs_apply_in_trader_id_order_not_arrival_order(tmp_path: Path) -> None:
    async with sim_exchange(tmp_path) as exchange, \
            members(exchange.uris["gateway"], 3, "a", "b", "m") as clients:
        a, b, m = clients
        for client in clients:
            await tick(client, 1)
        await m.send(order("m1", "sell", 10_000))  # one lot for whoever comes first
        await finish_step(clients, 1)
        await b.send(order("b1", "buy", 10_000))
        await nothing_pending(b)  # the exchange has b's order before a's is sent
        await a.send(order("a1", "buy", 10_000))
        (a_before, _), (b_before, _), _ = await finish_step(clients, 2)
        # canonical order: a's order is applied first and takes the lot
        assert [f["client_order_id"] for f in of_type(a_before, "fill")] == ["a1"]
        assert of_type(b_before, "order_ack") and not of_type(b_before, "fill"), b_before


async def test_latency_lands_an_input_whole_steps_later_in_trader_order(
        tmp_path: Path) -> None:
    # a: 25 ms at 10 ms steps = 3 steps later; without it, a (first by id) would win
    config = tmp_path / "latency.json"
    config.write_text(json.dumps({"latency": {"seed": 1, "profiles": [
        {"traders": ["a"], "model": "fixed", "ms": 25}]}}))
    async with sim_exchange(tmp_path / "data", "--config", str(config)) as exchange, \
            members(exchange.uris["gateway"], 3, "a", "b", "m") as clients:
        a, b, m = clients
        for client in clients:
            await tick(client, 1)
        await m.send(order("m1", "sell", 10_000))  # one lot for whoever comes first
        await a.send(order("a1", "buy", 10_000))  # sent in step 1: lands in step 4
        await a.send(order("a2", "buy", 9_990))  # 3 steps too, and never before a1
        await finish_step(clients, 1)
        await b.send(order("b1", "buy", 10_000))
        (a_before, _), (b_before, _), _ = await finish_step(clients, 2)
        assert not of_type(a_before, "order_ack"), a_before
        assert [f["client_order_id"] for f in of_type(b_before, "fill")] == ["b1"]
        (a_before, _), _, _ = await finish_step(clients, 3)
        assert not of_type(a_before, "order_ack"), a_before
        (a_before, _), _, _ = await finish_step(clients, 4)
        acks = of_type(a_before, "order_ack")
        assert [(x["client_order_id"], x["ts"]) for x in acks] == [
            ("a1", 4 * STEP_US), ("a2", 4 * STEP_US)]
        assert not of_type(a_before, "fill")  # the lot went to b two steps earlier


async def test_a_late_joiner_takes_part_from_the_next_step(tmp_path: Path) -> None:
    async with sim_exchange(tmp_path, "--step-timeout-ms", "60000") as exchange:
        uri = exchange.uris["gateway"]
        async with members(uri, 2, "a", "b") as (a, b), logged_in(uri, "c") as c:
            await tick(a, 1)
            await tick(b, 1)
            await c.send({"type": "lockstep_join", "participants": 2})
            joined = await c.recv()
            assert (joined["type"], joined["joined"], joined["first_step"]) == (
                "lockstep_joined", 3, 2)
            await finish_step([a, b], 1)  # step 1 does not wait for c
            await tick(c, 2)
            await a.send({"type": "step_done", "step": 2})
            await b.send({"type": "step_done", "step": 2})
            await nothing_pending(a)  # step 2 waits for c
            await c.send({"type": "step_done", "step": 2})
            await tick(a, 3)


async def test_other_clients_inputs_wait_for_a_step_boundary(tmp_path: Path) -> None:
    async with sim_exchange(tmp_path) as exchange:
        uri = exchange.uris["gateway"]
        async with logged_in(uri, "n") as other:
            # no step runs: the clock stands still and the input is applied at once
            await other.send(order("n1", "buy", 9_900))
            ack = await other.recv()
            assert (ack["type"], ack["ts"]) == ("order_ack", 0)
            async with members(uri, 1, "a") as (a,):
                await tick(a, 1)
                await other.send(order("n2", "buy", 9_901))
                await nothing_pending(other)  # queued for the boundary: no ack yet
                [(_, second)] = await finish_step([a], 1)
                ack = await other.recv()
                assert (ack["type"], ack["client_order_id"], ack["ts"]) == (
                    "order_ack", "n2", 1 * STEP_US)
                assert second["books"]["SIM"]["bids"] == [[9_901, 1], [9_900, 1]]


async def test_a_silent_bot_is_skipped_and_its_late_inputs_go_into_the_next_step(
        tmp_path: Path) -> None:
    async with sim_exchange(tmp_path, "--step-timeout-ms", "1000") as exchange, \
            members(exchange.uris["gateway"], 2, "a", "z") as (a, z):
        await tick(a, 1)
        await tick(z, 1)
        await a.send({"type": "step_done", "step": 1})
        await tick(a, 2)  # z never answered step 1: it was skipped after 1 s
        await tick(z, 2)
        await z.send(order("late", "buy", 9_990))
        await z.send({"type": "step_done", "step": 1})  # too late: ignored
        (z_before, _), _ = await finish_step([z, a], 2)
        [ack] = of_type(z_before, "order_ack")
        assert ack["ts"] == 2 * STEP_US  # applied with step 2's inputs
    assert "step 1: z did not answer within 1000 ms; skipped" in exchange.stderr_text
    assert "step 2: z did not answer" not in exchange.stderr_text


async def test_a_member_that_leaves_or_disconnects_is_not_waited_for(tmp_path: Path) -> None:
    # a step timeout far beyond the test's receive timeout: only leaving can end a step
    async with sim_exchange(tmp_path, "--step-timeout-ms", "60000") as exchange:
        uri = exchange.uris["gateway"]
        async with members(uri, 3, "a", "b", "c") as clients:
            a, b, c = clients
            for client in clients:
                await tick(client, 1)
            await b.send(order("b1", "buy", 9_990))
            await b.send({"type": "lockstep_leave"})
            await finish_step([a, c], 1)
            assert (await b.recv())["type"] == "order_ack"  # its last step's replies,
            assert await b.recv() == {"type": "lockstep_left", "step": 1}  # then goodbye
            await nothing_pending(b)  # no tick 2 for b
            await c.close()  # c vanishes in the middle of step 2
            await a.send({"type": "step_done", "step": 2})
            third = await tick(a, 3)
            assert third["books"]["SIM"]["bids"] == [[9_990, 1]]  # b's order stays


async def test_bad_lockstep_messages_get_stable_codes(tmp_path: Path) -> None:
    async with sim_exchange(tmp_path / "sim") as exchange:
        uri = exchange.uris["gateway"]
        async with connected(uri) as anonymous:
            await anonymous.send({"type": "lockstep_join", "participants": 2})
            assert (await anonymous.recv())["code"] == "NOT_LOGGED_IN"
        async with logged_in(uri, "a") as a, logged_in(uri, "b") as b:
            await a.send({"type": "step_done", "step": 1})
            assert (await a.recv())["code"] == "LOCKSTEP_NOT_JOINED"
            for bad in (0, "2", True, None):
                await a.send({"type": "lockstep_join", "participants": bad})
                error = await a.recv()
                assert error["code"] == "INVALID_FIELD" and "participants" in error["message"]
            await a.send({"type": "lockstep_join", "participants": 3})
            await a.recv_type("lockstep_joined")
            await a.send({"type": "lockstep_join", "participants": 3})
            assert (await a.recv())["code"] == "LOCKSTEP_ALREADY_JOINED"
            await b.send({"type": "lockstep_join", "participants": 2})
            error = await b.recv()
            assert error["code"] == "LOCKSTEP_PARTICIPANTS_MISMATCH" and "3" in error["message"]
            await a.send({"type": "step_done", "step": 1})  # no step runs yet
            assert (await a.recv())["code"] == "LOCKSTEP_BAD_STEP"
    async with running_exchange(tmp_path / "wall") as exchange, \
            logged_in(exchange.uris["gateway"], "a") as a:
        for message in ({"type": "lockstep_join", "participants": 1},
                        {"type": "step_done", "step": 1}, {"type": "lockstep_leave"}):
            await a.send(message)
            assert (await a.recv())["code"] == "LOCKSTEP_NOT_ENABLED"


async def test_the_feed_follows_a_lockstep_market(tmp_path: Path) -> None:
    async with sim_exchange(tmp_path) as exchange, \
            running_relay(exchange.uris["events"]) as relay, \
            connected(relay.uris["feed"]) as feed:
        await feed.send({"type": "subscribe", "channels": ["book", "trades"]})
        await feed.recv_type("book_snapshot")
        async with members(exchange.uris["gateway"], 2, "a", "b") as (a, b):
            await tick(a, 1)
            await tick(b, 1)
            await b.send(order("b1", "buy", 10_000, 3))
            await a.send(order("a1", "sell", 10_000, 3))  # a first: it rests, b takes it
            await finish_step([a, b], 1)
            trade = await feed.recv_type("trade")
            assert (trade["price"], trade["qty"], trade["aggressor"], trade["ts"]) == (
                10_000, 3, "buy", 1 * STEP_US)


# --------------------------------------------------------------------------- battles


async def lockstep_battle(tmp_path: Path, name: str, seed: int,
                          *exchange_args: str) -> tuple[bytes, bytes, str]:
    """A whole lockstep battle over two worker processes: (trades.csv, performance.csv,
    the runner's stdout)."""
    config = tmp_path / "battle.json"
    config.write_text(json.dumps(BATTLE))
    data_dir = tmp_path / name
    # a skip would make the run depend on timing: on a loaded machine, wait rather than skip
    async with sim_exchange(data_dir, "--step-timeout-ms", "30000",
                            *exchange_args) as exchange:
        code, out, err = await run_to_exit(
            "bot_battle_runner.py", "--config", str(config), "--lockstep", "--duration", "3",
            "--workers", "2", "--seed", str(seed), "--exchange-uri", exchange.uris["gateway"],
            timeout=RUN_TIMEOUT_S, cwd=tmp_path)
        assert code == 0, err
    assert "skipped" not in exchange.stderr_text
    return ((data_dir / "trades.csv").read_bytes(), (data_dir / "performance.csv").read_bytes(),
            out)


@pytest.mark.timeout(240)
async def test_same_seed_same_files_across_worker_processes(tmp_path: Path) -> None:
    started = time.perf_counter()
    first = await lockstep_battle(tmp_path, "first", seed=5)
    second = await lockstep_battle(tmp_path, "second", seed=5)
    elapsed = time.perf_counter() - started
    print(f"two lockstep battles (3 simulated s each) in {elapsed:.1f} s")
    trades, performance, out = first
    assert trades.count(b"\n") > 30, trades  # the header and a real market's worth
    # the final rows carry the last step's simulated ts: bots joined at step 1 (0.01 s)
    # and left at the tick 3 simulated seconds later, whenever the exchange was stopped
    last_rows = performance.splitlines()[-len(BATTLE_IDS):]
    assert all(row.startswith(b"1970-01-01T00:00:03.010000Z,") for row in last_rows)
    assert sorted(row.split(b",")[1].decode() for row in last_rows) == BATTLE_IDS
    assert "simulated 3.0 s in" in out and "stopped" in out
    assert first[:2] == second[:2]
    other = await lockstep_battle(tmp_path, "other", seed=6)
    assert other[0] != trades and other[1] != performance


@pytest.mark.timeout(240)
async def test_a_latency_battle_reproduces_too(tmp_path: Path) -> None:
    # delays of 0-35 ms (0-4 steps) drawn per input: the draws follow each trader's own
    # input order, so they are the same in every run
    config = tmp_path / "latency.json"
    config.write_text(json.dumps({"latency": {"seed": 9, "profiles": [
        {"traders": ["noise-*"], "model": "uniform", "low_ms": 0, "high_ms": 35},
        {"traders": ["mm-2"], "model": "normal", "mean_ms": 12, "stdev_ms": 6}]}}))
    first = await lockstep_battle(tmp_path, "first", 5, "--config", str(config))
    second = await lockstep_battle(tmp_path, "second", 5, "--config", str(config))
    assert first[0].count(b"\n") > 30, first[0]
    assert first[:2] == second[:2]
