"""Do two checkouts' engines give the same events? A check for engine speed work.

Runs one command stream through the engine of another checkout (``--against``, on its
pure-Python core: the reference) and through this checkout's, compiled and pure, each in
its own interpreter, and compares every event (as ``models.event_to_dict``) and the final
``state_hash()``. Exit status 1 if any differs, naming the first 1,000-command chunk that
does.

Streams: ``bench`` is bench_engine.py's seeded workload (passive limits, cancels,
marketable IOCs); ``mixed`` is a seeded mix of every command, order type, time in force
and STP mode on two symbols, with tight risk limits, a small cash balance (or a large
one, by seed) and rate limits, so rejects, stops, self-trade prevention and liquidations
all happen. ``python bench/engine_equivalence.py --against ../main --ops 300000``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def mixed_stream(n_ops: int, seed: int) -> tuple[Any, list[Any]]:
    from config import ExchangeConfig, FeeConfig, InstrumentConfig, MarginConfig, RiskConfig
    from models import (
        AmendOrder,
        CancelAll,
        CancelOrder,
        NewOrder,
        OrderType,
        SetMarketOpen,
        Side,
        StpMode,
        TimeInForce,
    )

    rng = random.Random(seed)
    traders = [f"t{i}" for i in range(12)]
    config = ExchangeConfig(
        instruments=[InstrumentConfig(symbol="A", reference_price=1000),
                     InstrumentConfig(symbol="B", reference_price=500, tick_size="0.05",
                                      lot_size=10)],
        risk=RiskConfig(max_order_qty=500, max_position=3000, max_open_orders=60,
                        rate_limit_per_sec=2000 if seed % 5 else 90.5,
                        rate_limit_burst=50 if seed % 5 else 3),
        fees=FeeConfig(maker_fee_bps=-0.5 if seed % 2 else 0.0, taker_fee_bps=1.0),
        margin=MarginConfig(enabled=True, initial_cash=20000.0 if seed % 3 else 1e12,
                            maintenance_margin_pct=5.0 if seed % 2 else 7.5))
    commands: list[Any] = []
    mids = {"A": 1000, "B": 500}
    limit_heavy = [OrderType.LIMIT] * 6 + [OrderType.MARKET, OrderType.STOP,
                                           OrderType.STOP_LIMIT]
    for i in range(n_ops):
        trader, roll = rng.choice(traders), rng.random()
        symbol = rng.choice(["A", "B", "A"])
        mids[symbol] = mid = max(20, mids[symbol] + rng.randint(-3, 3))
        client_id = f"c{rng.randrange(40)}"
        if roll < 0.45:
            kind = rng.choice(limit_heavy)
            has_price = kind in (OrderType.LIMIT, OrderType.STOP_LIMIT)
            has_stop = kind in (OrderType.STOP, OrderType.STOP_LIMIT)
            if kind is OrderType.LIMIT:
                tif = rng.choice([TimeInForce.GTC] * 4 + [TimeInForce.IOC, TimeInForce.FOK])
            else:
                tif = rng.choice([TimeInForce.IOC, TimeInForce.FOK])
            post_only = kind is OrderType.LIMIT and tif is TimeInForce.GTC \
                and rng.random() < 0.1
            commands.append(NewOrder(
                trader, client_id, "ZZZ" if rng.random() < 0.01 else symbol,
                rng.choice([Side.BUY, Side.SELL]), kind,
                rng.choice([rng.randint(1, 50), rng.randint(1, 400), 600]),
                mid + rng.randint(-15, 15) if has_price else None,
                mid + rng.randint(-10, 10) if has_stop else None,
                tif, post_only, rng.choice(list(StpMode))))
        elif roll < 0.75:
            if rng.random() < 0.5:
                commands.append(CancelOrder(trader, None, client_id))
            else:
                commands.append(CancelOrder(trader, rng.randrange(1, i + 2), None))
        elif roll < 0.93:
            commands.append(AmendOrder(trader, None, client_id,
                                       rng.choice([None, mid + rng.randint(-15, 15)]),
                                       rng.choice([None, rng.randint(1, 300)])))
        elif roll < 0.98:
            commands.append(CancelAll(trader, rng.choice([None, "A", "B", "Q"])))
        else:
            commands.append(SetMarketOpen(rng.random() < 0.6, rng.choice([None, "A", "B"])))
    return config, commands


def fingerprint(checkout: str, stream: str, n_ops: int, seed: int) -> dict[str, Any]:
    """Run with ``checkout`` first on ``sys.path``: digests of its engine's events, per
    1,000 commands."""
    import native_core

    native_core.install()
    import engine
    from models import event_to_dict

    if stream == "bench":
        sys.path.insert(1, str(Path(checkout) / "bench"))
        import bench_engine

        config, commands = bench_engine.bench_config(), bench_engine.generate(n_ops, seed).commands
    else:
        config, commands = mixed_stream(n_ops, seed)
    eng = engine.Engine(config)
    total, chunk, chunks, n_events = hashlib.sha256(), hashlib.sha256(), [], 0
    for number, command in enumerate(commands):
        for event in eng.process(command, number * 997):
            encoded = repr(event_to_dict(event)).encode()
            total.update(encoded)
            chunk.update(encoded)
            n_events += 1
        if number % 1000 == 999:
            chunks.append(chunk.hexdigest()[:12])
            chunk = hashlib.sha256()
    eng.validate()
    chunks.append(chunk.hexdigest()[:12])
    return {"core": native_core.implementation(), "events": n_events,
            "digest": total.hexdigest(), "state": eng.state_hash(), "chunks": chunks}


def run(checkout: Path, pure: bool, args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ}
    if pure:
        env["OPENMARKETSIM_CORE"] = "pure"
    code = (f"import sys; sys.path.insert(0, {str(checkout)!r}); "
            f"sys.path.insert(1, {str(ROOT / 'bench')!r}); import json, engine_equivalence as e; "
            f"print(json.dumps(e.fingerprint({str(checkout)!r}, {args.stream!r}, {args.ops}, "
            f"{args.seed})))")
    done = subprocess.run([sys.executable, "-c", code], cwd=checkout, env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", type=Path, required=True,
                        help="the reference checkout (run on its pure core)")
    parser.add_argument("--ops", type=int, default=50_000)
    parser.add_argument("--stream", choices=("bench", "mixed"), default="bench")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    reference = run(args.against.resolve(), True, args)
    print(f"reference {args.against} ({reference['core']}): {reference['events']:,} events, "
          f"state {reference['state'][:16]}")
    same = True
    for pure in (False, True):
        mine = run(ROOT, pure, args)
        if mine["digest"] == reference["digest"] and mine["state"] == reference["state"]:
            print(f"  this checkout ({mine['core']}): identical")
            continue
        same = False
        pairs = zip(reference["chunks"], mine["chunks"], strict=False)
        first = next((i for i, (a, b) in enumerate(pairs) if a != b),
                     min(len(reference["chunks"]), len(mine["chunks"])))
        print(f"  this checkout ({mine['core']}): DIFFERENT from command {first * 1000} on")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
