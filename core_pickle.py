"""How the matching core's objects pickle (journal snapshots), interpreted or compiled.

Pickle's default rebuilds an object without calling ``__init__`` and then fills in its
attributes. A class compiled by mypyc (``native_core.py``) cannot be created that way:
its constructor always runs ``__init__``. So every core class says what to construct it
with (``__getnewargs__``; placeholders are fine) and pickles its state as all of its
attributes, which ``__setstate__`` puts back over whatever ``__init__`` made.
"""

from __future__ import annotations

from typing import Any


def state_of(obj: object) -> dict[str, Any]:
    """Every attribute that is set: the compiled class lists them in ``__mypyc_attrs__``,
    the interpreted one in ``__slots__`` or its ``__dict__``."""
    cls = type(obj)
    names = getattr(cls, "__mypyc_attrs__", None) or getattr(cls, "__slots__", None)
    if names is None:
        return dict(vars(obj))
    return {name: getattr(obj, name) for name in names if hasattr(obj, name)}


def set_state(obj: object, state: dict[str, Any]) -> None:
    for name, value in state.items():
        setattr(obj, name, value)
