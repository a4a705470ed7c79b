"""How the monitor hosts its parts: one small interface and one error guard.

The monitor's parts are the indicators, the probe runner, the alert engine and each sink.
The monitor calls them only through a `Component` (the part's name and object), and every
call goes through the one `ErrorGuard`: an exception is reported once (a log line with
the traceback, the store's events table, the `fineline/internal_error` metrics) and the
part is disabled; training goes on. `strict=True` raises instead (tests and CI). A part
that is disabled, or was never built, answers every call with the call's default, so the
monitor's loop reads the same whichever parts are there.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any, Callable, Dict, Optional, Tuple

log = logging.getLogger("fineline_monitor")


class ErrorGuard:
    """Isolates the monitor's parts from the training loop and from each other.

    `run(part, fn)` calls `fn`; if it raises, the error is reported and `part` disabled.
    `report` and `disable` are the two halves, for the places where a failure must first
    be agreed on by every rank before the part is disabled (probe rounds, budgets).
    """

    def __init__(
        self,
        strict: bool = False,
        on_first_error: Optional[Callable[[str, BaseException], None]] = None,
    ):
        self.strict = strict
        self.disabled: Dict[str, str] = {}  # part -> why
        self.error_counts: Dict[str, int] = {}
        self._on_first_error = on_first_error

    def running(self, part: str) -> bool:
        return part not in self.disabled

    def run(
        self, part: str, fn: Callable[[], Any], default: Any = None, fatal: Tuple[type, ...] = ()
    ) -> Any:
        """`fn()`, or `default` when `part` is disabled or `fn` raised. Exceptions of a
        `fatal` type (the user's setting or file to fix) propagate."""
        if part in self.disabled:
            return default
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - isolation is the point
            if self.strict or isinstance(e, fatal):
                raise
            self.report(part, e)
            self.disable(part, f"{type(e).__name__}: {e}")
            return default

    def report(self, part: str, e: BaseException) -> None:
        """Count an error of `part`; the first one is logged with its traceback (not one line
        per step of a part that keeps failing)."""
        if self.strict:
            raise e
        self.error_counts[part] = self.error_counts.get(part, 0) + 1
        if self.error_counts[part] > 1:
            return
        log.error(
            "fineline_monitor: %s failed and is disabled; training continues.\n%s",
            part,
            "".join(traceback.format_exception(type(e), e, e.__traceback__)).rstrip(),
        )
        if self._on_first_error is not None:
            try:
                self._on_first_error(part, e)
            except Exception:  # noqa: BLE001 - the store itself may be what failed
                pass

    def disable(self, part: str, why: str) -> None:
        self.disabled.setdefault(part, why)


class Component:
    """One part the monitor hosts: its name (the name errors and disabling use) and its
    object, possibly None (not built, or not on this rank). Every hook is optional:
    `call` on a missing method returns the default, like a hook the part does not take."""

    __slots__ = ("name", "obj", "guard")

    def __init__(self, name: str, obj: Any, guard: ErrorGuard):
        self.name = name
        self.obj = obj
        self.guard = guard

    @property
    def running(self) -> bool:
        """Built and not disabled."""
        return self.obj is not None and self.guard.running(self.name)

    def has(self, method: str) -> bool:
        return self.obj is not None and callable(getattr(self.obj, method, None))

    def call(self, method: str, *args: Any, default: Any = None, **kwargs: Any) -> Any:
        """`obj.method(*args, **kwargs)` through the guard; `default` when the part is not
        running, lacks the method, or raised (then it is disabled)."""
        if not self.has(method):
            return default  # not built here, or a hook this part does not take

        # the guard answers `default` for a disabled part; the method is looked up at call
        # time: a part's methods may be replaced (tests inject faults so)
        def hook() -> Any:
            return getattr(self.obj, method)(*args, **kwargs)

        return self.guard.run(self.name, hook, default)


class Hosted:
    """`monitor.indicators`, `monitor.probes`, `monitor.engine`: the object of one of the
    monitor's components, read and assigned like a plain attribute."""

    def __init__(self, part: str):
        self.part = part

    def __get__(self, monitor: Any, owner: Any = None) -> Any:
        return self if monitor is None else monitor._parts[self.part].obj

    def __set__(self, monitor: Any, obj: Any) -> None:
        monitor._parts[self.part].obj = obj
