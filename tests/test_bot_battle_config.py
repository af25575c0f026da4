"""bot_battle_runner: config validation names the bad entry; classes load from PYTHONPATH."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bot_battle_runner import (
    ConfigError,
    derive_seed,
    format_leaderboard,
    load_config,
    parse_config,
)
from bot_client import BotResult
from bot_strategies import MarketMaker
from tests.stack import ROOT, run_to_exit

MM = "bot_strategies:MarketMaker"


def _bots(*entries: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {**top, "bots": list(entries)}


@pytest.mark.parametrize(("config", "message"), [
    ([], "config: expected an object, got list"),
    (_bots({"name": "a", "class": MM}, botz=1), "botz: unknown key"),
    ({}, "bots: required, a non-empty list"),
    (_bots(), "bots: required, a non-empty list"),
    (_bots({"name": "a", "class": MM}, "x"), "bots[1]: expected an object, got str"),
    (_bots({"name": "a", "class": MM, "cout": 2}), "bots[0].cout: unknown key (known: class"),
    (_bots({"name": "a", "class": MM, "count": 0}), "bots[0].count: must be an integer from 1"),
    (_bots({"name": "a", "class": MM, "count": True}), "bots[0].count: must be an integer"),
    (_bots({"name": "a", "class": MM, "count": "3"}), "bots[0].count: must be an integer"),
    (_bots({"class": MM}), "bots[0].name: required"),
    (_bots({"name": "bad name", "class": MM}), "bots[0].name: trader id 'bad name' must be"),
    (_bots({"name": "a" * 31, "class": MM, "count": 12}), "bots[0].name: trader id"),
    (_bots({"name": "a"}), "bots[0].class: required"),
    (_bots({"name": "a", "class": "NoColon"}), "bots[0].class: expected 'module:Class'"),
    (_bots({"name": "a", "class": MM}, {"name": "b", "class": MM},
           {"name": "c", "class": "foo:Bar"}),
     "bots[2].class: cannot import 'foo:Bar': No module named 'foo'"),
    (_bots({"name": "a", "class": "bot_strategies:Nope"}),
     "bots[0].class: cannot import 'bot_strategies:Nope': module 'bot_strategies' has no "
     "attribute 'Nope'"),
    (_bots({"name": "a", "class": "bot_strategies:BUY"}),
     "bots[0].class: 'bot_strategies:BUY' is not a class"),
    (_bots({"name": "a", "class": MM, "params": {"halfspread": 3}}),
     "bots[0].params.halfspread: unknown parameter for MarketMaker"),
    (_bots({"name": "a", "class": MM, "params": {"size": -1}}),
     "bots[0].params.size: must be positive, got -1"),
    (_bots({"name": "a", "class": MM, "params": []}), "bots[0].params: expected an object"),
    (_bots({"name": "a", "class": MM, "seed": 1.5}), "bots[0].seed: must be an integer"),
    (_bots({"name": "a", "class": MM, "timer_interval_s": 0}),
     "bots[0].timer_interval_s: must be a positive number"),
    (_bots({"name": "a", "class": MM}, reference_price=-5),
     "reference_price: must be a positive integer"),
    (_bots({"name": "mm", "class": MM, "count": 2}, {"name": "mm-2", "class": MM}),
     "bots[1].name: trader id 'mm-2' is already used by bots[0]"),
])
def test_config_errors_name_the_bad_entry(config: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(config, 42)
    assert str(err.value).startswith(message), str(err.value)


def test_count_replicates_with_numbered_ids_and_derived_seeds() -> None:
    config = _bots({"name": "mm", "class": MM, "count": 3, "params": {"size": 4}},
                   {"name": "solo", "class": "NoiseTrader"},
                   timer_interval_s=0.25, reference_price=5000)
    specs = parse_config(config, 42)
    assert [s.trader_id for s in specs] == ["mm-1", "mm-2", "mm-3", "solo"]
    assert [s.seed for s in specs] == [derive_seed(42, i) for i in range(4)]
    assert len({s.seed for s in specs}) == 4
    assert [s.seed for s in parse_config(config, 42)] == [s.seed for s in specs]
    assert [s.seed for s in parse_config(config, 43)] != [s.seed for s in specs]
    assert specs[0].params == {**MarketMaker.PARAMS, "size": 4}
    assert specs[0].timer_interval_s == 0.25 and specs[0].reference_price == 5000


def test_the_shipped_config_is_valid_and_lively() -> None:
    specs = load_config(ROOT / "bots_config.json", 42)
    classes = {s.class_path.rsplit(":", 1)[-1] for s in specs}
    assert classes == {"MarketMaker", "NoiseTrader", "MomentumTrader", "MeanReversionTrader",
                       "TWAPExecutor"}
    assert sum("MarketMaker" in s.class_path for s in specs) >= 2
    assert sum("TWAPExecutor" in s.class_path for s in specs) == 1


def test_classes_load_from_a_module_directory_on_the_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_strats.py").write_text(
        "from bot_strategies import Strategy\n"
        "class Mine(Strategy):\n"
        "    PARAMS = {'edge': 3}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    [spec] = parse_config(_bots({"name": "me", "class": "my_strats:Mine",
                                 "params": {"edge": 5}}), 1)
    assert spec.class_path == "my_strats:Mine" and spec.params == {"edge": 5}


def test_a_class_whose_constructor_fails_is_a_config_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_strats.py").write_text(
        "class Needy:\n"
        "    def __init__(self, required):\n"
        "        pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"^bots\[0\]\.class: 'broken_strats:Needy' could "
                                          r"not be created: TypeError"):
        parse_config(_bots({"name": "x", "class": "broken_strats:Needy"}), 1)


def test_load_config_reports_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--config: cannot read .*missing\.json"):
        load_config(tmp_path / "missing.json", 1)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad\.json: not valid JSON"):
        load_config(bad, 1)


def test_leaderboard_ranks_by_equity() -> None:
    table = format_leaderboard([
        BotResult("poor", "X", "stopped", 1, -2, 10.0, -1.0, 90.0, True),
        BotResult("rich", "X", "stopped", 3, 5, 20.0, 4.0, 120.5, True),
        BotResult("never", "X", "failed", error="cannot log in"),
    ]).splitlines()
    rows = [line.split() for line in table[3:6]]
    assert [r[1] for r in rows] == ["rich", "poor", "never"]
    assert rows[0][5:] == ["5", "20.00", "4.00", "120.50"]
    assert table[-1] == "note: never failed: cannot log in"


# --------------------------------------------------------------------------- the CLI


async def _run_cli(*args: str, cwd: Path, pythonpath: Path | None = None
                   ) -> tuple[int, str, str]:
    return await run_to_exit("bot_battle_runner.py", *args, timeout=30, cwd=cwd,
                             pythonpath=pythonpath)


async def test_cli_imports_from_pythonpath_and_names_the_bad_entry(tmp_path: Path) -> None:
    modules = tmp_path / "mods"
    modules.mkdir()
    (modules / "pp_strats.py").write_text(
        "from bot_strategies import Strategy\nclass Ok(Strategy):\n    pass\n")
    config = tmp_path / "battle.json"
    # The first entry imports from PYTHONPATH; the error is about the second one.
    config.write_text(json.dumps(_bots({"name": "ok", "class": "pp_strats:Ok"},
                                       {"name": "bad", "class": "pp_strats:Missing"})))
    code, out, err = await _run_cli("--config", str(config), cwd=tmp_path,
                                    pythonpath=modules)
    assert code == 2 and out == ""
    assert err.strip() == ("bot_battle_runner: error: bots[1].class: cannot import "
                           "'pp_strats:Missing': module 'pp_strats' has no attribute 'Missing'")


async def test_cli_imports_from_the_current_directory(tmp_path: Path) -> None:
    (tmp_path / "cwd_strats.py").write_text("class Ok:\n    pass\n")
    config = tmp_path / "battle.json"
    config.write_text(json.dumps(_bots({"name": "ok", "class": "cwd_strats:Ok"},
                                       {"name": "ok", "class": "cwd_strats:Ok"})))
    code, _, err = await _run_cli("--config", str(config), cwd=tmp_path)
    # The import of the first entry worked; the duplicate name is what fails.
    assert code == 2
    assert "bots[1].name: trader id 'ok' is already used by bots[0]" in err


async def test_cli_rejects_bad_flags_by_name(tmp_path: Path) -> None:
    code, _, err = await _run_cli("--workers", "0", cwd=tmp_path)
    assert code == 2 and "--workers: must be at least 1" in err
    code, _, err = await _run_cli("--exchange-uri", "http://x", cwd=tmp_path)
    assert code == 2 and "--exchange-uri: expected a ws:// or wss:// URI" in err
