"""Helpers shared by the recovery and replay tests (no tests here).

``start``/``crash`` drive an in-process ``Exchange`` over a real data dir (no sockets:
commands go straight to ``submit``), so a test can build a journal in milliseconds;
``run_replay`` runs ``replay.py`` as the real process it is.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from config import ExchangeConfig, config_from_dict
from exchange_server import Exchange, FlushPolicy
from models import NewOrder, OrderType, Side, TimeInForce
from replay import recover
from tests.stack import run_to_exit

HASH_RE = re.compile(r"state_hash[=:] ?([0-9a-f]{64})")
RECOVERED_RE = re.compile(r"recovered (\d+) journaled inputs .*?: seq (\d+), .*?"
                          r"state_hash=([0-9a-f]{64})")
PROCESS_TIMEOUT_S = 60.0


def config(**sections: Any) -> ExchangeConfig:
    """Defaults without fees, so expected money reads plainly; sections override."""
    data: dict[str, Any] = {"fees": {"maker_fee_bps": 0.0, "taker_fee_bps": 0.0}}
    data.update(sections)
    return config_from_dict(data)


def start(data_dir: Path, cfg: ExchangeConfig, flush: FlushPolicy = FlushPolicy.BATCH,
          snapshot_every: int = 0) -> Exchange:
    """An exchange recovered from ``data_dir`` (a new journal if there is none). A
    journal failure raises instead of exiting the test process."""
    recovered = recover(data_dir, cfg)
    exchange = Exchange(cfg, recovered.telemetry, recovered=recovered, flush=flush,
                        snapshot_every=snapshot_every)
    assert exchange.commits is not None

    def fail(exc: BaseException) -> None:
        raise AssertionError(f"journal failure: {exc!r}")

    exchange.commits.on_fatal = fail
    return exchange


def crash(exchange: Exchange) -> None:
    """Stop as a killed process would after its last commit: no shutdown work (no final
    performance rows, no snapshot), only the descriptors closed."""
    assert exchange.commits is not None
    exchange.commits.close()
    exchange.telemetry.close()


def kill(exchange: Exchange) -> None:
    """Stop as a killed process would after its last write: the journal's live segment
    keeps its preallocated zeros (no trim at close), nothing else is done."""
    commits = exchange.commits
    assert commits is not None
    commits.commit_now()
    path = commits.journal.path
    image = path.read_bytes()  # what the kill leaves on disk
    crash(exchange)
    path.write_bytes(image)


def limit(trader: str, cid: str, side: Side, qty: int, price: int,
          tif: TimeInForce = TimeInForce.GTC) -> NewOrder:
    return NewOrder(trader, cid, "SIM", side, OrderType.LIMIT, qty, price, None, tif)


async def run_replay(*args: str) -> tuple[int, str, str]:
    """``python replay.py ARGS``: exit code, stdout, stderr."""
    return await run_to_exit("replay.py", *args, timeout=PROCESS_TIMEOUT_S)


async def replay_hash(data_dir: Path, *args: str) -> str:
    code, out, err = await run_replay("--data-dir", str(data_dir), *args)
    assert code == 0, err
    match = HASH_RE.search(out)
    assert match, out
    return match.group(1)


def recovered_line(stderr: str) -> tuple[int, int, str]:
    """(inputs, seq, state_hash) from the exchange's recovery log line."""
    match = RECOVERED_RE.search(stderr)
    assert match, stderr
    return int(match.group(1)), int(match.group(2)), match.group(3)


def final_hash(stderr: str) -> str:
    match = re.search(r"final state .*state_hash=([0-9a-f]{64})", stderr)
    assert match, stderr
    return match.group(1)
