"""The one exception hierarchy of execmem.

Every failure the public API can detect is an :class:`ExecmemError` subclass, raised
*before* any state changes (or after the change was rolled back), so a caller can
catch it and keep using the allocator.  Wrong argument *types* may still raise
``TypeError``, as everywhere in Python.
"""

from __future__ import annotations


class ExecmemError(Exception):
    """Base class of every error raised by execmem."""


class OutOfBoundsError(ExecmemError, IndexError):
    """An offset/length pair falls outside a text."""


class BadStateError(ExecmemError):
    """An operation is illegal in the text's current state (e.g. ``write`` after ``free``)."""


class AlignmentError(ExecmemError, ValueError):
    """An alignment, size or offset is not acceptable (not a power of two, misaligned...)."""


class SizeError(AlignmentError):
    """A size is zero or negative (``jit_text_alloc(0)``): a ``ValueError`` too."""


class BadNameError(ExecmemError, ValueError):
    """A text name is not acceptable (not printable, empty or too long): names end up
    in perf maps, jitdump records and ELF symbol tables, one line or string each."""


class OutOfMemoryError(ExecmemError, MemoryError):
    """The system refused memory, or a configured limit was reached."""


class AssemblyError(ExecmemError):
    """Keystone could not assemble the source; the message names the failing line."""


class UnsupportedError(ExecmemError):
    """The request is valid in general but not here (host, mode, architecture, shape)."""


class UnsafePatchError(UnsupportedError):
    """A live patch that the architecture does not allow while other threads may run the code.

    The message names the safe alternative: publish a new text, swap a pointer to it,
    and free the old one (reclamation waits for the epoch).
    """


class SystemCallError(ExecmemError, OSError):
    """A system call failed in a way execmem could not recover from (errno is kept)."""


class UseAfterFreeError(BadStateError):
    """A callable or handle of a text that has been freed was used."""


class ForkedProcessError(BadStateError):
    """An allocator created in a parent process was used in a forked child."""


class LitmusError(ExecmemError):
    """A litmus file could not be read; the message names the file and the line."""


class ModelError(ExecmemError):
    """The modeled machine was asked to do something it cannot model."""


__all__ = [
    "AlignmentError",
    "AssemblyError",
    "BadNameError",
    "BadStateError",
    "ExecmemError",
    "ForkedProcessError",
    "LitmusError",
    "ModelError",
    "OutOfBoundsError",
    "OutOfMemoryError",
    "SizeError",
    "SystemCallError",
    "UnsafePatchError",
    "UnsupportedError",
    "UseAfterFreeError",
]
