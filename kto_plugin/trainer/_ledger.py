"""The ledger: every change kto_plugin makes to a Trainer (and to what it holds), recorded and undone in reverse.

`KTOPlugin.attach` makes each change through one `Ledger` (attributes set, callbacks inserted, methods wrapped,
and undo steps of its own such as restoring a model's adapters), and `KTOPlugin.detach` is `Ledger.undo`. This is
the only module that assigns attributes of a Trainer. As pytest's `MonkeyPatch`, an attribute that lived in the
instance's ``__dict__`` gets its old value back and one that did not (an inherited method, say) is removed
again, so an undo never leaves a shadowing instance attribute behind.

A wrapped method's signature is checked against the one the wrapper was written for when it is wrapped: a
transformers release that renames or reorders those parameters fails at `attach()` with the version named,
instead of misbehaving during training.

Records are plain data (no closures), so a Trainer with the plugin attached pickles (Ray Tune pickles it).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any


class _NotSet:
    """The old value of an attribute that was not in the instance's ``__dict__``."""

    def __repr__(self) -> str:
        return "<notset>"

    def __reduce__(self) -> str:
        return "NOTSET"  # unpickles as this module's one instance


NOTSET = _NotSet()


class SignatureMismatch(RuntimeError):
    """A Trainer method kto_plugin wraps does not have the parameters its wrapper was written for."""


def check_signature(method: Any, expected: Sequence[str], what: str) -> None:
    """Refuse to wrap `method` unless its leading parameters are `expected` (names, in order)."""
    try:
        names = list(inspect.signature(method).parameters)
    except (TypeError, ValueError):  # a builtin or C callable: nothing to check against
        return
    if names[: len(expected)] != list(expected):
        import transformers

        raise SignatureMismatch(
            f"kto_plugin wraps Trainer.{what}{tuple(expected)}, but transformers {transformers.__version__} has "
            f"Trainer.{what}{tuple(names)}. This kto_plugin version does not support that transformers version "
            "for the setting that needs the wrapper: install a transformers version within the range "
            "kto_plugin's pyproject.toml declares, or turn that setting off."
        )


class Ledger:
    """Records changes as ``(kind, target, name, value)`` tuples; `undo` reverts them last to first."""

    def __init__(self) -> None:
        self._records: list[tuple[str, Any, Any, Any]] = []

    def __len__(self) -> int:
        return len(self._records)

    def describe(self) -> list[str]:
        """One line per change, in the order made (for logs and tests)."""
        lines = []
        for kind, target, name, _ in self._records:
            owner = type(target).__name__
            lines.append({"attr": f"{owner}.{name} set", "insert": f"{name!r} inserted into a list",
                          "call": f"undo step {owner}.{name}"}[kind])
        return lines

    # --- changes ---

    def setattr(self, target: Any, name: str, value: Any) -> None:
        """``target.name = value``, remembered: the instance's own entry (or its absence) comes back on undo."""
        own = getattr(target, "__dict__", {})
        if name in own:
            old = own[name]
        elif isinstance(inspect.getattr_static(type(target), name, None), property):
            old = getattr(target, name)  # a property's value, set back through its setter
        else:
            old = NOTSET
        self._records.append(("attr", target, name, old))
        setattr(target, name, value)

    def insert(self, items: list, index: int | None, item: Any) -> None:
        """Insert `item` into the list `items` at `index` (None: append); undo removes it again."""
        if index is None:
            items.append(item)
        else:
            items.insert(index, item)
        self._records.append(("insert", items, item, None))

    def add_callback(self, trainer: Any, callback: Any, index: int | None = None) -> None:
        """Put a `TrainerCallback` into the trainer's callback list (index 0 runs before the reporters)."""
        self.insert(trainer.callback_handler.callbacks, index, callback)

    def wrap(self, target: Any, name: str, wrapper: type, *args: Any) -> Any:
        """``target.name = wrapper(original, *args)`` after checking the original's signature against
        ``wrapper.PARAMETERS``; returns the wrapper."""
        original = getattr(target, name)
        check_signature(original, wrapper.PARAMETERS, name)
        wrapped = wrapper(original, *args)
        self.setattr(target, name, wrapped)
        return wrapped

    def on_undo(self, target: Any, method: str, *args: Any) -> None:
        """Call ``target.method(*args)`` when undoing (an undo step that is not an attribute or list change)."""
        self._records.append(("call", target, method, args))

    # --- undo ---

    def undo(self) -> None:
        """Revert every change, last first; the ledger is empty afterwards. Every step runs even if one fails,
        and the first error is raised at the end."""
        error: BaseException | None = None
        while self._records:
            kind, target, name, value = self._records.pop()
            try:
                if kind == "attr":
                    if value is NOTSET:
                        getattr(target, "__dict__", {}).pop(name, None)
                    else:
                        setattr(target, name, value)
                elif kind == "insert":
                    for i, item in enumerate(target):
                        if item is name:
                            del target[i]
                            break
                else:
                    getattr(target, name)(*value)
            except BaseException as err:  # noqa: BLE001 - finish the undo, then report
                error = error or err
        if error is not None:
            raise error
