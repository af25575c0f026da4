"""The compiled matching core: build it with mypyc, and load it only while it matches
its sources.

The pure core (``models.py``, ``orderbook.py``, ``engine.py``, ``positions.py``,
``risk_manager.py``, ``margin_risk_manager.py``) is fully type-annotated, so mypyc can
compile the very same files to C extensions: classes become C structs, method calls
direct C calls. There is one source of truth and two builds of it; the interpreted one
is the reference, and the core test suites run against both (``make test``).

``python native_core.py build`` compiles the modules into ``build/native-<python>/``
with a manifest of the SHA-256 of each source, and puts a one-line hook
(``openmarketsim-core.pth``) into the running environment's site-packages. From then on
every interpreter of that environment calls ``install()`` at start-up, which serves the
core modules from the build directory only if every source still has the hash the build
was made from. Otherwise (a source edited since, another Python, no build, or
``OPENMARKETSIM_CORE=pure``) the ``.py`` files are imported as usual: a stale compiled
core can never run in place of the code you are looking at. The Makefile rebuilds when
a core source changes.

Pickling (journal snapshots, replay): pickle rebuilds an object by calling its class's
``__new__`` and then setting its attributes. A compiled class's ``__new__`` runs
``__init__``, so each core class whose ``__init__`` takes arguments says what to call it
with (``__getnewargs__``; placeholders are fine), and the attributes then overwrite
whatever ``__init__`` made (mypyc gives every native class a ``__getstate__`` and
``__setstate__`` over all its attributes). mypyc's ``serializable`` attribute would not
need this, but such classes come out uninitialised when interpreted code creates them.

Why a separate directory and an import hook instead of ``.so`` files next to the
sources: the current directory comes first on ``sys.path``, and an extension module
beats a ``.py`` file there, so an in-place build would silently shadow every later edit.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent
CORE_MODULES = ("models", "orderbook", "engine", "positions", "risk_manager",
                "margin_risk_manager")
# Interpreted, but the compiled code was type-checked against it: a change there
# (a field's type, say) makes the build stale too
TYPE_DEPENDENCIES = ("config",)
MANIFEST = "manifest.json"
HOOK_NAME = "openmarketsim-core.pth"
ENV_SWITCH = "OPENMARKETSIM_CORE"  # "pure": never load the compiled core

log = logging.getLogger("native_core")


def build_dir(root: Path = ROOT) -> Path:
    """One build per interpreter (``cpython-311``...): extension modules are not portable."""
    return root / "build" / f"native-{sys.implementation.cache_tag}"


def source_digests(root: Path = ROOT) -> dict[str, str]:
    return {name: hashlib.sha256((root / f"{name}.py").read_bytes()).hexdigest()
            for name in CORE_MODULES + TYPE_DEPENDENCIES}


# ======================================================================== loading


class CompiledCoreFinder(importlib.abc.MetaPathFinder):
    """Serves the modules of one build (the core and mypyc's shared runtime module)
    from its directory, ahead of everything else on ``sys.path``."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        file = self.files.get(fullname)
        if file is None:
            return None
        return importlib.util.spec_from_file_location(fullname, file)


def compiled_files(root: Path = ROOT) -> tuple[dict[str, Path] | None, str]:
    """The build's module files if it matches the sources, else ``None`` and why not."""
    directory = build_dir(root)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        return None, "not built (make native)"
    except (OSError, ValueError) as exc:
        return None, f"unreadable manifest {directory / MANIFEST}: {exc}"
    try:
        current = source_digests(root)
    except OSError as exc:
        return None, f"cannot read the core sources: {exc}"
    stale = sorted(name for name, digest in current.items()
                   if manifest.get("sources", {}).get(name) != digest)
    if stale:
        return None, f"stale: {', '.join(stale)} changed since the build (make native)"
    files = {name: directory / file for name, file in manifest.get("modules", {}).items()}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing or set(CORE_MODULES) - set(files):
        return None, f"incomplete build in {directory}"
    return files, "fresh: matches its sources"


def install(root: Path = ROOT) -> str:
    """Make the compiled core what ``import engine`` (etc.) loads, if it is fresh.

    Returns ``"compiled"``, or why the pure core stays in use. Never raises: the pure
    core is always a correct fallback. Call before any core module is imported."""
    if os.environ.get(ENV_SWITCH, "").lower() == "pure":
        return "pure (OPENMARKETSIM_CORE=pure)"
    if any(isinstance(finder, CompiledCoreFinder) for finder in sys.meta_path):
        return "compiled"
    try:
        files, why = compiled_files(root)
    except Exception as exc:  # a start-up hook must not stop the interpreter
        return f"pure (compiled core unusable: {exc!r})"
    if files is None:
        if why.startswith("stale"):
            log.warning("compiled matching core is %s; running the pure-Python core", why)
        return f"pure ({why})"
    sys.meta_path.insert(0, CompiledCoreFinder(files))
    return "compiled"


def implementation() -> str:
    """What the loaded core is: ``compiled (mypyc)`` or ``pure Python`` (for logs)."""
    import engine

    return "compiled (mypyc)" if not (engine.__file__ or "").endswith(".py") else "pure Python"


# ======================================================================== building


def _compile(root: Path, out: Path) -> dict[str, str]:
    """Compile the core with mypyc into ``out``; returns module name -> file name."""
    from mypyc.build import mypycify
    from setuptools import setup

    sources = [str(root / f"{name}.py") for name in CORE_MODULES]
    with tempfile.TemporaryDirectory(prefix="omsim-mypyc-") as temp:
        cwd = os.getcwd()
        os.chdir(temp)  # mypyc writes its C sources under ./build
        try:
            extensions = mypycify(["--ignore-missing-imports", *sources], opt_level="3")
            setup(name="openmarketsim-core", py_modules=[], packages=[],
                  ext_modules=extensions,
                  script_args=["--quiet", "build_ext", "--build-lib", str(out)])
        finally:
            os.chdir(cwd)
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    return {path.name[: -len(suffix)]: path.name for path in out.iterdir()
            if path.name.endswith(suffix)}


def write_hook(root: Path = ROOT) -> Path:
    """The ``.pth`` line that makes every interpreter of this environment call
    ``install()``: site-packages runs ``import`` lines of ``.pth`` files at start-up."""
    site = Path(sysconfig.get_paths()["purelib"])
    hook = site / HOOK_NAME
    # quiet if the checkout has moved: the start-up of every interpreter must not fail
    hook.write_text(f"{root}\nimport importlib.util as u; u.find_spec('native_core') "
                    "and __import__('native_core').install()\n")
    return hook


def build(root: Path = ROOT) -> Path:
    """Compile into a fresh directory, then swap it in: a failed build leaves none."""
    final = build_dir(root)
    final.parent.mkdir(parents=True, exist_ok=True)
    digests = source_digests(root)
    staging = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=final.parent))
    try:
        modules = _compile(root, staging)
        (staging / MANIFEST).write_text(json.dumps(
            {"python": sys.version, "sources": digests, "modules": modules}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build the compiled (mypyc) matching core, or say which core loads.",
        epilog="Set OPENMARKETSIM_CORE=pure to run the pure-Python core regardless.")
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("build", help="compile the core and install the start-up hook")
    make.add_argument("--required", action="store_true",
                      help="exit 1 if it cannot be built (default: warn, run pure Python)")
    sub.add_parser("status", help="print which core this interpreter loads, and why")
    args = parser.parse_args(argv)
    if args.command == "status":
        _, build_state = compiled_files()
        install()
        print(f"matching core: {implementation()}\nbuild: {build_state}")
        return 0
    try:
        directory = build()
    except Exception as exc:  # no compiler, no mypyc, a type error: the pure core works
        print(f"native_core: cannot build the compiled core: {exc!r}", file=sys.stderr)
        if args.required:
            return 1
        print("native_core: running on the pure-Python core", file=sys.stderr)
        return 0
    hook = write_hook()
    print(f"compiled core: {directory} (start-up hook {hook})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
