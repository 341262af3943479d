"""jitdump: ``DIRECTORY/jit-<pid>.dump``, the file ``perf inject --jit`` reads.

Format: perf's ``Documentation/jitdump-specification.txt`` (version 1 records).  A
40-byte header (magic ``JiTD``, version 1, the ELF machine, the pid, a timestamp),
then records, each a 16-byte prefix (id, total size, timestamp) and a payload:

* ``JIT_CODE_LOAD`` (0) per text as it becomes LIVE: pid, tid, address, size, a code
  index unique in the file, the NUL-terminated name and the published bytes.  A live
  patch (``update``) writes a new load record of the whole text, as the
  specification asks for changed code: perf then attributes later samples to the
  new bytes.
* ``JIT_CODE_CLOSE`` (3) when the last allocator using the file closes.

Nothing is written when a text is freed: the format has no unload record.  perf
resolves an address with the latest load record at or before a sample's time, so a
freed address that is reused is named by its new text from its publication on.
Texts never move, so there are no ``JIT_CODE_MOVE`` records.

Timestamps are ``CLOCK_MONOTONIC`` (``time.monotonic_ns``), so record with
``perf record -k 1``: perf refuses to inject otherwise.  perf finds the file through
a marker: a read+execute mapping of its first page, which ``perf record`` sees as an
executable mmap of ``jit-<pid>.dump`` (perf's ``jit_detect``).  It stays mapped while
the file is open (a ``perf record -p`` started later finds it in ``/proc/<pid>/maps``).

One file per process and directory, shared by every allocator writing there; a
forked child writes its own ``jit-<child pid>.dump`` and never touches the parent's.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from execmem._errors import ExecmemError
from execmem._locks import OwnedLock
from execmem.debuginfo._files import open_owned, write_all
from execmem.native import _libc

if TYPE_CHECKING:
    from execmem._text import JitText

MAGIC = 0x4A695444  # "JiTD" read as a little-endian uint32
VERSION = 1
JIT_CODE_LOAD, JIT_CODE_MOVE, JIT_CODE_DEBUG_INFO, JIT_CODE_CLOSE = 0, 1, 2, 3
FILE_HEADER = struct.Struct("<IIIIIIQQ")  # magic, version, total_size, elf_mach, pad1, pid, timestamp, flags
RECORD_HEADER = struct.Struct("<IIQ")  # id, total_size, timestamp
LOAD = struct.Struct("<IIQQQQ")  # pid, tid, vma, code_addr, code_size, code_index


def jitdump_path(directory: str, pid: int) -> str:
    return os.path.join(directory, f"jit-{pid}.dump")


class DumpFile:
    """One process's jitdump file in one directory (see the module docstring)."""

    def __init__(self, directory: str, elf_machine: int, *, first_index: int) -> None:
        self.pid = os.getpid()
        self.path = jitdump_path(directory, self.pid)
        self.users = 0
        self.next_index = first_index
        # Several allocators append: one record batch (one write) at a time.
        self._lock = OwnedLock("a jitdump file")
        reopening = first_index > 0  # this process wrote the file before: append to it
        if not reopening:
            # A new file, never one found there (an older process's of the same pid, or
            # a link someone planted): remove the name, then create it exclusively.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self._fd = open_owned(self.path, os.O_RDWR | (os.O_APPEND if reopening else os.O_CREAT | os.O_EXCL))
        self._sys = _libc.Syscalls()
        self._page = max(os.sysconf("SC_PAGE_SIZE"), 4096)
        try:
            if not reopening:
                header = FILE_HEADER.pack(MAGIC, VERSION, FILE_HEADER.size, elf_machine, 0, self.pid, time.monotonic_ns(), 0)
                write_all(self._fd, header, self.path)
            self._marker = self._map_marker()
        except BaseException:
            os.close(self._fd)
            if not reopening:
                os.unlink(self.path)
            raise

    def _map_marker(self) -> int:
        """The mapping perf record looks for: read+execute, never writable."""
        try:
            return self._sys.mmap(0, self._page, _libc.PROT_READ | _libc.PROT_EXEC, _libc.MAP_PRIVATE, self._fd, 0)
        except ExecmemError as exc:
            detail = f"the PROT_EXEC marker of {self.path} that perf looks for (a noexec mount?)"
            raise _libc.error("mmap", _libc.errno_of(exc) or 0, detail) from None

    def load(self, texts: Sequence[JitText]) -> None:
        """A ``JIT_CODE_LOAD`` record per text, with its current bytes, in one write."""
        pid, tid = self.pid, threading.get_native_id()
        with self._lock:
            now = time.monotonic_ns()  # under the lock: the file's order is the records' time order
            parts: list[bytes | bytearray] = []
            index = self.next_index
            for text in texts:
                name = text.name.encode() + b"\x00"
                code = text._shadow
                size = RECORD_HEADER.size + LOAD.size + len(name) + len(code)
                parts += (
                    RECORD_HEADER.pack(JIT_CODE_LOAD, size, now),
                    LOAD.pack(pid, tid, text._address, text._address, len(code), index),
                    name,
                    code,
                )
                index += 1
            write_all(self._fd, b"".join(parts), self.path)
            self.next_index = index

    def close(self) -> None:
        """The close record, then the marker and the descriptor go."""
        try:
            with self._lock:
                write_all(self._fd, RECORD_HEADER.pack(JIT_CODE_CLOSE, RECORD_HEADER.size, time.monotonic_ns()), self.path)
        finally:
            try:
                self._sys.munmap(self._marker, self._page)
            finally:
                os.close(self._fd)


