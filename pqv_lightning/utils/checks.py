"""One way to check an argument: its type and range, and one message form when it is wrong.

Every spec, config and callback of pqv-lightning checks its arguments with these functions, so every bad value is
reported the same way, naming the argument, the value and what is accepted::

    ratio=1.5 is invalid; accepted: a float in [0, 1).
    formats[0]='tflite' is invalid; accepted: torchscript, lite, executorch, onnx.

The error is :class:`InvalidArgumentError`, both a ``ValueError`` and a ``TypeError`` (like numpy's ``AxisError``
is both a ``ValueError`` and an ``IndexError``): a bad type and a bad value are the same mistake to the user, and
code that catches either keeps working.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = [
    "InvalidArgumentError",
    "check_bool",
    "check_callable",
    "check_choice",
    "check_choices",
    "check_identifier",
    "check_int",
    "check_number",
    "invalid",
]


class InvalidArgumentError(ValueError, TypeError):
    """An argument of the wrong type or out of range; the message names it, its value and what is accepted."""


def invalid(name: str, value: Any, accepted: str) -> InvalidArgumentError:
    """The error for ``name=value``, in the one message form (raise it)."""
    return InvalidArgumentError(f"{name}={value!r} is invalid; accepted: {accepted}.")


def _interval(minimum: float | None, maximum: float | None, min_open: bool, max_open: bool) -> str:
    if minimum is not None and maximum is not None:
        return f"in {'(' if min_open else '['}{minimum:g}, {maximum:g}{')' if max_open else ']'}"
    if minimum is not None:
        return f"{'>' if min_open else '>='} {minimum:g}"
    if maximum is not None:
        return f"{'<' if max_open else '<='} {maximum:g}"
    return ""


def _or_none(text: str, allow_none: bool) -> str:
    return f"None or {text}" if allow_none else text


def check_number(
    name: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    min_open: bool = False,
    max_open: bool = False,
    allow_none: bool = False,
    accepted: str | None = None,
    integer: bool = False,
) -> float | int | None:
    """``value`` as a finite ``float`` (an ``int`` with ``integer``) within the bounds (``min_open``/``max_open``
    exclude them; ``None`` passes with ``allow_none``); bools, NaN and infinities are refused."""
    if value is None and allow_none:
        return None
    kind = numbers.Integral if integer else numbers.Real
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        below = minimum is not None and (value <= minimum if min_open else value < minimum)
        above = maximum is not None and (value >= maximum if max_open else value > maximum)
        ok = not (below or above)
    if not ok:
        what = "an int" if integer else "a number" if maximum is not None and minimum is not None else "a finite number"
        bounds = _interval(minimum, maximum, min_open, max_open)
        raise invalid(name, value, accepted or _or_none(f"{what} {bounds}".rstrip(), allow_none))
    return int(value) if integer else float(value)


def check_int(
    name: str, value: Any, minimum: int | None = None, maximum: int | None = None, **options: Any
) -> int | None:
    """``value`` as an ``int`` in ``[minimum, maximum]``; bools are refused. ``options``: ``allow_none`` (``None``
    passes), ``accepted`` (the text of the message), as for :func:`check_number`."""
    return check_number(name, value, minimum, maximum, integer=True, **options)


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False`` (not a truthy string or number)."""
    if not isinstance(value, bool):
        raise invalid(name, value, "True or False")
    return value


def _listed(choices: Iterable[Any]) -> str:
    return ", ".join(str(c) for c in choices)


def check_choice(name: str, value: Any, choices: Sequence[Any], *, allow_none: bool = False) -> Any:
    """``value`` if it is one of ``choices``."""
    if value is None and allow_none:
        return None
    if value not in choices:
        raise invalid(name, value, _or_none(f"{_listed(choices)}", allow_none))
    return value


def check_choices(name: str, values: Any, choices: Sequence[Any], *, allow_empty: bool = False) -> tuple[Any, ...]:
    """``values`` (a sequence, or one value) as a de-duplicated tuple of members of ``choices``.

    A bad member is reported as ``name[i]=value``; an empty sequence is refused unless ``allow_empty``.
    """
    if isinstance(values, str) or not isinstance(values, Iterable):
        values = [values]
    values = list(values)
    for i, value in enumerate(values):
        if value not in choices:
            raise invalid(f"{name}[{i}]", value, _listed(choices))
    if not values and not allow_empty:
        raise invalid(name, values, f"one or more of {_listed(choices)}")
    return tuple(dict.fromkeys(values))


def check_identifier(name: str, value: Any, what: str = "an attribute name") -> str:
    """``value`` if it is a Python identifier (e.g. the LightningModule attribute holding the timm model)."""
    if not isinstance(value, str) or not value.isidentifier():
        raise invalid(name, value, what)
    return value


def check_callable(name: str, value: Any, what: str) -> Callable:
    """``value`` if it is callable (``what`` says which call, e.g. ``"a callable loss(logits, labels)"``)."""
    if not callable(value):
        raise invalid(name, value, what)
    return value
