"""Call gates: a call through ``function()`` is counted in flight by machine code.

``free()`` must not refill or reuse a text while a call through one of its
``function()`` callables runs, and a call made after ``free()`` must raise
``UseAfterFreeError``.  Counting calls in Python (a lock around every call) cost 6.5
times a raw ctypes call; here the callable goes straight into a small generated
*gate* that does the accounting itself:

* A text's **slot** is 64 bytes of a read+write, never executable data page (an
  anonymous ``mmap``): a counter of calls in flight at +0 and a *retired* flag at +8.
* Its **gate** (the architecture's ``ArchSpec.call_gate`` template, with the slot,
  the entry point and a few addresses patched in) increments the counter atomically,
  issues a full barrier and reads the flag.  If the text was freed it decrements
  again and raises ``UseAfterFreeError`` through ``PyErr_SetObject``; otherwise it
  releases the GIL (``PyEval_SaveThread``), calls the text with the caller's
  arguments, decrements the counter, takes the GIL back and returns the text's
  result.  Gates are texts of a process-wide allocator of their own (W^X and
  synchronized as every text), so they outlive the allocator of the text they
  lead to: a call after ``close()`` raises too.
* The callable is a ctypes function pointer of the ``PYFUNCTYPE`` kind (a subclass
  that is also a :class:`JitFunction`): ctypes calls the gate *holding* the GIL and
  checks for a Python error afterwards, so the refusal is an ordinary exception and
  the call costs what a raw ``CFUNCTYPE`` call costs (which releases the GIL too).
* ``free()`` runs the architecture's ``gate_retire`` routine: set the flag, full
  barrier, read the counter (Dekker's handshake with the gate's increment-barrier-
  read: one of the two sees the other).  A non-zero count leaves the text *pinned*;
  the allocator reads the counter again at its next verbs and reclaims the text
  when it is zero.  (The GIL orders the two as well: the gate increments before it
  releases the GIL, ``free()`` runs holding it; the barriers keep the protocol
  correct without one.)

Arguments: registers are forwarded untouched.  Stack arguments are copied (the
gate's own frame sits between the caller and the text): as many bytes as the
prototype can need, at least 64 (arguments passed beyond the prototype are forwarded
up to that).  A ``c_longdouble`` result (x87 ``st0``, which must not be live across
the call that takes the GIL back) uses a gate that keeps the GIL during the call.
An architecture without a gate template gets :class:`_CountedFunction`, which counts
in Python under the GIL.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections import deque
from typing import TYPE_CHECKING, Any

from execmem._errors import UnsupportedError, UseAfterFreeError
from execmem._locks import OwnedLock

if TYPE_CHECKING:
    from execmem._allocator import Allocator
    from execmem._text import JitText
    from execmem.arch import ArchSpec

#: Bytes per slot: one cache line, so counters of different texts never share one.
SLOT_BYTES = 64
#: Stack bytes a gate always forwards (arguments beyond the prototype, up to this).
MIN_STACK = 64
#: Names a ``call_gate`` template is formatted with (each an 8-byte field once assembled).
GATE_FIELDS = ("SLOT", "TARGET", "STACK", "SAVE", "RESTORE", "RAISE", "EXC", "MSG")
_MARKER = 0x7E5E_6A7E_0000_0000


def _c_address(function: Any) -> int:
    return int(ctypes.cast(function, ctypes.c_void_p).value or 0)


def stack_bytes(argtypes: tuple[Any, ...]) -> int:
    """An upper bound of the stack bytes a call with ``argtypes`` passes: every argument
    as if it went on the stack, in 8-byte slots (a 16-byte one may need 8 of padding),
    rounded to 16 and at least ``MIN_STACK``."""
    total = 0
    for argtype in argtypes:
        try:
            size = ctypes.sizeof(argtype)
        except TypeError:  # a class with from_param only: passed as a pointer-sized value
            size = 8
        total += -(-size // 8) * 8 + (8 if size > 8 else 0)
    return max(MIN_STACK, -(-total // 16) * 16)


class Slot:
    """A text's counter of calls in flight and its retired flag (see the module docstring)."""

    __slots__ = ("__weakref__", "_pool", "address")

    def __init__(self, pool: GatePool, address: int) -> None:
        self.address = address
        self._pool = pool

    def inflight(self) -> int:
        return ctypes.c_int64.from_address(self.address).value

    def retire(self) -> int:
        """Refuse new calls; the calls in flight when that became visible."""
        return self._pool.retire(self.address)

    def revive(self) -> None:
        """Allow calls again (a free that was undone)."""
        ctypes.c_uint64.from_address(self.address + 8).value = 0

    def __del__(self) -> None:
        # Nothing refers to the slot any more (text and gates gone): reusable.  Only a
        # deque append here: finalizers run at any point, in any thread (and on an
        # object whose __init__ an exception cut short).
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.free_slots.append(self.address)