#: (pid, directory) -> the open file, and the next code index of every file this
#: process has written (a file closed and opened again continues its numbering).
_open: dict[tuple[int, str], DumpFile] = {}
_indexes: dict[tuple[int, str], int] = {}
_lock = OwnedLock("the jitdump files")


def _key(directory: str) -> tuple[int, str]:
    return os.getpid(), os.path.realpath(directory)


def acquire(directory: str, elf_machine: int) -> DumpFile:
    """This process's file in ``directory``, opened on first use."""
    key = _key(directory)
    with _lock:
        dump = _open.get(key)
        if dump is None:
            dump = _open[key] = DumpFile(key[1], elf_machine, first_index=_indexes.get(key, 0))
        dump.users += 1
        return dump


def release(dump: DumpFile) -> None:
    """One user fewer; the last one closes the file."""
    key = (dump.pid, os.path.dirname(dump.path))
    with _lock:
        dump.users -= 1
        if dump.users:
            return
        del _open[key]
        _indexes[key] = dump.next_index
    dump.close()


class JitDumpSink:
    """One allocator's records in its process's jitdump file."""

    what = "jitdump"

    def __init__(self, directory: str, elf_machine: int) -> None:
        self._file: DumpFile | None = acquire(directory, elf_machine)
        self.path = self._file.path
        self._records = 0

    def published(self, texts: Sequence[JitText]) -> None:
        if self._file is not None:
            self._file.load(texts)
            self._records += len(texts)

    def patched(self, texts: Sequence[JitText]) -> None:
        self.published(texts)  # the whole text again, patched (see the module docstring)

    def freed(self, text: JitText) -> None:
        """Nothing to write: jitdump has no unload record."""

    def close(self) -> None:
        dump, self._file = self._file, None
        if dump is not None:
            release(dump)

    def describe(self) -> dict[str, object]:
        return {"path": self.path, "load_records": self._records}


__all__ = [
    "FILE_HEADER",
    "JIT_CODE_CLOSE",
    "JIT_CODE_LOAD",
    "LOAD",
    "MAGIC",
    "RECORD_HEADER",
    "DumpFile",
    "JitDumpSink",
    "acquire",
    "jitdump_path",
    "release",
]
