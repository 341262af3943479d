"""The module-level API: ``execmem.jit_text_alloc`` and friends over one default
(native) allocator, created on first use; a forked child gets its own.  The
``EXECMEM_PERF_MAP``, ``EXECMEM_JITDUMP`` and ``EXECMEM_GDB`` environment variables
turn on its profiler and debugger support (``execmem.debuginfo``)."""

from __future__ import annotations

import os
from collections.abc import Iterable

from execmem import _forks, debuginfo
from execmem._allocator import Allocator
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


def jit_text_alloc(size: int, align: int = 16, *, name: str | None = None) -> JitText:
    """Reserve executable address space from the default (native) allocator."""
    return default_allocator().jit_text_alloc(size, align, name=name)


def jit_text_free(text: JitText) -> None:
    """Same as ``text.free()``."""
    if not isinstance(text, JitText):
        raise TypeError(f"expected a JitText, not {type(text).__name__}")
    text.free()


def jit_text_alloc_many(sizes: Iterable[int], align: int = 16, *, names: Iterable[str | None] | None = None) -> list[JitText]:
    """``Allocator.jit_text_alloc_many`` on the default (native) allocator."""
    return default_allocator().jit_text_alloc_many(sizes, align, names=names)


def publish(texts: Iterable[JitText], codes: Iterable[bytes] | None = None) -> None:
    """Publish texts (of one or more allocators) with one synchronization per allocator;
    ``codes`` as in ``Allocator.publish``."""
    items, payloads = Allocator._publishable(texts, codes)
    groups: dict[Allocator, tuple[list[JitText], list[bytes]]] = {}
    for i, text in enumerate(items):
        if not isinstance(text, JitText):
            raise TypeError(f"expected a JitText, not {type(text).__name__}")
        group = groups.setdefault(text.allocator, ([], []))
        group[0].append(text)
        if payloads is not None:
            group[1].append(payloads[i])
    # Every group is checked before any is published: refused input changes nothing.
    for allocator, (group_texts, group_codes) in groups.items():
        with allocator._lock:
            allocator._check()
            allocator._check_publish(group_texts, None if payloads is None else group_codes)
    for allocator, (group_texts, group_codes) in groups.items():
        allocator.publish(group_texts, None if payloads is None else group_codes)


__all__ = ["default_allocator", "jit_text_alloc", "jit_text_alloc_many", "jit_text_free", "publish"]