class Gate:
    """One gate: its code (a text of the gate pool) and the slot it counts in."""

    __slots__ = ("_pool", "address", "slot", "text")

    def __init__(self, pool: GatePool, text: JitText, slot: Slot) -> None:
        self.text = text
        self.slot = slot
        self.address = text.address
        self._pool = pool

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.dead_gates.append(self.text)


class JitFunction:
    """A ctypes callable into a LIVE text, through its call gate (``_gates``).

    ``free()`` while calls are in flight marks the text FREED at once (new calls raise
    ``UseAfterFreeError``) and reclaims it once the last call has returned.  No
    libffi closure (those need writable+executable trampolines) is ever created.
    Instances are also ctypes function pointers (``argtypes``, ``restype``).
    """

    _text: JitText
    _entry: int
    _gate: Gate | None

    if TYPE_CHECKING:  # ctypes' own __call__ (C) at run time: nothing in Python per call

        def __call__(self, *args: Any) -> Any: ...

    @property
    def address(self) -> int:
        """The entry point in the text (the gate's address is not the text's)."""
        return self._entry

    @property
    def text(self) -> JitText:
        return self._text

    def __repr__(self) -> str:
        return f"<JitFunction at {self._entry:#x} in {self._text!r}>"


class _CountedFunction(JitFunction):
    """The fallback where the architecture has no gate template: counts in Python,
    under the GIL (every change of the counter then happens holding it)."""

    def __init__(self, cfunc: Any, slot: Slot) -> None:
        self._cfunc = cfunc
        self._slot = slot

    def __call__(self, *args: Any) -> Any:
        slot = self._slot
        counter = ctypes.c_int64.from_address(slot.address)
        if ctypes.c_uint64.from_address(slot.address + 8).value:
            raise UseAfterFreeError(f"the text at {self._text.address:#x} has been freed")
        counter.value += 1
        try:
            return self._cfunc(*args)
        finally:
            counter.value -= 1


_classes: dict[tuple[Any, tuple[Any, ...]], type] = {}


def _function_class(restype: Any, argtypes: tuple[Any, ...]) -> type:
    """A ``PYFUNCTYPE(restype, *argtypes)`` subclass that is also a :class:`JitFunction`."""
    key = (restype, argtypes)
    cls = _classes.get(key)
    if cls is None:
        proto: Any = ctypes.PYFUNCTYPE(restype, *argtypes)
        namespace = {"_flags_": proto._flags_, "_restype_": proto._restype_, "_argtypes_": proto._argtypes_}
        cls = _classes[key] = type("JitFunction", (JitFunction, proto), namespace)
    return cls


