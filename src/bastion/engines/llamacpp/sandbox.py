"""A Jinja sandbox with a bound on what one render may cost.

Jinja's own sandbox stops a template from reaching Python internals but not from spending
the machine: `'x' * 10**9` allocates a gigabyte in one step, `10**10**10` runs for hours (and
Jinja folds constant expressions while compiling, so it would run when the model loads), and
two nested `range(100000)` loops spin for days without writing a character. A tenant's GGUF
brings its own template, so each of those is one upload away. Here:

- the operators that can build big values (`+ - * / // % **`) are intercepted, which also
  keeps Jinja from folding them at compile time, and refuse a result over the limits before
  computing it;
- calls (filters, `str` methods) refuse an integer argument over MAX_CALL_INT, so
  `'x'|center(10**9)` or `'x'.ljust(10**9)` cannot allocate either;
- the output is produced through `Template.generate` and counted, and a render that runs past
  its time is interrupted even inside a loop that writes nothing (an exception is raised in the
  rendering thread at its next bytecode, as a debugger would).
"""

from __future__ import annotations

import ctypes
import re
import threading
import time
from typing import Any, Callable

from jinja2 import Template
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_VALUE_CHARS = 1_000_000     # one string or list built by an operator
MAX_INT_BITS = 4096             # one integer built by an operator
MAX_CALL_INT = 100_000          # an integer argument to a filter or method (width, count)
RENDER_SECONDS = 2.0            # one whole render
MIN_OUTPUT_CHARS = 1_000_000    # a render may write this much plus 4 chars per input char

_FORMAT_WIDTH = re.compile(r"%[-+ #0]*(\d{6,}|\*)|\.(\d{6,})")


class RenderLimitError(SecurityError):
    """A template tried to spend more time or memory than one render is allowed."""


class _Interrupted(BaseException):
    """Raised asynchronously in the rendering thread at the deadline. A BaseException, so
    a template's own error handling (and Jinja's) cannot swallow it."""


def _size(value: Any) -> int | None:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else None


def _check_binop(op: str, left: Any, right: Any) -> None:
    """Refuse before computing: the point is never to allocate the result."""
    if op == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
        if abs(left) > 1 and max(1, left.bit_length() - 1) * right > MAX_INT_BITS:
            raise RenderLimitError(f"the chat template computed a number over {MAX_INT_BITS} "
                                   f"bits ({left} ** {right})")
    if op == "*":
        for seq, n in ((left, right), (right, left)):
            size = _size(seq)
            if size is not None and isinstance(n, int) and size * n > MAX_VALUE_CHARS:
                raise RenderLimitError(f"the chat template built a value over "
                                       f"{MAX_VALUE_CHARS} items ({size} x {n})")
        if isinstance(left, int) and isinstance(right, int) \
                and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise RenderLimitError(f"the chat template computed a number over {MAX_INT_BITS} "
                                   f"bits")
    if op == "+":
        a, b = _size(left), _size(right)
        if a is not None and b is not None and a + b > MAX_VALUE_CHARS:
            raise RenderLimitError(f"the chat template built a value over {MAX_VALUE_CHARS} "
                                   f"items ({a} + {b})")
    if op == "%" and isinstance(left, str) and _FORMAT_WIDTH.search(left):
        raise RenderLimitError("the chat template used a format width or precision over "
                               "100000")


def _check_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_CALL_INT:
            raise RenderLimitError(f"the chat template passed {value} to a filter or method; "
                                   f"the limit is {MAX_CALL_INT}")


def _bounded_filter(f: Callable[..., Any]) -> Callable[..., Any]:
    passed = hasattr(f, "jinja_pass_arg")  # pass_context / pass_environment / pass_eval_context
    skip = 2 if passed else 1  # the value being filtered may be any number; its arguments not

    def bounded(*args: Any, **kwargs: Any) -> Any:
        _check_args(args[skip:], kwargs)
        return f(*args, **kwargs)

    if passed:
        bounded.jinja_pass_arg = f.jinja_pass_arg  # type: ignore[attr-defined]
    return bounded


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment whose operators, filters and calls refuse huge values."""

    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})

    def __init__(self, filters: dict[str, Callable[..., Any]] | None = None,
                 **options: Any) -> None:
        """`filters`: added to (or replacing) Jinja's, bounded alike."""
        super().__init__(**options)
        self.filters = {name: _bounded_filter(f)
                        for name, f in {**self.filters, **(filters or {})}.items()}

    def call_binop(self, context: Context, op: str, left: Any, right: Any) -> Any:
        _check_binop(op, left, right)
        return self.binop_table[op](left, right)

    def call(__self, __context: Context, __obj: Any, *args: Any,  # noqa: N805
             **kwargs: Any) -> Any:
        _check_args(args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)


class _Alarm:
    """Interrupts the calling thread after `seconds` unless disarmed first."""

    def __init__(self, seconds: float) -> None:
        self._thread_id = threading.get_ident()
        self._lock = threading.Lock()
        self._armed = True
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def __enter__(self) -> "_Alarm":
        self._timer.start()
        return self

    def _fire(self) -> None:
        with self._lock:
            if self._armed:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._thread_id),
                                                           ctypes.py_object(_Interrupted))

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._armed = False
        self._timer.cancel()


def render_bounded(template: Template, variables: dict[str, Any], *, max_chars: int,
                   seconds: float = RENDER_SECONDS) -> str:
    """`template` rendered with `variables`, or RenderLimitError past `max_chars` of output or
    `seconds` of wall time."""
    started = time.monotonic()
    out: list[str] = []
    written = 0
    try:
        with _Alarm(seconds):
            for chunk in template.generate(**variables):
                written += len(chunk)
                if written > max_chars:
                    raise RenderLimitError(f"the chat template wrote over {max_chars} "
                                           f"characters")
                if time.monotonic() - started > seconds:
                    raise _Interrupted
                out.append(chunk)
    except _Interrupted:
        raise RenderLimitError(f"the chat template ran for over {seconds:g}s") from None
    return "".join(out)


def input_chars(value: Any) -> int:
    """Characters of text in a request's messages (how much output a render may fairly write)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(input_chars(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(input_chars(v) for v in value)
    return 0
