"""The two baselines the benchmark compares execmem with, both what Python JITs do.

:class:`BaselineJit` (``baseline``, "naive"): one anonymous ``mmap`` per function
(read+write), the code copied in, then ``mprotect(PROT_READ | PROT_EXEC)``; ``munmap``
on free.  It is what most mmap+ctypes recipes do once they stop mapping RWX.

:class:`RwxBump` (``rwx-bump``, "the floor"): one read+write+execute mapping made
once, a bump pointer, one ``memmove`` per function, nothing on free (a bump pointer
never reuses memory).  What quick Python JIT hacks do; nothing can be cheaper per
function, and it gives up W^X entirely.

Both go to libc through ``ctypes`` directly - nothing of execmem is used - and count
their own system calls.  Both are **unsafe** for other threads: nothing makes a thread
that may run the code take a serializing / context-synchronization event, and on arm64
nothing does cache maintenance for anonymous memory (the kernel cleans and invalidates
caches only for pages it maps itself, seeds/004), so the I-cache may still hold stale
lines.  The benchmark does not add what they lack; it says so.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections import Counter

from execmem._errors import SystemCallError
from execmem._ranges import coalesce

PROT_READ, PROT_WRITE, PROT_EXEC = 0x1, 0x2, 0x4
MAP_PRIVATE, MAP_ANONYMOUS = 0x02, 0x20
MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_mprotect = _libc.mprotect
_mprotect.restype = ctypes.c_int
_mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def _fail(call: str) -> SystemCallError:
    err = ctypes.get_errno()
    return SystemCallError(err, f"baseline {call} failed: {os.strerror(err)}")


class BaselineJit:
    """mmap + write + mprotect per function; counts its system calls in ``syscalls``."""

    def __init__(self) -> None:
        self.page = mmap.PAGESIZE
        self.syscalls: Counter[str] = Counter()
        self.live: dict[int, int] = {}  # address -> mapped length

    def publish(self, code: bytes) -> int:
        """Map ``code`` read+execute at a fresh address and return it."""
        length = -(-len(code) // self.page) * self.page
        address = _mmap(None, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        self.syscalls["mmap"] += 1
        if address is None or address == MAP_FAILED:
            raise _fail("mmap")
        ctypes.memmove(address, code, len(code))
        self.syscalls["mprotect"] += 1
        if _mprotect(address, length, PROT_READ | PROT_EXEC) != 0:
            error = _fail("mprotect")
            _munmap(address, length)
            raise error
        self.live[address] = length
        return int(address)

    def free(self, address: int) -> None:
        length = self.live.pop(address)
        self.syscalls["munmap"] += 1
        if _munmap(address, length) != 0:
            raise _fail("munmap")

    def ranges(self) -> list[tuple[int, int]]:
        """What this baseline has mapped, adjacent mappings coalesced."""
        return coalesce(self.live.items())

    def close(self) -> None:
        for address in list(self.live):
            self.free(address)


class RwxBump:
    """One RWX mapping of ``capacity`` bytes (made here, not timed), a bump pointer,
    functions 16-byte aligned; ``free`` does nothing."""

    def __init__(self, capacity: int) -> None:
        page = mmap.PAGESIZE
        self.size = max(page, -(-capacity // page) * page)
        self.syscalls: Counter[str] = Counter({"mmap": 1})
        address = _mmap(None, self.size, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        if address is None or address == MAP_FAILED:
            raise _fail("mmap")
        self.base = self.top = int(address)

    def publish(self, code: bytes) -> int:
        """Copy ``code`` at the bump pointer and return its address."""
        address = self.top
        if address + len(code) > self.base + self.size:
            raise SystemCallError(12, "baseline rwx-bump mapping is full")  # ENOMEM
        ctypes.memmove(address, code, len(code))
        self.top = address + (len(code) + 15) // 16 * 16
        return address

    def free(self, address: int) -> None:
        """Nothing: a bump pointer never reuses memory."""

    def ranges(self) -> list[tuple[int, int]]:
        return [(self.base, self.size)]

    def close(self) -> None:
        if self.base:
            _munmap(self.base, self.size)
            self.base = 0


__all__ = ["BaselineJit", "RwxBump"]
