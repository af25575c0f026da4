"""Exchange configuration: one dataclass tree with defaults, and a strict JSON loader.

Every key is optional; an unknown key or a value of the wrong type is a ``ConfigError``
that names the key by its path (``risk.max_order_qty``), so a typo never passes silently.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

MONEY_SCALE = 10**8  # money units per currency unit: accounting is exact integers


class ConfigError(ValueError):
    """A configuration problem, with the offending key's path in the message."""


@dataclass(slots=True)
class InstrumentConfig:
    symbol: str = "SIM"
    tick_size: str = "0.01"  # currency per price tick, a decimal string so it stays exact
    lot_size: int = 1  # units of the instrument per lot
    reference_price: int = 10_000  # ticks; the price band's centre before the first trade
    price_band_pct: float = 10.0  # limit prices further than this from the reference reject

    @property
    def tick_value(self) -> int:
        """Money units that one lot moving one tick is worth."""
        return int(Decimal(self.tick_size) * self.lot_size * MONEY_SCALE)

    @property
    def band_bps(self) -> int:
        return round(self.price_band_pct * 100)


@dataclass(slots=True)
class RiskConfig:
    max_order_qty: int = 1_000
    max_position: int = 5_000  # absolute lots, counting every open order filling
    max_open_orders: int = 200  # per trader, all symbols, stop orders included
    # sustained new_order/amend_order messages per trader; cancels are never limited, so
    # a trader can always pull its quotes
    rate_limit_per_sec: float = 500.0
    rate_limit_burst: int = 1_000


@dataclass(slots=True)
class FeeConfig:
    maker_fee_bps: float = 0.0  # negative is a rebate paid to the maker
    taker_fee_bps: float = 1.0

    @property
    def maker_ppm(self) -> int:
        return round(self.maker_fee_bps * 100)

    @property
    def taker_ppm(self) -> int:
        return round(self.taker_fee_bps * 100)


@dataclass(slots=True)
class MarginConfig:
    enabled: bool = True
    initial_cash: float = 1_000_000.0  # currency each trader starts with
    initial_margin_pct: float = 10.0  # of the worst-case notional, to open orders
    maintenance_margin_pct: float = 5.0  # of the position's notional, to keep it

    @property
    def initial_bps(self) -> int:
        return round(self.initial_margin_pct * 100)

    @property
    def maintenance_bps(self) -> int:
        return round(self.maintenance_margin_pct * 100)

    @property
    def initial_cash_units(self) -> int:
        return int(Decimal(str(self.initial_cash)) * MONEY_SCALE)


@dataclass(slots=True)
class ServerConfig:
    """Settings of the exchange process (the engine never reads these)."""

    cancel_on_disconnect: bool = True
    leaderboard_interval_s: float = 1.0
    performance_interval_s: float = 5.0
    max_message_bytes: int = 65_536


LATENCY_MODELS: dict[str, tuple[str, ...]] = {  # model -> the parameters it needs
    "fixed": ("ms",),
    "uniform": ("low_ms", "high_ms"),
    "normal": ("mean_ms", "stdev_ms"),
}
MAX_LATENCY_MS = 60_000.0  # a minute: anything longer is a unit mistake, not a network


@dataclass(slots=True)
class LatencyProfile:
    """The inbound delay of the traders whose ids match one of ``traders`` (globs)."""

    traders: list[str] = field(default_factory=list)  # fnmatch patterns, case-sensitive
    model: str = ""  # a key of LATENCY_MODELS
    ms: float | None = None  # fixed
    low_ms: float | None = None  # uniform
    high_ms: float | None = None
    mean_ms: float | None = None  # normal, clamped at 0
    stdev_ms: float | None = None


@dataclass(slots=True)
class LatencyConfig:
    """The gateway's seeded latency model (``latency.py``); no profiles: off."""

    seed: int = 0
    profiles: list[LatencyProfile] = field(default_factory=list)  # the first match wins


@dataclass(slots=True)
class ExchangeConfig:
    instruments: list[InstrumentConfig] = field(default_factory=lambda: [InstrumentConfig()])
    risk: RiskConfig = field(default_factory=RiskConfig)
    fees: FeeConfig = field(default_factory=FeeConfig)
    margin: MarginConfig = field(default_factory=MarginConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)  # the gateway's, not the engine's

    def __post_init__(self) -> None:
        validate(self)

    def instrument(self, symbol: str) -> InstrumentConfig | None:
        for instrument in self.instruments:
            if instrument.symbol == symbol:
                return instrument
        return None


