"""execmem: put machine code into executable memory safely, and prove it.

The public surface is re-exported here explicitly; everything else is private.
"""

from __future__ import annotations

from execmem import arch
from execmem._allocator import Allocator
from execmem._asm import asm
from execmem._data import JitData
from execmem._default import (
    compile_function,
    default_allocator,
    jit_data_alloc,
    jit_text_alloc,
    jit_text_alloc_many,
    jit_text_free,
    publish,
    serialize_all_threads,
    sync_code,
)
from execmem._errors import (
    AlignmentError,
    AssemblyError,
    BadNameError,
    BadStateError,
    ExecmemError,
    ForkedProcessError,
    LitmusError,
    ModelError,
    OutOfBoundsError,
    OutOfMemoryError,
    SizeError,
    SystemCallError,
    UnsafePatchError,
    UnsupportedError,
    UseAfterFreeError,
)
from execmem._gates import JitFunction
from execmem._lookup import text_at
from execmem._text import JitText, TextState

__version__ = "0.1.0"

__all__ = [
    "AlignmentError",
    "Allocator",
    "AssemblyError",
    "BadNameError",
    "BadStateError",
    "ExecmemError",
    "ForkedProcessError",
    "JitData",
    "JitFunction",
    "JitText",
    "LitmusError",
    "ModelError",
    "OutOfBoundsError",
    "OutOfMemoryError",
    "SizeError",
    "SystemCallError",
    "TextState",
    "UnsafePatchError",
    "UnsupportedError",
    "UseAfterFreeError",
    "__version__",
    "arch",
    "asm",
    "compile_function",
    "default_allocator",
    "jit_data_alloc",
    "jit_text_alloc",
    "jit_text_alloc_many",
    "jit_text_free",
    "publish",
    "serialize_all_threads",
    "sync_code",
    "text_at",
]
