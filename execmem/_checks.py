"""Argument checks of the public API (a leaf module: it imports only the errors).

Every size, offset, alignment and address argument goes through :func:`integer`,
which converts it with ``operator.index`` and returns a plain ``int``: a subclass of
``int`` that lies in its comparisons or arithmetic (``__lt__`` always False, say) is
reduced to its value before any bounds check looks at it, so it cannot slip past
one.  ``bool`` is refused, as a size of ``True`` is a bug, not a request.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

from execmem._errors import AlignmentError, SizeError


def integer(name: str, value: object) -> int:
    """``value`` as a plain ``int`` (``operator.index``); ``TypeError`` if it is none."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, not bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}") from None


def positive_size(value: object, name: str = "size") -> int:
    """A size of at least one byte, as a plain ``int``."""
    size = integer(name, value)
    if size <= 0:
        raise SizeError(f"{name} must be at least 1 byte, not {size}")
    return size


def positive_sizes(values: Iterable[object]) -> list[int]:
    """Each of ``values`` as :func:`positive_size` checks it.  A list of exact ints is
    checked as a whole (two passes in C: the hot path of a batch); anything else one by
    one, raising for the first bad one."""
    sizes = list(values)
    if set(map(type, sizes)) <= {int}:
        exact: list[int] = sizes  # type: ignore[assignment]
        if not exact or min(exact) > 0:
            return exact
    return [positive_size(size) for size in sizes]


def power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def alignment(value: object, name: str = "align") -> int:
    """A power-of-two alignment, as a plain ``int``."""
    align = integer(name, value)
    if not power_of_two(align):
        raise AlignmentError(f"{name} must be a power of two, not {align}")
    return align


def data(value: object) -> bytes:
    """A bytes-like argument as ``bytes`` (a private copy of mutable buffers)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"data must be bytes-like, not {type(value).__name__}")


__all__ = ["alignment", "data", "integer", "positive_size", "positive_sizes", "power_of_two"]
