"""The module-level API: ``execmem.jit_text_alloc`` and friends over one default
(native) allocator, created on first use; a forked child gets its own.  The
``EXECMEM_PERF_MAP``, ``EXECMEM_JITDUMP`` and ``EXECMEM_GDB`` environment variables
turn on its profiler and debugger support (``execmem.debuginfo``)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from execmem import _forks, debuginfo
from execmem._allocator import Allocator
from execmem._data import JitData
from execmem._errors import BadStateError
from execmem._gates import JitFunction
from execmem._locks import OwnedLock
from execmem._text import JitText

_default: Allocator | None = None
_default_lock = OwnedLock("execmem.default_allocator")


def default_allocator() -> Allocator:
    """The allocator behind ``execmem.jit_text_alloc`` (native, created on first use;
    a forked child gets its own)."""
    global _default
    with _default_lock:
        if _default is None or _default._closed or _default._generation != _forks.generation:
            _default = Allocator(**debuginfo.options_from_env(os.environ))
        return _default


def jit_text_alloc(size: int, align: int = 16, *, name: str | None = None, near: int | None = None) -> JitText:
    """Reserve executable address space from the default (native) allocator."""
    return default_allocator().jit_text_alloc(size, align, name=name, near=near)


def jit_text_free(text: JitText) -> None:
    """Same as ``text.free()``."""
    if not isinstance(text, JitText):
        raise TypeError(f"expected a JitText, not {type(text).__name__}")
    text.free()


def jit_text_alloc_many(
    sizes: Iterable[int], align: int = 16, *, names: Iterable[str | None] | None = None, near: int | None = None
) -> list[JitText]:
    """``Allocator.jit_text_alloc_many`` on the default (native) allocator."""
    return default_allocator().jit_text_alloc_many(sizes, align, names=names, near=near)


def jit_data_alloc(size: int, *, near: int | None = None, align: int = 16) -> JitData:
    """``Allocator.jit_data_alloc`` on the default (native) allocator."""
    return default_allocator().jit_data_alloc(size, near=near, align=align)


def compile_function(
    source: str,
    restype: Any = None,
    argtypes: Sequence[Any] = (),
    *,
    name: str | None = None,
    arch: str | None = None,
    near: int | None = None,
    syntax: str | None = None,
    symbols: Mapping[str, int] | None = None,
) -> JitFunction:
    """``Allocator.compile_function`` on the default (native) allocator: the one-liner
    ``f = execmem.compile_function("mov eax, 42; ret", ctypes.c_int)``."""
    return default_allocator().compile_function(
        source, restype, argtypes, name=name, arch=arch, near=near, syntax=syntax, symbols=symbols
    )


def publish(texts: Iterable[JitText], codes: Iterable[bytes] | None = None) -> None:
    """``Allocator.publish`` on the allocator the texts belong to (one synchronization;
    ``codes`` as there).  Texts of several allocators are refused up front
    (``BadStateError``): publishing them could not be all-or-nothing, since each
    allocator synchronizes on its own."""
    items = list(texts)
    for text in items:
        if not isinstance(text, JitText):
            raise TypeError(f"expected a JitText, not {type(text).__name__}")
    owners = {id(text._allocator): text._allocator for text in items}
    if len(owners) > 1:
        raise BadStateError(
            f"publish: the texts belong to {len(owners)} allocators; publish each allocator's texts with "
            "its own publish() (or batch()), which is all-or-nothing for that allocator"
        )
    if owners:
        next(iter(owners.values())).publish(items, codes)
    elif codes is not None:
        Allocator._publishable(items, codes)  # a length mismatch is still an error


def sync_code(address: int, length: int) -> None:
    """``Allocator.sync_code`` on the default (native) allocator: the host's publish
    recipe over code that another library wrote at ``[address, address+length)``."""
    default_allocator().sync_code(address, length)


def serialize_all_threads() -> None:
    """``Allocator.serialize_all_threads`` on the default (native) allocator."""
    default_allocator().serialize_all_threads()


__all__ = [
    "compile_function",
    "default_allocator",
    "jit_data_alloc",
    "jit_text_alloc",
    "jit_text_alloc_many",
    "jit_text_free",
    "publish",
    "serialize_all_threads",
    "sync_code",
]
