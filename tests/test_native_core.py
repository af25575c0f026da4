"""The compiled core loads only while it matches its sources, and is the same engine.

``make test`` runs this file twice, once as built and once with
``OPENMARKETSIM_CORE=pure``; the other core suites (book, engine, positions, risk,
margin, properties) run under both as well.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import models
import native_core
from engine import Engine
from models import NewOrder, OrderType, Side, TimeInForce

ROOT = Path(__file__).resolve().parent.parent


def fake_build(root: Path, sources: dict[str, str] | None = None) -> Path:
    """A build directory whose manifest records ``sources`` (default: the real ones)."""
    for name in native_core.CORE_MODULES + native_core.TYPE_DEPENDENCIES:
        shutil.copy(ROOT / f"{name}.py", root / f"{name}.py")
    directory = native_core.build_dir(root)
    directory.mkdir(parents=True)
    modules = {}
    for name in native_core.CORE_MODULES:
        (directory / f"{name}.so").write_bytes(b"")
        modules[name] = f"{name}.so"
    digests = native_core.source_digests(root) if sources is None else sources
    (directory / native_core.MANIFEST).write_text(
        json.dumps({"sources": digests, "modules": modules}))
    return directory


def test_compiled_files_when_the_build_matches_its_sources(tmp_path: Path) -> None:
    directory = fake_build(tmp_path)
    files, why = native_core.compiled_files(tmp_path)
    assert why.startswith("fresh")
    assert files == {name: directory / f"{name}.so" for name in native_core.CORE_MODULES}


def test_compiled_files_when_a_core_source_changed_since_the_build(tmp_path: Path) -> None:
    fake_build(tmp_path)
    with open(tmp_path / "engine.py", "a") as source:
        source.write("\n# edited after the build\n")
    files, why = native_core.compiled_files(tmp_path)
    assert files is None
    assert why.startswith("stale: engine changed")


def test_compiled_files_when_a_type_dependency_changed(tmp_path: Path) -> None:
    fake_build(tmp_path)
    with open(tmp_path / "models.py", "a") as source:
        source.write("\n# a field's type may have changed\n")
    files, why = native_core.compiled_files(tmp_path)
    assert files is None and "models" in why


def test_compiled_files_when_nothing_was_built(tmp_path: Path) -> None:
    files, why = native_core.compiled_files(tmp_path)
    assert files is None and why.startswith("not built")


def test_compiled_files_when_a_module_file_is_missing(tmp_path: Path) -> None:
    directory = fake_build(tmp_path)
    (directory / "orderbook.so").unlink()
    files, why = native_core.compiled_files(tmp_path)
    assert files is None and why.startswith("incomplete build")


def test_install_when_the_build_is_stale_keeps_the_pure_core(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_build(tmp_path, sources={"engine": "0" * 64})
    monkeypatch.delenv(native_core.ENV_SWITCH, raising=False)
    finders = [finder for finder in sys.meta_path
               if not isinstance(finder, native_core.CompiledCoreFinder)]
    monkeypatch.setattr(sys, "meta_path", list(finders))
    status = native_core.install(tmp_path)
    assert status.startswith("pure (stale")
    assert sys.meta_path == finders


def _loaded_core(env: dict[str, str]) -> str:
    code = "import native_core; print(native_core.implementation())"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip()


def test_pure_switch_loads_the_python_sources() -> None:
    env = {**os.environ, native_core.ENV_SWITCH: "pure"}
    assert _loaded_core(env) == "pure Python"


def test_a_fresh_build_is_what_the_environment_loads() -> None:
    files, why = native_core.compiled_files()
    env = {k: v for k, v in os.environ.items() if k != native_core.ENV_SWITCH}
    loaded = _loaded_core(env)
    if files is None:
        # no build (no C compiler here): the pure core runs, and CI refuses this case
        assert loaded == "pure Python", why
    else:
        assert loaded == "compiled (mypyc)"


def test_both_cores_give_the_same_events_for_the_same_orders() -> None:
    """The compiled engine is the same program: a crossing stream gives byte-identical
    events and state hash in a pure-Python subprocess and in this process."""
    code = (
        "from tests.test_native_core import crossing_stream_fingerprint as f; print(f())"
    )
    env = {**os.environ, native_core.ENV_SWITCH: "pure"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == crossing_stream_fingerprint()


def test_an_engine_survives_a_pickle_round_trip() -> None:
    """Snapshots pickle the engine; a compiled class must be rebuilt through its
    constructor (``__getnewargs__``), then get every attribute back."""
    engine = Engine()
    commands = crossing_stream(engine, 200)
    for ts, command in enumerate(commands[:120]):
        engine.process(command, ts)
    assert engine.orders, "the first half leaves resting orders behind"
    copy = pickle.loads(pickle.dumps(engine, pickle.HIGHEST_PROTOCOL))
    assert copy.state_hash() == engine.state_hash()
    for ts, command in enumerate(commands[120:], start=120):
        assert repr(copy.process(command, ts)) == repr(engine.process(command, ts))
    assert copy.state_hash() == engine.state_hash()


def crossing_stream(engine: Engine, n: int) -> list[NewOrder]:
    symbol = engine.symbols[0]
    reference = engine.reference_price(symbol)
    commands = []
    for i in range(n):
        side = Side.BUY if i % 3 else Side.SELL
        price = reference + (i % 7) - 3
        order_type = OrderType.MARKET if i % 11 == 0 else OrderType.LIMIT
        tif = TimeInForce.IOC if order_type is OrderType.MARKET else TimeInForce.GTC
        commands.append(NewOrder(
            f"T{i % 5}", f"c{i}", symbol, side, order_type, 1 + i % 4,
            None if order_type is OrderType.MARKET else price, tif=tif))
    return commands


def crossing_stream_fingerprint() -> str:
    engine = Engine()
    lines = []
    for i, command in enumerate(crossing_stream(engine, 200)):
        lines.extend(repr(event) for event in engine.process(command, i))
    lines.append(engine.state_hash())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


COMMANDS = ("NewOrder", "CancelOrder", "AmendOrder", "CancelAll", "SetMarketOpen")


@functools.cache
def _source_annotations() -> dict[str, dict[str, str]]:
    """Each event's field annotations as written in models.py (the compiled module's
    dataclass fields carry erased types), from a private interpreted copy."""
    spec = importlib.util.spec_from_file_location("_models_source", ROOT / "models.py")
    assert spec is not None and spec.loader is not None
    source = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = source  # dataclasses looks its module up there
    try:
        spec.loader.exec_module(source)
    finally:
        del sys.modules[spec.name]
    classes = [*source.EVENT_TYPE_NAMES, *(getattr(source, name) for name in COMMANDS)]
    return {cls.__name__: {field.name: str(field.type) for field in dataclasses.fields(cls)}
            for cls in classes}


def _sample_fields(cls: type) -> dict[str, object]:
    """A distinct, well-typed value for every field of an event class."""
    annotations = _source_annotations()[cls.__name__]
    values: dict[str, object] = {}
    for number, (name, hint) in enumerate(annotations.items(), start=1):
        kind = hint.removesuffix(" | None")
        if kind == "int":
            values[name] = 1_000 + number
        elif kind == "str":
            values[name] = f"v{number}"
        elif kind == "bool":
            values[name] = number % 2 == 0
        else:
            members = list(getattr(models, kind))
            values[name] = members[number % len(members)]
    return values


@pytest.mark.parametrize(
    "cls", [*models.EVENT_TYPE_NAMES, *(getattr(models, name) for name in COMMANDS)],
    ids=lambda cls: cls.__name__)
def test_every_record_constructor_takes_its_fields_in_order(cls: type) -> None:
    """Commands and events spell out ``__init__`` so the compiled build compiles it; it
    must take exactly the dataclass fields, in order, with their defaults (and
    ``models.FIELD_NAMES``, which the journal and the wire read, lists them in order)."""
    values = _sample_fields(cls)
    by_position = cls(*values.values())
    assert by_position == cls(**values)
    assert {name: getattr(by_position, name) for name in values} == values
    required = {field.name: values[field.name] for field in dataclasses.fields(cls)
                if field.default is dataclasses.MISSING}
    defaults = cls(**required)
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            assert getattr(defaults, field.name) == field.default
    assert pickle.loads(pickle.dumps(by_position, pickle.HIGHEST_PROTOCOL)) == by_position
    assert models.FIELD_NAMES[cls] == tuple(values)
