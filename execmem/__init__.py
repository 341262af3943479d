"""execmem: put machine code into executable memory safely, and prove it.

The public surface is re-exported here explicitly; everything else is private.
"""

from __future__ import annotations

from execmem._errors import (
    AlignmentError,
    AssemblyError,
    BadStateError,
    ExecmemError,
    ForkedProcessError,
    LitmusError,
    ModelError,
    OutOfBoundsError,
    OutOfMemoryError,
    SystemCallError,
    UnsafePatchError,
    UnsupportedError,
    UseAfterFreeError,
)

__version__ = "0.1.0"

__all__ = [
    "AlignmentError",
    "AssemblyError",
    "BadStateError",
    "ExecmemError",
    "ForkedProcessError",
    "LitmusError",
    "ModelError",
    "OutOfBoundsError",
    "OutOfMemoryError",
    "SystemCallError",
    "UnsafePatchError",
    "UnsupportedError",
    "UseAfterFreeError",
    "__version__",
]