def validate(config: ExchangeConfig) -> None:
    """Range checks that types alone cannot express."""
    if not config.instruments:
        raise ConfigError("instruments: at least one instrument is required")
    seen: set[str] = set()
    for i, inst in enumerate(config.instruments):
        where = f"instruments[{i}]"
        if not inst.symbol or inst.symbol in seen:
            raise ConfigError(f"{where}.symbol: must be non-empty and unique, got {inst.symbol!r}")
        seen.add(inst.symbol)
        try:
            tick = Decimal(inst.tick_size)
        except InvalidOperation:
            raise ConfigError(f"{where}.tick_size: not a decimal number: {inst.tick_size!r}") \
                from None
        if tick <= 0 or (tick * inst.lot_size * MONEY_SCALE) % 1:
            raise ConfigError(f"{where}.tick_size: must be positive with at most 8 decimals")
        _positive(f"{where}.lot_size", inst.lot_size)
        _positive(f"{where}.reference_price", inst.reference_price)
        _positive(f"{where}.price_band_pct", inst.price_band_pct)
    for name in ("max_order_qty", "max_position", "max_open_orders", "rate_limit_per_sec",
                 "rate_limit_burst"):
        _positive(f"risk.{name}", getattr(config.risk, name))
    for name in ("leaderboard_interval_s", "performance_interval_s", "max_message_bytes"):
        _positive(f"server.{name}", getattr(config.server, name))
    if config.risk.rate_limit_per_sec < 0.001:
        raise ConfigError("risk.rate_limit_per_sec: must be at least 0.001 (the bucket's "
                          f"resolution), got {config.risk.rate_limit_per_sec!r}")
    margin = config.margin
    if not 0 <= margin.maintenance_margin_pct <= margin.initial_margin_pct <= 100:
        raise ConfigError("margin: need 0 <= maintenance_margin_pct <= initial_margin_pct <= 100")
    if margin.initial_cash < 0:
        raise ConfigError("margin.initial_cash: must not be negative")
    for i, profile in enumerate(config.latency.profiles):
        _validate_latency_profile(f"latency.profiles[{i}]", profile)


def _validate_latency_profile(where: str, profile: LatencyProfile) -> None:
    if not profile.traders or not all(profile.traders):
        raise ConfigError(f"{where}.traders: need at least one non-empty trader_id pattern, "
                          f"got {profile.traders!r}")
    needed = LATENCY_MODELS.get(profile.model)
    if needed is None:
        raise ConfigError(f"{where}.model: must be one of {', '.join(LATENCY_MODELS)}, "
                          f"got {profile.model!r}")
    for params in LATENCY_MODELS.values():
        for name in params:
            value = getattr(profile, name)
            if name in needed and value is None:
                raise ConfigError(f"{where}.{name}: required by model {profile.model!r}")
            if name not in needed and value is not None:
                raise ConfigError(f"{where}.{name}: not a parameter of model {profile.model!r} "
                                  f"(it takes {', '.join(needed)})")
            if value is not None and not 0 <= value <= MAX_LATENCY_MS:
                raise ConfigError(f"{where}.{name}: must be between 0 and {MAX_LATENCY_MS:g} "
                                  f"ms, got {value!r}")
    low, high = profile.low_ms, profile.high_ms
    if low is not None and high is not None and low > high:
        raise ConfigError(f"{where}: need low_ms <= high_ms, got {low!r} > {high!r}")


def _positive(path: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{path}: must be positive, got {value!r}")


def _convert(value: Any, hint: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        return [_convert(item, item_hint, f"{path}[{i}]") for i, item in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if value is None or len(args) != 1:
            return value
        return _convert(value, args[0], path)  # optional: null is unset, else the type's rules
    if hint is bool:
        if type(value) is not bool:
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if type(value) is not int:
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if type(value) not in (int, float) or not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: Any, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        where = path or "config"
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else key
        if key not in known:
            raise ConfigError(f"{key_path}: unknown key (known: {', '.join(sorted(known))})")
        kwargs[key] = _convert(value, hints[key], key_path)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path or 'config'}: {exc}") from None


def config_from_dict(data: dict[str, Any]) -> ExchangeConfig:
    return _build(ExchangeConfig, data, "")


def load_config(path: str | Path | None) -> ExchangeConfig:
    """Load a JSON config file; ``None`` gives the built-in defaults."""
    if path is None:
        return ExchangeConfig()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    return config_from_dict(data)
