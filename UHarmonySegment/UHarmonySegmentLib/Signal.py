"""A plain-Python signal: Qt-like connect/emit without Qt, safe to use from Slicer's Python and tests.

(PythonQt cannot declare new Qt signals on Python classes; a small callback list does the job.)
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Callable


class Signal:
    """Connect callables, emit to all of them in connection order.

    An exception in one slot is logged and does not stop the others (one broken display must not
    keep the logic from cleaning up); set ``raise_errors=True`` to propagate instead (tests).
    """

    def __init__(self, *type_info: Any, raise_errors: bool = False):
        self._ids = itertools.count()
        self._slots: dict[int, Callable[..., Any]] = {}
        self._type_info = type_info
        self._blocked = False
        self.raise_errors = raise_errors

    def connect(self, slot: Callable[..., Any]) -> int:
        if not callable(slot):
            raise TypeError("a slot must be callable")
        connection = next(self._ids)
        self._slots[connection] = slot
        return connection

    def disconnect(self, connection: int) -> bool:
        return self._slots.pop(connection, None) is not None

    def disconnect_all(self) -> None:
        self._slots.clear()

    def block(self, blocked: bool = True) -> None:
        self._blocked = blocked

    def __len__(self) -> int:
        return len(self._slots)

    def emit(self, *args: Any, **kwargs: Any) -> None:
        if self._blocked:
            return
        for slot in list(self._slots.values()):
            try:
                slot(*args, **kwargs)
            except Exception:
                if self.raise_errors:
                    raise
                logging.exception("UHarmony: a signal handler failed")

    __call__ = emit
