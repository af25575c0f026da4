"""Exchange configuration: defaults, the strict loader and its range checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from config import (
    MONEY_SCALE,
    ConfigError,
    ExchangeConfig,
    FeeConfig,
    InstrumentConfig,
    LatencyConfig,
    LatencyProfile,
    MarginConfig,
    RiskConfig,
    ServerConfig,
    config_from_dict,
    load_config,
)


def config_error(data: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(data)
    return str(caught.value)


def test_load_defaults_when_no_path_is_given() -> None:
    config = load_config(None)
    assert config == ExchangeConfig()
    assert config.instruments == [InstrumentConfig("SIM", "0.01", 1, 10_000, 10.0)]
    assert config.risk == RiskConfig(1_000, 5_000, 200, 500.0, 1_000)
    assert config.fees == FeeConfig(0.0, 1.0)
    assert config.margin == MarginConfig(True, 1_000_000.0, 10.0, 5.0)
    assert config.server == ServerConfig(True, 1.0, 5.0, 65_536)


def test_load_defaults_when_the_dict_is_empty() -> None:
    assert config_from_dict({}) == ExchangeConfig()


def test_override_only_the_given_keys_when_a_section_is_partial() -> None:
    config = config_from_dict({"risk": {"max_order_qty": 50}, "fees": {"taker_fee_bps": 2}})
    assert config.risk == RiskConfig(max_order_qty=50)
    # an integer is a fine number for a float setting, and is stored as a float
    assert config.fees.taker_fee_bps == 2.0 and type(config.fees.taker_fee_bps) is float
    assert config.margin == MarginConfig()


def test_build_every_instrument_when_several_are_listed() -> None:
    config = config_from_dict({"instruments": [
        {"symbol": "SIM"}, {"symbol": "ALT", "tick_size": "0.5", "lot_size": 10,
                            "reference_price": 200}]})
    assert [i.symbol for i in config.instruments] == ["SIM", "ALT"]
    alt = config.instrument("ALT")
    assert alt == InstrumentConfig("ALT", "0.5", 10, 200, 10.0)
    assert config.instrument("NOPE") is None


@pytest.mark.parametrize(("data", "path"), [
    ({"risk": {"max_ordr_qty": 5}}, "risk.max_ordr_qty"),
    ({"riks": {}}, "riks"),
    ({"instruments": [{"symbol": "SIM"}, {"symbl": "ALT"}]}, "instruments[1].symbl"),
    ({"margin": {"enabled": True, "cash": 5}}, "margin.cash"),
    ({"server": {"port": 9001}}, "server.port"),
])
def test_reject_config_when_a_key_is_unknown(data: dict[str, Any], path: str) -> None:
    message = config_error(data)
    assert message.startswith(f"{path}:")
    assert "unknown key" in message


@pytest.mark.parametrize(("data", "path"), [
    ({"risk": {"max_order_qty": "10"}}, "risk.max_order_qty"),
    ({"risk": {"max_order_qty": 10.5}}, "risk.max_order_qty"),
    ({"risk": {"max_order_qty": True}}, "risk.max_order_qty"),
    ({"risk": {"rate_limit_per_sec": "fast"}}, "risk.rate_limit_per_sec"),
    ({"fees": {"taker_fee_bps": False}}, "fees.taker_fee_bps"),
    ({"margin": {"enabled": "yes"}}, "margin.enabled"),
    ({"margin": {"enabled": 1}}, "margin.enabled"),
    ({"instruments": [{"tick_size": 0.01}]}, "instruments[0].tick_size"),
    ({"instruments": [{"symbol": 7}]}, "instruments[0].symbol"),
    ({"instruments": {"symbol": "SIM"}}, "instruments"),
    ({"instruments": ["SIM"]}, "instruments[0]"),
    ({"risk": [1, 2]}, "risk"),
    ({"server": None}, "server"),
])
def test_reject_config_when_a_value_has_the_wrong_type(data: dict[str, Any],
                                                       path: str) -> None:
    assert config_error(data).startswith(f"{path}:")


def test_reject_config_when_the_top_level_is_not_an_object() -> None:
    assert config_error([]).startswith("config:")


@pytest.mark.parametrize(("data", "path"), [
    ({"risk": {"max_order_qty": 0}}, "risk.max_order_qty"),
    ({"risk": {"max_position": -1}}, "risk.max_position"),
    ({"risk": {"max_open_orders": 0}}, "risk.max_open_orders"),
    ({"risk": {"rate_limit_per_sec": 0}}, "risk.rate_limit_per_sec"),
    ({"risk": {"rate_limit_burst": 0}}, "risk.rate_limit_burst"),
    ({"instruments": [{"lot_size": 0}]}, "instruments[0].lot_size"),
    ({"instruments": [{"reference_price": 0}]}, "instruments[0].reference_price"),
    ({"instruments": [{"price_band_pct": 0}]}, "instruments[0].price_band_pct"),
    ({"instruments": [{"tick_size": "0"}]}, "instruments[0].tick_size"),
    ({"instruments": [{"tick_size": "-0.01"}]}, "instruments[0].tick_size"),
    ({"instruments": [{"tick_size": "0.000000001"}]}, "instruments[0].tick_size"),
    ({"instruments": [{"tick_size": "one cent"}]}, "instruments[0].tick_size"),
    ({"instruments": [{"symbol": ""}]}, "instruments[0].symbol"),
    ({"instruments": [{"symbol": "SIM"}, {"symbol": "SIM"}]}, "instruments[1].symbol"),
    ({"instruments": []}, "instruments"),
    ({"margin": {"initial_cash": -1}}, "margin.initial_cash"),
    ({"margin": {"maintenance_margin_pct": 20.0}}, "margin"),
    ({"margin": {"initial_margin_pct": 101.0, "maintenance_margin_pct": 5.0}}, "margin"),
    ({"margin": {"maintenance_margin_pct": -1.0}}, "margin"),
])
def test_reject_config_when_a_value_is_out_of_range(data: dict[str, Any], path: str) -> None:
    assert config_error(data).startswith(f"{path}:")


@pytest.mark.parametrize(("data", "path"), [
    ({"instruments": [{"price_band_pct": float("nan")}]}, "instruments[0].price_band_pct"),
    ({"risk": {"rate_limit_per_sec": float("inf")}}, "risk.rate_limit_per_sec"),
    ({"margin": {"initial_cash": float("nan")}}, "margin.initial_cash"),
    ({"fees": {"taker_fee_bps": float("nan")}}, "fees.taker_fee_bps"),
])
def test_reject_config_when_a_number_is_not_finite(data: dict[str, Any], path: str) -> None:
    # Python's json module reads NaN and Infinity; they must not get past the loader to
    # crash the engine later (round(nan) raises) or disable a limit silently
    assert config_error(data).startswith(f"{path}:")


def test_accept_margin_bounds_when_maintenance_equals_initial() -> None:
    config = config_from_dict({"margin": {"initial_margin_pct": 7.5,
                                          "maintenance_margin_pct": 7.5}})
    assert config.margin.initial_bps == config.margin.maintenance_bps == 750


def test_derive_exact_units_when_settings_are_decimal() -> None:
    config = config_from_dict({
        "instruments": [{"symbol": "SIM", "tick_size": "0.25", "lot_size": 4}],
        "fees": {"maker_fee_bps": -0.25, "taker_fee_bps": 1.5},
        "margin": {"initial_cash": 1234.56},
        "risk": {}})
    instrument = config.instruments[0]
    assert instrument.tick_value == MONEY_SCALE  # 0.25 currency per tick x 4 units per lot
    assert instrument.band_bps == 1_000
    assert (config.fees.maker_ppm, config.fees.taker_ppm) == (-25, 150)
    assert config.margin.initial_cash_units == 123_456_000_000
    assert (config.margin.initial_bps, config.margin.maintenance_bps) == (1_000, 500)


def test_load_config_when_the_file_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "exchange.json"
    path.write_text(json.dumps({"risk": {"max_position": 42}}), encoding="utf-8")
    assert load_config(path).risk.max_position == 42
    assert load_config(str(path)).risk.max_position == 42


def test_raise_config_error_when_the_file_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"risk": {"max_position": 42,}}', encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(path) in str(caught.value) and "JSON" in str(caught.value)


def test_raise_config_error_when_the_file_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(path) in str(caught.value)


def test_name_the_key_path_when_a_file_has_a_typo(tmp_path: Path) -> None:
    path = tmp_path / "typo.json"
    path.write_text('{"risk": {"max_ordr_qty": 5}}', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^risk\.max_ordr_qty: unknown key"):
        load_config(path)


def test_validate_when_a_config_is_built_in_code() -> None:
    # the checks run on construction, not only in the loader
    with pytest.raises(ConfigError, match=r"^risk\.max_order_qty:"):
        ExchangeConfig(risk=RiskConfig(max_order_qty=0))


@pytest.mark.parametrize("key", ["leaderboard_interval_s", "performance_interval_s",
                                 "max_message_bytes"])
def test_reject_config_when_a_server_interval_or_size_is_not_positive(key: str) -> None:
    with pytest.raises(ConfigError, match=rf"server\.{key}: must be positive"):
        config_from_dict({"server": {key: 0}})


# ------------------------------------------------------------------ latency


def latency_profile(**keys: Any) -> dict[str, Any]:
    return {"latency": {"profiles": [{"traders": ["*"], **keys}]}}


def test_latency_is_off_by_default() -> None:
    assert ExchangeConfig().latency == LatencyConfig(seed=0, profiles=[])


def test_load_latency_profiles_in_order_with_numbers_as_floats() -> None:
    config = config_from_dict({"latency": {"seed": 7, "profiles": [
        {"traders": ["mm_*"], "model": "fixed", "ms": 0.5},
        {"traders": ["noise_*", "alice"], "model": "uniform", "low_ms": 1, "high_ms": 3},
        {"traders": ["*"], "model": "normal", "mean_ms": 2, "stdev_ms": 0.5,
         "ms": None}]}})  # null is the same as leaving a parameter out
    assert config.latency == LatencyConfig(7, [
        LatencyProfile(["mm_*"], "fixed", ms=0.5),
        LatencyProfile(["noise_*", "alice"], "uniform", low_ms=1.0, high_ms=3.0),
        LatencyProfile(["*"], "normal", mean_ms=2.0, stdev_ms=0.5)])
    assert type(config.latency.profiles[1].low_ms) is float


@pytest.mark.parametrize(("data", "path", "problem"), [
    ({"latency": {"sed": 1}}, "latency.sed", "unknown key"),
    (latency_profile(model="fixed", ms=1, jitter_ms=2), "latency.profiles[0].jitter_ms",
     "unknown key"),
    ({"latency": {"seed": 1.5}}, "latency.seed", "integer"),
    ({"latency": {"profiles": {"traders": ["*"]}}}, "latency.profiles", "list"),
    ({"latency": {"profiles": [{"traders": "alice", "model": "fixed", "ms": 1}]}},
     "latency.profiles[0].traders", "list"),
    ({"latency": {"profiles": [{"traders": [], "model": "fixed", "ms": 1}]}},
     "latency.profiles[0].traders", "at least one"),
    ({"latency": {"profiles": [{"traders": [""], "model": "fixed", "ms": 1}]}},
     "latency.profiles[0].traders", "non-empty"),
    ({"latency": {"profiles": [{"traders": [7], "model": "fixed", "ms": 1}]}},
     "latency.profiles[0].traders[0]", "string"),
    ({"latency": {"profiles": [{"model": "fixed", "ms": 1}]}},
     "latency.profiles[0].traders", "at least one"),
    (latency_profile(ms=1), "latency.profiles[0].model", "one of fixed, uniform, normal"),
    (latency_profile(model="gaussian", mean_ms=1, stdev_ms=1), "latency.profiles[0].model",
     "'gaussian'"),
    (latency_profile(model="fixed"), "latency.profiles[0].ms", "required"),
    (latency_profile(model="uniform", low_ms=1), "latency.profiles[0].high_ms", "required"),
    (latency_profile(model="normal", stdev_ms=1), "latency.profiles[0].mean_ms", "required"),
    (latency_profile(model="fixed", ms=1, stdev_ms=1), "latency.profiles[0].stdev_ms",
     "not a parameter of model 'fixed'"),
    (latency_profile(model="fixed", ms=-1), "latency.profiles[0].ms", "between 0 and"),
    (latency_profile(model="normal", mean_ms=1, stdev_ms=-0.1),
     "latency.profiles[0].stdev_ms", "between 0 and"),
    (latency_profile(model="fixed", ms=60_001), "latency.profiles[0].ms", "between 0 and"),
    (latency_profile(model="fixed", ms=float("nan")), "latency.profiles[0].ms", "finite"),
    (latency_profile(model="uniform", low_ms=0, high_ms=float("inf")),
     "latency.profiles[0].high_ms", "finite"),
    (latency_profile(model="fixed", ms="2"), "latency.profiles[0].ms", "number"),
    (latency_profile(model="fixed", ms=True), "latency.profiles[0].ms", "number"),
    (latency_profile(model="uniform", low_ms=3, high_ms=1), "latency.profiles[0]",
     "low_ms <= high_ms"),
])
def test_reject_latency_config_naming_the_key(data: dict[str, Any], path: str,
                                              problem: str) -> None:
    message = config_error(data)
    assert message.startswith(f"{path}:"), message
    assert problem in message


def test_name_the_right_profile_when_a_later_one_is_bad() -> None:
    message = config_error({"latency": {"profiles": [
        {"traders": ["a"], "model": "fixed", "ms": 1},
        {"traders": ["b"], "model": "uniform", "low_ms": 1}]}})
    assert message.startswith("latency.profiles[1].high_ms: required")


def test_accept_zero_and_equal_bounds_in_latency_profiles() -> None:
    config = config_from_dict({"latency": {"profiles": [
        {"traders": ["a"], "model": "fixed", "ms": 0},
        {"traders": ["b"], "model": "uniform", "low_ms": 2, "high_ms": 2},
        {"traders": ["c"], "model": "normal", "mean_ms": 0, "stdev_ms": 0}]}})
    assert len(config.latency.profiles) == 3


def test_the_example_latency_config_loads() -> None:
    config = load_config(Path(__file__).parent.parent / "configs" / "latency_example.json")
    assert config.latency.profiles and config.latency.seed == 7
