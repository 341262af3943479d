"""GDB's JIT compilation interface (GDB manual, "JIT Compilation Interface").

GDB finds ``__jit_debug_register_code`` and ``__jit_debug_descriptor`` by symbol
name in the objects the process has loaded, puts a breakpoint on the function, and
when it fires reads the descriptor: an action (register or unregister) and the
entry it concerns, an in-memory ELF "symbol file".  On attach it walks the
descriptor's list instead, so the list always holds every registered entry.

Python defines no such symbols, so :class:`Interface` writes the tiny shared object
of ``_elf.shared_object`` into a memfd (a temporary file where memfds cannot be
executable) and loads it with ``ctypes`` as ``/proc/<pid>/fd/<fd>``: a path that
names the same file from GDB's process too, which reads the object's symbols there.
One interface per process, made on first use; every allocator with ``gdb=True``
shares it.  A forked child keeps it: the object, the list and the parent's texts are
all copied into the child.

:class:`GdbSink` registers one symbol file per published text (``_elf.symbol_file``:
the text's name over its address range) and unregisters it when the text is freed.
"""

from __future__ import annotations

import ctypes
import errno
import os
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING

from execmem._errors import ExecmemError, UnsupportedError
from execmem._locks import OwnedLock, SetupLock
from execmem.arch import ElfIdentity
from execmem.debuginfo import _elf
from execmem.native import _libc

if TYPE_CHECKING:
    from execmem._text import JitText

#: jit_actions_t
JIT_NOACTION, JIT_REGISTER_FN, JIT_UNREGISTER_FN = 0, 1, 2


class CodeEntry(ctypes.Structure):
    """struct jit_code_entry (pointers as integers: every entry is one of ours)."""

    _fields_ = (
        ("next_entry", ctypes.c_void_p),
        ("prev_entry", ctypes.c_void_p),
        ("symfile_addr", ctypes.c_void_p),
        ("symfile_size", ctypes.c_uint64),
    )


class Descriptor(ctypes.Structure):
    """struct jit_descriptor."""

    _fields_ = (
        ("version", ctypes.c_uint32),
        ("action_flag", ctypes.c_uint32),
        ("relevant_entry", ctypes.c_void_p),
        ("first_entry", ctypes.c_void_p),
    )


def _memfd() -> int:
    sys_ = _libc.Syscalls()
    try:  # MFD_EXEC (Linux 6.3): executable even under vm.memfd_noexec=1
        return sys_.memfd_create(b"execmem-gdbjit", _libc.MFD_CLOEXEC | _libc.MFD_EXEC)
    except ExecmemError as exc:
        if _libc.errno_of(exc) != errno.EINVAL:
            raise
        return sys_.memfd_create(b"execmem-gdbjit", _libc.MFD_CLOEXEC)


def _temp_file() -> int:
    fd, path = tempfile.mkstemp(prefix="execmem-gdbjit-", suffix=".so")
    os.unlink(path)  # the descriptor keeps it, /proc/<pid>/fd/<fd> names it
    return fd


class Interface:
    """The process's ``__jit_debug_descriptor`` and the entries linked into it."""

    def __init__(self, elf: ElfIdentity) -> None:
        image = _elf.shared_object(elf, max(os.sysconf("SC_PAGE_SIZE"), 4096))
        refused: list[str] = []
        # Where the object may live, best first (as the dual-mapping backing falls
        # back): an executable memfd, then an unlinked file in the temp dir.
        for kind, make in (("memfd", _memfd), (f"a file in {tempfile.gettempdir()}", _temp_file)):
            try:
                fd = make()
            except (OSError, ExecmemError) as exc:
                refused.append(f"{kind}: {exc}")
                continue
            path = f"/proc/{os.getpid()}/fd/{fd}"
            try:
                os.pwrite(fd, image, 0)
                library = ctypes.CDLL(path)  # dlopen: noexec mounts refuse here
            except OSError as exc:
                os.close(fd)
                refused.append(f"{kind}: {exc}")
                continue
            break
        else:
            raise UnsupportedError("cannot load the GDB JIT interface object: " + "; ".join(refused))
        self._fd, self.path = fd, path
        self._descriptor = Descriptor.in_dll(library, _elf.DESCRIPTOR)
        self._notify = ctypes.CFUNCTYPE(None)((_elf.REGISTER_CODE, library))
        self._library = library  # never unloaded: GDB may hold a breakpoint in it
        #: Entry address -> (entry, symbol file): keeps both alive while GDB may read them.
        self._entries: dict[int, tuple[CodeEntry, ctypes.Array[ctypes.c_char]]] = {}
        # Linking and unlinking take several stores: re-entry (a signal handler
        # publishing) must not interleave with them.
        self._lock = OwnedLock("the GDB JIT descriptor")

    def register(self, symfile: bytes) -> int:
        """Link a new entry for ``symfile`` at the head of the list and tell GDB."""
        buffer = ctypes.create_string_buffer(symfile, len(symfile))
        entry = CodeEntry(None, None, ctypes.addressof(buffer), len(symfile))
        address = ctypes.addressof(entry)
        with self._lock:
            head = self._descriptor.first_entry
            entry.next_entry = head
            if head:
                self._entries[head][0].prev_entry = address
            self._entries[address] = (entry, buffer)
            self._descriptor.first_entry = address
            self._announce(JIT_REGISTER_FN, address)
        return address

    def unregister(self, address: int) -> None:
        """Unlink the entry registered as ``address`` and tell GDB (GDB manual,
        "Unregistering Code": unlink first, then point relevant_entry at it)."""
        with self._lock:
            entry, _ = self._entries[address]
            before, after = entry.prev_entry, entry.next_entry
            if before:
                self._entries[before][0].next_entry = after
            else:
                self._descriptor.first_entry = after
            if after:
                self._entries[after][0].prev_entry = before
            self._announce(JIT_UNREGISTER_FN, address)
            del self._entries[address]

    def _announce(self, action: int, address: int) -> None:
        self._descriptor.relevant_entry = address
        self._descriptor.action_flag = action
        self._notify()  # GDB, when attached, stops here and reads the descriptor
        self._descriptor.action_flag = JIT_NOACTION


_interface: Interface | None = None
_interface_lock = SetupLock("the GDB JIT interface")


def interface(elf: ElfIdentity) -> Interface:
    """The process's interface, loaded on first use."""
    global _interface
    with _interface_lock:
        if _interface is None:
            _interface = Interface(elf)
        return _interface


class GdbSink:
    """One allocator's texts registered with GDB (see the module docstring)."""

    what = "gdb"

    def __init__(self, elf: ElfIdentity) -> None:
        self._elf = elf
        self._interface = interface(elf)
        self._entries: dict[JitText, int] = {}

    def published(self, texts: Sequence[JitText]) -> None:
        elf, register, entries = self._elf, self._interface.register, self._entries
        for text in texts:
            entries[text] = register(_elf.symbol_file(elf, text._address, text._size, text.name))

    def patched(self, texts: Sequence[JitText]) -> None:
        """Nothing to do: a live patch keeps the text's name and range."""

    def freed(self, text: JitText) -> None:
        entry = self._entries.pop(text, None)
        if entry is not None:
            self._interface.unregister(entry)

    def close(self) -> None:
        entries, self._entries = self._entries, {}
        for entry in entries.values():
            self._interface.unregister(entry)

    def describe(self) -> dict[str, object]:
        return {"registered": len(self._entries), "object": self._interface.path}


__all__ = ["CodeEntry", "Descriptor", "GdbSink", "Interface", "interface"]