class GatePool:
    """The process's call gates and slots (one per process: :func:`gate_pool`)."""

    def __init__(self) -> None:
        from execmem._allocator import Allocator

        self.lock = OwnedLock("the call gates")
        self.allocator: Allocator = Allocator()
        spec = self.allocator.arch
        self.spec: ArchSpec = spec
        self.pages: list[mmap.mmap] = []
        self.free_slots: deque[int] = deque()
        self.dead_gates: deque[JitText] = deque()
        self._message_of: dict[int, str] = {}
        api = ctypes.pythonapi
        self._fields = {
            "SAVE": _c_address(api.PyEval_SaveThread),
            "RESTORE": _c_address(api.PyEval_RestoreThread),
            "RAISE": _c_address(api.PyErr_SetObject),
            "EXC": id(UseAfterFreeError),
        }
        #: What a gate that keeps the GIL calls instead of releasing and taking it back:
        #: a C-API function without arguments or effects.
        self._no_gil_change = _c_address(api.Py_IsInitialized)
        self._template: bytes | None = None
        self._offsets: dict[str, list[int]] = {}
        self._retire: Any = None
        if spec.call_gate:
            self._template, self._offsets = self._assemble(spec.call_gate)
            self._support = self._publish(self._routine(spec.gate_retire))
            self._retire = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p)(self._support.address)

    # -- building ---------------------------------------------------------------------

    def _routine(self, source: str) -> bytes:
        from execmem._asm import asm

        code = asm(source, self.spec.name, 0)
        align = 16
        return code + self.spec.trap_bytes(-len(code) % align)

    def _assemble(self, template: str) -> tuple[bytes, dict[str, list[int]]]:
        """The template assembled once with a distinct marker in each field, and where
        each field's 8 bytes are (the markers are found in the machine code)."""
        markers = {name: _MARKER + i + 1 for i, name in enumerate(GATE_FIELDS)}
        code = self._routine(template.format(**{k: hex(v) for k, v in markers.items()}))
        offsets: dict[str, list[int]] = {}
        for name, value in markers.items():
            needle = value.to_bytes(8, "little")
            at = code.find(needle)
            while at >= 0:
                offsets.setdefault(name, []).append(at)
                at = code.find(needle, at + 1)
            if name not in offsets:
                raise UnsupportedError(f"{self.spec.name}: the call gate template never uses {name}")
        return code, offsets

    def _publish(self, code: bytes) -> JitText:
        text = self.allocator.jit_text_alloc(len(code))
        text.write(0, code)
        text.map()
        return text

    # -- slots and gates --------------------------------------------------------------

    def slot(self, text: JitText) -> Slot:
        """A fresh slot for ``text`` (counter 0, not retired)."""
        if not self.free_slots:
            # Read+write, never executable; private, so that a forked child's calls count
            # in its own copy (a child that dies in a call leaves the parent's counts alone).
            page = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE)
            self.pages.append(page)
            base = ctypes.addressof(ctypes.c_char.from_buffer(page))
            self.free_slots.extend(range(base, base + mmap.PAGESIZE, SLOT_BYTES))
        address = self.free_slots.popleft()
        ctypes.memset(address, 0, SLOT_BYTES)
        # The message object the gate raises with; kept as long as the slot may be read.
        self._message_of[address] = f"the text at {text.address:#x} has been freed"
        return Slot(self, address)

    def retire(self, address: int) -> int:
        if self._retire is None:
            ctypes.c_uint64.from_address(address + 8).value = 1
            return ctypes.c_int64.from_address(address).value
        return int(self._retire(address))

    def gate(self, slot: Slot, entry: int, argtypes: tuple[Any, ...], *, hold_gil: bool) -> Gate:
        """A published gate into ``entry`` counting in ``slot``."""
        self._collect()
        assert self._template is not None
        fields = dict(self._fields)
        if hold_gil:
            fields["SAVE"] = fields["RESTORE"] = self._no_gil_change
        fields.update(SLOT=slot.address, TARGET=entry, STACK=stack_bytes(argtypes), MSG=id(self._message_of[slot.address]))
        code = bytearray(self._template)
        for name, places in self._offsets.items():
            for at in places:
                code[at : at + 8] = fields[name].to_bytes(8, "little")
        return Gate(self, self._publish(bytes(code)), slot)

    def _collect(self) -> None:
        """Free the gates nothing refers to any more (their callables are gone)."""
        while self.dead_gates:
            text = self.dead_gates.popleft()
            text.free()


_pools: dict[int, GatePool] = {}
_pools_lock = OwnedLock("the call gate pool")


def gate_pool() -> GatePool:
    """This process's gate pool (a forked child makes its own)."""
    pid = os.getpid()
    pool = _pools.get(pid)
    if pool is None:
        with _pools_lock:
            pool = _pools.get(pid)
            if pool is None:
                pool = _pools[pid] = GatePool()
    return pool


def make_function(text: JitText, restype: Any, argtypes: tuple[Any, ...], entry: int) -> JitFunction:
    """A callable into ``entry`` of the LIVE ``text``, through a (cached) gate."""
    pool = gate_pool()
    with pool.lock:
        slot = text._slot
        if slot is None:
            slot = text._slot = pool.slot(text)
        if pool._template is None:
            fallback = _CountedFunction(ctypes.CFUNCTYPE(restype, *argtypes)(entry), slot)
            fallback._text, fallback._entry, fallback._gate = text, entry, None
            return fallback
        hold_gil = restype is ctypes.c_longdouble
        key = (entry - text.address, stack_bytes(argtypes), hold_gil)
        gates = text._gates
        if gates is None:
            gates = text._gates = {}
        gate = gates.get(key)
        if gate is None:
            gate = gates[key] = pool.gate(slot, entry, argtypes, hold_gil=hold_gil)
        function: Any = _function_class(restype, argtypes)(gate.address)
        function._text, function._entry, function._gate = text, entry, gate
        return function  # type: ignore[no-any-return]


def retire(text: JitText) -> int:
    """Refuse new calls into ``text``; how many calls are in flight."""
    return 0 if text._slot is None else text._slot.retire()


def revive(text: JitText) -> None:
    if text._slot is not None:
        text._slot.revive()


def in_flight(text: JitText) -> int:
    return 0 if text._slot is None else text._slot.inflight()


def collect() -> None:
    """Free now the gates of callables already collected (otherwise the next
    ``function()`` does): what the harnesses call before counting system calls."""
    pool = _pools.get(os.getpid())
    if pool is not None:
        with pool.lock:
            pool._collect()


def allocator_of_gates() -> Allocator | None:
    """The allocator the gates of this process live in, if there is one yet (tests)."""
    pool = _pools.get(os.getpid())
    return None if pool is None else pool.allocator


__all__ = [
    "Gate",
    "GatePool",
    "JitFunction",
    "Slot",
    "allocator_of_gates",
    "collect",
    "gate_pool",
    "in_flight",
    "make_function",
    "retire",
    "revive",
    "stack_bytes",
]
