"""``compile_function``: assemble, allocate, publish and wrap in one call.

The size must be known to allocate and the address to assemble.  Assembling twice
every time (Keystone costs about 180 us a call) is avoided by assembling first at
a guess of the address the text will get (``PackPool.peek``: where first fit would
put it now; ``near`` or 0 without a pack in reach); when the text lands there, as it
usually does, that encoding is final.
Otherwise the source is assembled again at the real address and the two encodings
are compared: equal, the code was position independent (``events
["compile_position_independent"]``); different, the second is the one written.  A
second encoding longer than the text (a branch that needs a longer form from the
real address) allocates again; a shorter one gives the tail back (``shrink``).

It is a composition of verbs, each of which completes or leaves no trace
(``_interrupts``); if a step after the allocation fails or is interrupted, the text
is freed before the error propagates.  An exception that arrives just as
``jit_text_alloc`` returns, before its handle is bound, loses the handle as it
would in any caller: the text stays RESERVED until ``close()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from execmem import _checks
from execmem._asm import asm
from execmem._errors import SizeError, UnsupportedError
from execmem._placement import window_near
from execmem.arch import get

if TYPE_CHECKING:
    from execmem._allocator import Allocator
    from execmem._gates import JitFunction
    from execmem._text import JitText

#: Allocations tried when the code keeps growing at its real address (it converges
#: at once in practice: one longer branch form).
_ATTEMPTS = 3


def compile_function(
    allocator: Allocator,
    source: str,
    restype: Any = None,
    argtypes: Sequence[Any] = (),
    *,
    name: str | None = None,
    arch: str | None = None,
    near: int | None = None,
    align: int = 16,
    syntax: str | None = None,
    symbols: Mapping[str, int] | None = None,
) -> JitFunction:
    """See :meth:`execmem.Allocator.compile_function`."""
    spec = allocator.arch
    if arch is not None and get(arch).name != spec.name:
        raise UnsupportedError(f"compile_function: this allocator holds {spec.name} code, not {get(arch).name}")
    if not allocator.backend.callable_in_process:
        raise UnsupportedError(
            f"compile_function returns a callable, and the {allocator.backend.mode} backend's code does not run in "
            "this process: assemble with execmem.asm, allocate, write and map (then Machine.call on the model)"
        )
    if isinstance(argtypes, (str, bytes)) or not isinstance(argtypes, Sequence):
        raise TypeError(f"argtypes must be a sequence of ctypes types, not {type(argtypes).__name__}")
    align = _checks.alignment(align)
    window = window_near(near, spec.branch_reach, spec.name)
    with allocator._lock:
        allocator._begin()
        guess = allocator._pool.peek(align, window)
    if guess is None:  # no pack in reach yet: near (position-dependent code reaches from there) or 0
        guess = 0 if near is None else _checks.integer("near", near)
    code = asm(source, spec.name, guess, syntax=syntax, symbols=symbols)
    events = allocator._events
    text: JitText | None = None
    try:
        for _ in range(_ATTEMPTS):
            if not code:
                raise SizeError("compile_function: the source assembles to no bytes")
            text = allocator.jit_text_alloc(len(code), align, name=name, near=near)
            if text.address == guess:
                break
            final = asm(source, spec.name, text.address, syntax=syntax, symbols=symbols)
            events["compile_reassembled"] += 1
            if final == code:
                events["compile_position_independent"] += 1
            code, guess = final, text.address
            if len(code) <= text.size:
                if len(code) < text.size and code:
                    text.shrink(len(code))
                break
            text.free()  # longer at its real address: allocate again
            text = None
        else:
            raise SizeError(f"compile_function: the code kept growing at its real address ({len(code)} bytes)")
        assert text is not None
        text.write(0, code)
        text.map()
        return text.function(restype, *argtypes)
    except BaseException:
        if text is not None and text.state.name != "FREED":
            text.free()
        raise


__all__ = ["compile_function"]
