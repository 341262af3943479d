"""Names of texts: what profilers and debuggers show for a text's address range.

A name is given at allocation (``jit_text_alloc(size, name=...)``,
``jit_text_alloc_many(sizes, names=[...])``) and read as ``JitText.name``.  A text
without one is called ``jit_<address in hex>``: still unique among live texts, and a
valid C identifier, so it can be typed in a gdb expression.

Names go into one line of a perf map, a NUL-terminated string of a jitdump record and
an ELF string table, so a name must be printable (``str.isprintable``: no newline, no
NUL, no other control character) and at most :data:`MAX_NAME` characters.  Nothing is
stored for an unnamed text: the default is made when it is read.
"""

from __future__ import annotations

from collections.abc import Iterable

from execmem._errors import BadNameError

#: Longest name accepted, in characters (V8 and perf's own tools stay far below it).
MAX_NAME = 1024


def check_name(name: object) -> str:
    """``name`` if it is an acceptable text name; ``BadNameError`` (``TypeError`` for
    a non-string) otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"a text name must be str, not {type(name).__name__}")
    if not name or len(name) > MAX_NAME or not name.isprintable():
        shown = name if len(name) <= 60 else name[:60] + "..."
        raise BadNameError(
            f"text name {shown!r} is not acceptable: it must be 1 to {MAX_NAME} printable "
            "characters (no newline, NUL or other control character)"
        )
    return name


def check_names(names: Iterable[str | None], count: int) -> list[str | None]:
    """One name (or ``None``: the default) per text of a ``jit_text_alloc_many`` call."""
    if isinstance(names, (str, bytes)):
        raise TypeError("names must be an iterable of str or None, one per size, not a single string")
    wanted = list(names)
    if len(wanted) != count:
        raise BadNameError(f"{count} sizes but {len(wanted)} names")
    return [None if name is None else check_name(name) for name in wanted]


def default_name(address: int) -> str:
    """The name of a text that was not given one."""
    return f"jit_{address:x}"


__all__ = ["MAX_NAME", "check_name", "check_names", "default_name"]
