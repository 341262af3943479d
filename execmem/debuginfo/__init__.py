"""Profilers and debuggers see JIT code: perf map, jitdump, GDB's JIT interface.

``Allocator(perf_map=True, jitdump=DIRECTORY, gdb=True)`` (or, for the default
allocator, ``EXECMEM_PERF_MAP=1``, ``EXECMEM_JITDUMP=DIRECTORY``, ``EXECMEM_GDB=1``)
turns on one or more *sinks*; the allocator then tells a :class:`DebugInfo` about
every text that becomes LIVE, every live patch and every free, under its lock and
after the change succeeded.  When none is on the allocator holds ``None`` and pays
one ``if`` per publish and free.

* ``_perfmap``: ``/tmp/perf-<pid>.map`` lines for ``perf report``.
* ``_jitdump``: ``jit-<pid>.dump`` records (with the code) for ``perf inject --jit``.
* ``_gdbjit``: in-memory ELF symbol files registered through
  ``__jit_debug_register_code``, so that gdb names JIT frames.

A sink that fails (disk full, say) is turned off with a ``RuntimeWarning`` and the
error is kept in ``stats()["debuginfo"]``: the code was published, and a profiling
side channel must not turn that into an error.  Only native backends run code in
this process, so other backends refuse the options.
"""

from __future__ import annotations

import contextlib
import os
import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, TypedDict

from execmem._errors import ExecmemError, UnsupportedError

if TYPE_CHECKING:
    from execmem._backend import Backend
    from execmem._text import JitText
    from execmem.arch import ArchSpec


class Sink(Protocol):
    """One consumer of a text's life (``_perfmap``, ``_jitdump``, ``_gdbjit``)."""

    what: str

    def published(self, texts: Sequence[JitText]) -> None: ...
    def patched(self, texts: Sequence[JitText]) -> None: ...
    def freed(self, text: JitText) -> None: ...
    def close(self) -> None: ...
    def describe(self) -> dict[str, object]: ...


def _close_all(sinks: list[Sink], pid: int) -> None:
    """Close every sink, but only in the process that opened them: a forked child
    (at exit, say) must not write the parent's close records."""
    if os.getpid() != pid:
        return
    while sinks:
        sink = sinks.pop()
        try:
            sink.close()
        except (OSError, ExecmemError) as exc:
            warnings.warn(f"execmem: closing the {sink.what} failed: {exc}", RuntimeWarning, stacklevel=3)


class DebugInfo:
    """The sinks of one allocator (see the module docstring)."""

    def __init__(self, sinks: list[Sink]) -> None:
        self._all = tuple(sinks)
        self._sinks = sinks  # the ones still on
        self._failed: dict[str, str] = {}
        # Closed with the allocator, or when it is dropped, or at exit.
        self._finalizer = weakref.finalize(self, _close_all, sinks, os.getpid())

    def published(self, texts: Sequence[JitText], patched: Sequence[JitText]) -> None:
        """``texts`` became LIVE and ``patched`` were patched, in one synchronization."""
        for sink in list(self._sinks):
            try:
                if texts:
                    sink.published(texts)
                if patched:
                    sink.patched(patched)
            except (OSError, ExecmemError) as exc:
                self._fail(sink, exc)

    def freed(self, text: JitText) -> None:
        for sink in list(self._sinks):
            try:
                sink.freed(text)
            except (OSError, ExecmemError) as exc:
                self._fail(sink, exc)

    def _fail(self, sink: Sink, exc: BaseException) -> None:
        self._sinks.remove(sink)
        self._failed[sink.what] = str(exc)
        with contextlib.suppress(OSError, ExecmemError):  # the first error is the one reported
            sink.close()
        warnings.warn(f"execmem: {sink.what} turned off after an error: {exc}", RuntimeWarning, stacklevel=4)

    def close(self) -> None:
        self._finalizer()

    def describe(self) -> dict[str, object]:
        """Per sink: where it writes, how much, whether it is still on, and the error
        that turned it off."""
        out: dict[str, object] = {}
        for sink in self._all:
            entry = {**sink.describe(), "on": sink in self._sinks}
            if sink.what in self._failed:
                entry["error"] = self._failed[sink.what]
            out[sink.what] = entry
        return out


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {type(value).__name__}")
    return value


def attach(spec: ArchSpec, backend: Backend, *, perf_map: object, jitdump: object, gdb: object) -> DebugInfo | None:
    """The sinks asked for (``None`` when none is), opened for code on ``backend``.
    On error nothing stays open."""
    on_perf_map, on_gdb = _flag("perf_map", perf_map), _flag("gdb", gdb)
    directory = os.fspath(jitdump) if isinstance(jitdump, (str, os.PathLike)) else jitdump
    if directory is not None and not isinstance(directory, str):
        raise TypeError(f"jitdump must be a directory path (str) or None, not {type(jitdump).__name__}")
    if not (on_perf_map or on_gdb or directory is not None):
        return None
    if not backend.callable_in_process:
        raise UnsupportedError(
            f"perf_map, jitdump and gdb describe code that runs in this process; the {backend.mode} backend's does not"
        )
    elf = spec.elf
    if elf is None and (on_gdb or directory is not None):
        raise UnsupportedError(f"{spec.name} has no ELF description (ArchSpec.elf) for jitdump and gdb")
    from execmem.debuginfo import _gdbjit, _jitdump, _perfmap

    sinks: list[Sink] = []
    try:
        if on_perf_map:
            sinks.append(_perfmap.PerfMapSink())
        if directory is not None and elf is not None:
            sinks.append(_jitdump.JitDumpSink(directory, elf.machine))
        if on_gdb and elf is not None:
            sinks.append(_gdbjit.GdbSink(elf))
    except BaseException:
        _close_all(sinks, os.getpid())
        raise
    return DebugInfo(sinks)


class Options(TypedDict):
    """``Allocator`` keyword arguments."""

    perf_map: bool
    jitdump: str | None
    gdb: bool


def _switch(environ: Mapping[str, str], variable: str) -> bool:
    value = environ.get(variable, "")
    if value not in ("", "0", "1"):
        raise UnsupportedError(f"{variable}={value!r}: set it to 1 to turn it on, or 0 (or nothing) to leave it off")
    return value == "1"


def options_from_env(environ: Mapping[str, str]) -> Options:
    """The default allocator's options from ``EXECMEM_PERF_MAP=1``,
    ``EXECMEM_JITDUMP=DIRECTORY`` and ``EXECMEM_GDB=1`` (unset, empty or ``0``: off)."""
    return Options(
        perf_map=_switch(environ, "EXECMEM_PERF_MAP"),
        jitdump=environ.get("EXECMEM_JITDUMP") or None,
        gdb=_switch(environ, "EXECMEM_GDB"),
    )


__all__ = ["DebugInfo", "Options", "Sink", "attach", "options_from_env"]
