"""Tiny machine-code helpers the native backend calls through ``ctypes``.

Python cannot issue a single-copy-atomic 8-byte store, a SERIALIZE, a ``DC CVAU``, an
``ISB`` or a fork whose child runs no Python; a few instructions can.  The
architecture table supplies them as data (``ArchSpec.host_routines``: Keystone
assembly, or ``.word`` directives where Keystone has no assembler).  They are assembled once per process into one private helper page
that is created W^X: mapped read+write, filled, then made read+execute with
``mprotect`` before anything calls it.  The page stays valid in forked children.

:func:`assemble` is pure (no memory is mapped) so the routine texts of every
architecture are tested on any host; :func:`host_routines` builds the page.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from execmem._asm_engine import KeystoneFailure, assemble_own
from execmem._errors import AssemblyError, UnsupportedError
from execmem._locks import SetupLock
from execmem.arch import ArchSpec, host
from execmem.native import _libc

#: C signatures by routine name: (restype, argtypes).  The names are the contract
#: with ``ArchSpec.host_routines`` (documented there).
SIGNATURES: dict[str, tuple[object, tuple[object, ...]]] = {
    "store1": (None, (ctypes.c_void_p, ctypes.c_uint64)),
    "store2": (None, (ctypes.c_void_p, ctypes.c_uint64)),
    "store4": (None, (ctypes.c_void_p, ctypes.c_uint64)),
    "store8": (None, (ctypes.c_void_p, ctypes.c_uint64)),
    "local_cse": (None, ()),
    "barrier": (None, ()),
    "clean_dcache": (None, (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)),
    "invalidate_icache": (None, (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)),
    "read_cache_type": (ctypes.c_uint64, ()),
    "serialize": (None, ()),
    "has_serialize": (ctypes.c_uint32, ()),
    "probe_membarrier": (ctypes.c_long, (ctypes.c_long,)),
}

#: Each routine starts on this boundary (keeps them on separate fetch blocks).
ROUTINE_ALIGN = 16

_WORD = re.compile(r"^\.word\s+(0x[0-9a-fA-F]+|\d+)$")


def words(source: str) -> bytes | None:
    """The bytes of a source made only of ``.word`` directives (little-endian), else None."""
    statements = [s.strip() for s in re.split(r"[;\n]", source) if s.strip()]
    out = bytearray()
    for statement in statements:
        match = _WORD.match(statement)
        if not match:
            return None
        out += int(match.group(1), 0).to_bytes(4, "little")
    return bytes(out) if statements else None


def assemble(spec: ArchSpec) -> dict[str, bytes]:
    """Machine code of every routine of ``spec`` (pure; position independent)."""
    code: dict[str, bytes] = {}
    for name, source in spec.host_routines:
        if name not in SIGNATURES:
            raise UnsupportedError(f"{spec.name}: unknown host routine {name!r}")
        encoded = words(source)
        if encoded is None:
            if spec.engines.keystone is None:
                raise UnsupportedError(f"{spec.name}: routine {name!r} needs Keystone, which lacks this architecture")
            try:
                encoded = assemble_own(spec, source, 0)
            except KeystoneFailure as exc:
                raise AssemblyError(f"{spec.name}: routine {name!r}: {exc}") from None
        if not encoded:
            raise AssemblyError(f"{spec.name}: routine {name!r} assembled to nothing")
        code[name] = encoded
    return code


def layout(code: Mapping[str, bytes], trap: bytes) -> tuple[bytes, dict[str, int]]:
    """One image holding every routine at a ``ROUTINE_ALIGN`` boundary, gaps trap-filled."""
    image = bytearray()
    offsets: dict[str, int] = {}
    for name, blob in code.items():
        pad = -len(image) % ROUTINE_ALIGN
        image += (trap * pad)[:pad]
        offsets[name] = len(image)
        image += blob
    return bytes(image), offsets


@dataclass
class HostRoutines:
    """The helper page of this process and a ctypes callable per routine."""

    address: int
    size: int
    functions: dict[str, Callable[..., object]]
    #: Answers the routines gave once for the whole process (e.g. whether the CPU has
    #: SERIALIZE), kept here so that nothing asks twice.
    probed: dict[str, object] = field(default_factory=dict)

    def get(self, name: str) -> Callable[..., object] | None:
        return self.functions.get(name)

    def __getitem__(self, name: str) -> Callable[..., object]:
        try:
            return self.functions[name]
        except KeyError:
            raise UnsupportedError(f"no host routine {name!r} for {host().name}") from None


_routines: HostRoutines | None = None
#: Module-level one-time setup: a SetupLock (re-entrant, reset in a forked child).  A
#: signal handler that needs the routines while the main thread is building them
#: builds its own page; the first page finished wins and the other is unmapped before
#: anyone could call into it.
_routines_lock = SetupLock("the host routines page")
_sys = _libc.Syscalls()  # process-wide tally for the helper page


def host_routines() -> HostRoutines:
    """The routines of the host, built on first use (one page per process, W^X)."""
    global _routines
    with _routines_lock:
        if _routines is None:
            built = _build(host())
            if _routines is None:  # not built meanwhile by a re-entrant call
                _routines = built
            else:
                _sys.munmap(built.address, built.size)
        return _routines


def _build(spec: ArchSpec) -> HostRoutines:
    image, offsets = layout(assemble(spec), spec.trap_fill)
    page = _page_size()
    size = max(page, -(-len(image) // page) * page)
    address = _sys.mmap(0, size, _libc.PROT_READ | _libc.PROT_WRITE, _libc.MAP_PRIVATE | _libc.MAP_ANONYMOUS)
    try:
        filler = spec.trap_bytes(size)
        ctypes.memmove(address, filler, size)
        ctypes.memmove(address, image, len(image))
        # W^X: the page is never writable once it is executable.
        _sys.mprotect(address, size, _libc.PROT_READ | _libc.PROT_EXEC)
    except BaseException:
        _sys.munmap(address, size)
        raise
    functions: dict[str, Callable[..., object]] = {}
    for name, offset in offsets.items():
        restype, argtypes = SIGNATURES[name]
        prototype = ctypes.CFUNCTYPE(restype, *argtypes)  # type: ignore[arg-type]
        functions[name] = prototype(address + offset)
    return HostRoutines(address, size, functions)


def _page_size() -> int:
    import mmap

    return mmap.PAGESIZE


__all__ = ["SIGNATURES", "HostRoutines", "assemble", "host_routines", "layout", "words"]
