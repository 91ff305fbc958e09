"""Logging inside the step never blocks capture.

Dynamo refuses `logger.info(...)`, `warnings.warn(...)` and the `logging` module's
functions inside a traced function: a graph break, and a compiled step is one graph.
While `capturing()` is active, each such call instead

- runs once, at capture, when its arguments are constants (a message, a number, a
  shape): transformers' `logger.warning_once(...)` prints as it would eagerly, and a
  warning keeps the line that raised it;
- is dropped when an argument is a tensor, whose value exists only when the graph runs.

Either way the compiled step does not repeat it, and `LORDO_LOGS=graphs` notes each
call with its line. A `logging.Logger` method counts as logging when it is one of the
stdlib's emitting methods or a library added it (transformers' `warning_once`,
`info_once`); any other Logger method is left to dynamo.

Dynamo has no hook for this: `config.ignore_logging_functions` drops calls silently, so
while capturing, its handlers of Logger methods and ignored functions are wrapped.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.fx as fx
from torch._dynamo.variables import ConstantVariable
from torch._dynamo.variables.misc import IgnoredFunctionVariable, LoggingLoggerVariable

_LOGGER_METHODS = frozenset({"debug", "info", "warning", "warn", "error", "exception", "critical", "fatal", "log"})
_FUNCTIONS: dict[Callable, str] = {
    warnings.warn: "warnings.warn",
    **{getattr(logging, name): f"logging.{name}"
       for name in ("debug", "info", "warning", "error", "exception", "critical", "log")},
}


@dataclass(frozen=True)
class LoggingCall:
    """One logging call met while tracing the step."""

    where: str
    call: str
    ran: bool

    def note(self) -> str:
        if self.ran:
            return f"{self.where}: {self.call}(...) ran once, at capture; the compiled step does not repeat it"
        return (f"{self.where}: {self.call}(...) dropped: it reads a tensor, whose value exists only inside the "
                "graph; return the value from the step and log it there")


_CALLS: "weakref.WeakKeyDictionary[fx.Graph, list[LoggingCall]]" = weakref.WeakKeyDictionary()


def take_recorded(graph: fx.Graph) -> list[LoggingCall]:
    """The logging calls the trace of `graph` met, in order."""
    return _CALLS.pop(graph, [])


@contextlib.contextmanager
def capturing() -> Iterator[None]:
    """While active, dynamo runs logging calls once or drops them (see the module docstring)."""
    logger_method, ignored_function = LoggingLoggerVariable.call_method, IgnoredFunctionVariable.call_function
    # A trace that restarts meets each call again; it runs once per capture all the same.
    ran: set[tuple] = set()

    def call_method(self, tx, name, args, kwargs):
        if not _is_logging(self.value, name):
            return logger_method(self, tx, name, args, kwargs)
        return _run_or_drop(tx, getattr(self.value, name), f"logger {self.value.name!r}.{name}", args, kwargs, ran)

    def call_function(self, tx, args, kwargs):
        if self.value not in _FUNCTIONS:
            return ignored_function(self, tx, args, kwargs)
        function = _warn_at(tx) if self.value is warnings.warn else self.value
        return _run_or_drop(tx, function, _FUNCTIONS[self.value], args, kwargs, ran)

    # In place, not config.patch: this runs around every call, and a patch measured ~250 us to ~5 us.
    ignored = torch._dynamo.config.ignore_logging_functions
    added = [function for function in _FUNCTIONS if function not in ignored]
    ignored.update(added)
    LoggingLoggerVariable.call_method, IgnoredFunctionVariable.call_function = call_method, call_function
    try:
        yield
    finally:
        LoggingLoggerVariable.call_method, IgnoredFunctionVariable.call_function = logger_method, ignored_function
        ignored.difference_update(added)


def _is_logging(logger: logging.Logger, name: str) -> bool:
    if name in _LOGGER_METHODS:
        return True
    # A method a library put on Logger: transformers' warning_once is an lru_cache'd function.
    method = getattr(type(logger), name, None)
    return callable(method) and getattr(method, "__module__", "logging") != "logging"


def _run_or_drop(tx, function: Callable, label: str, args: list, kwargs: dict, ran: set[tuple]) -> ConstantVariable:
    where = f"{tx.f_code.co_filename}:{tx.lineno}"
    constant = all(value.is_python_constant() for value in [*args, *kwargs.values()])
    if constant:
        values = [value.as_python_constant() for value in args]
        named = {key: value.as_python_constant() for key, value in kwargs.items()}
        key = (where, label, repr(values), repr(named))
        if key not in ran:
            ran.add(key)
            function(*values, **named)
    _CALLS.setdefault(tx.output.graph, []).append(LoggingCall(where, label, constant))
    return ConstantVariable.create(None)


def _warn_at(tx) -> Callable:
    """`warnings.warn`, attributed to the traced line (and its callers, by stacklevel) as eagerly."""

    def warn(message, category=None, stacklevel=1, source=None):
        frame = tx
        for _ in range(stacklevel - 1):
            frame = getattr(frame, "parent", None) or frame
        if isinstance(message, Warning):
            category = type(message)
        scope = frame.f_globals
        warnings.warn_explicit(message, category or UserWarning, frame.f_code.co_filename, frame.lineno,
                               module=scope.get("__name__"), registry=scope.setdefault("__warningregistry__", {}),
                               module_globals=scope, source=source)

    return warn
