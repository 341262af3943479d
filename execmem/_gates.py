"""Call gates: a call through ``function()`` is counted in flight by machine code.

``free()`` must not refill or reuse a text while a call through one of its
``function()`` callables runs, and a call made after ``free()`` must raise
``UseAfterFreeError``.  Counting calls in Python (a lock around every call) cost 6.5
times a raw ctypes call; here the callable goes straight into generated machine code
that does the accounting itself:

* A text's **slot** is 64 bytes of a read+write, never executable data page (a
  private anonymous ``mmap``): a counter of calls in flight at +0 and a *retired*
  flag at +8.
* A callable's **record**, 64 bytes of another such page, holds what its calls need:
  the slot, the entry point, the stack bytes to forward, the C-API functions that
  release and take back the GIL and raise, the exception and its message.
* Its **stub**, a few instructions (``ArchSpec.gate_stub``), loads the record's
  address into a scratch register and jumps to **the gate** (``ArchSpec.call_gate``),
  one per process, which increments the slot's counter atomically, issues a full
  barrier and reads the flag.  If the text was freed it decrements again and raises
  ``UseAfterFreeError`` through ``PyErr_SetObject``; otherwise it releases the GIL
  (``PyEval_SaveThread``), calls the text with the caller's arguments, decrements,
  takes the GIL back and returns the text's result.  The gate and the stubs (64 at a
  time) are texts of a process-wide allocator of their own (W^X and synchronized as
  every text), published once: making a callable writes a record, no system call.
  They outlive the allocator of the text they lead to: a call after ``close()``
  raises too.
* The callable is a ctypes function pointer of the ``PYFUNCTYPE`` kind (a subclass
  that is also a :class:`JitFunction`) pointing at its stub: ctypes calls it *holding*
  the GIL and checks for a Python error afterwards, so the refusal is an ordinary
  exception and the call costs what a raw ``CFUNCTYPE`` call costs (which releases
  the GIL too).
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
the call that takes the GIL back) gets a record that keeps the GIL during the call.
An architecture without a gate template gets :class:`_CountedFunction`, which counts
in Python under the GIL.
"""

from __future__ import annotations

import ctypes
import mmap
from collections import deque
from typing import TYPE_CHECKING, Any

from execmem import _forks
from execmem._errors import UnsupportedError, UseAfterFreeError
from execmem._locks import OwnedLock

if TYPE_CHECKING:
    from execmem._allocator import Allocator
    from execmem._text import JitText
    from execmem.arch import ArchSpec

#: Bytes per slot and per record: one cache line each.
SLOT_BYTES = 64
#: A record's fields, 8 bytes each in this order (``ArchSpec.call_gate`` reads them).
RECORD_FIELDS = ("SLOT", "TARGET", "STACK", "SAVE", "RESTORE", "RAISE", "EXC", "MSG")
#: Stubs published at a time, and the bytes each takes (``ArchSpec.gate_stub``).
STUBS = 64
STUB_BYTES = 32
#: Stack bytes a gate always forwards (arguments beyond the prototype, up to this).
MIN_STACK = 64
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

    __slots__ = ("__weakref__", "_pool", "address", "message")

    def __init__(self, pool: GatePool, address: int, message: str) -> None:
        self.address = address
        #: What a refused call raises with (the gate reads it through its record).
        self.message = message
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
    """One way into a text: a stub (its ``address``, what the callable points at), the
    record the stub hands to the gate, and the slot the record names."""

    __slots__ = ("_pool", "address", "record", "slot")

    def __init__(self, pool: GatePool, stub: tuple[int, int], slot: Slot) -> None:
        self.address, self.record = stub
        self.slot = slot
        self._pool = pool

    def __del__(self) -> None:
        # No callable refers to the stub any more, so no call runs through it: the
        # stub and its record may serve another gate.  (A deque append: finalizers run
        # at any point, in any thread, on objects whose __init__ may have been cut short.)
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.free_stubs.append((self.address, self.record))


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
    """The process's gate, stubs, records and slots (one per process: :func:`gate_pool`)."""

    def __init__(self) -> None:
        from execmem._allocator import Allocator

        self.lock = OwnedLock("the call gates")
        self.allocator: Allocator = Allocator()
        spec = self.allocator.arch
        self.spec: ArchSpec = spec
        self.pages: list[mmap.mmap] = []
        self.free_slots: deque[int] = deque()
        self.free_stubs: deque[tuple[int, int]] = deque()
        api = ctypes.pythonapi
        self._fields = {
            "SAVE": _c_address(api.PyEval_SaveThread),
            "RESTORE": _c_address(api.PyEval_RestoreThread),
            "RAISE": _c_address(api.PyErr_SetObject),
            "EXC": id(UseAfterFreeError),
        }
        #: What a record that keeps the GIL names instead of the functions that release
        #: and take it back: a C-API function without arguments or effects.
        self._no_gil_change = _c_address(api.Py_IsInitialized)
        self._texts: list[JitText] = []  # the gate, the retire routine, the stubs: kept for good
        self._retire: Any = None
        self._gate = 0
        self._stub: tuple[bytes, int, int] | None = None
        if spec.call_gate:
            support = self._publish(self._routine(spec.call_gate), self._routine(spec.gate_retire))
            self._gate = support.address
            self._retire = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p)(support.address + len(self._routine(spec.call_gate)))
            self._stub = self._stub_template(spec.gate_stub)

    # -- building ---------------------------------------------------------------------

    def _routine(self, source: str) -> bytes:
        """``source`` assembled (position independent), padded to 16 with traps."""
        from execmem._asm import asm

        code = asm(source, self.spec.name, 0)
        return code + self.spec.trap_bytes(-len(code) % 16)

    def _stub_template(self, template: str) -> tuple[bytes, int, int]:
        """The stub assembled once with markers for RECORD and GATE, and where their
        8-byte values are in the code (found by the markers)."""
        record, gate = _MARKER + 1, _MARKER + 2
        code = self._routine(template.format(RECORD=hex(record), GATE=hex(gate)))
        at_record, at_gate = code.find(record.to_bytes(8, "little")), code.find(gate.to_bytes(8, "little"))
        if at_record < 0 or at_gate < 0 or len(code) > STUB_BYTES:
            raise UnsupportedError(f"{self.spec.name}: the gate stub must hold RECORD and GATE in {STUB_BYTES} bytes")
        return code, at_record, at_gate

    def _publish(self, *codes: bytes) -> JitText:
        code = b"".join(codes)
        text = self.allocator.jit_text_alloc(len(code))
        text.write(0, code)
        text.map()
        self._texts.append(text)
        return text

    def _page(self) -> int:
        # Read+write, never executable; private, so that a forked child's calls count
        # in its own copy (a child that dies in a call leaves the parent's counts alone).
        page = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE)
        self.pages.append(page)
        return ctypes.addressof(ctypes.c_char.from_buffer(page))

    def _more_stubs(self) -> None:
        """``STUBS`` stubs, each with its record, published as one text."""
        assert self._stub is not None
        code, at_record, at_gate = self._stub
        records = [self._page() + i * SLOT_BYTES for i in range(mmap.PAGESIZE // SLOT_BYTES)][:STUBS]
        image = bytearray()
        for record in records:
            stub = bytearray(code + self.spec.trap_bytes(STUB_BYTES - len(code)))
            stub[at_record : at_record + 8] = record.to_bytes(8, "little")
            stub[at_gate : at_gate + 8] = self._gate.to_bytes(8, "little")
            image += stub
        text = self._publish(bytes(image))
        self.free_stubs.extend((text.address + i * STUB_BYTES, record) for i, record in enumerate(records))

    # -- slots and gates --------------------------------------------------------------

    def slot(self, text: JitText) -> Slot:
        """A fresh slot for ``text`` (counter 0, not retired)."""
        if not self.free_slots:
            base = self._page()
            self.free_slots.extend(range(base, base + mmap.PAGESIZE, SLOT_BYTES))
        address = self.free_slots.popleft()
        ctypes.memset(address, 0, SLOT_BYTES)
        return Slot(self, address, f"the text at {text.address:#x} has been freed")

    def retire(self, address: int) -> int:
        if self._retire is None:
            ctypes.c_uint64.from_address(address + 8).value = 1
            return ctypes.c_int64.from_address(address).value
        return int(self._retire(address))

    def gate(self, slot: Slot, entry: int, argtypes: tuple[Any, ...], *, hold_gil: bool) -> Gate:
        """A stub whose record leads into ``entry``, counting in ``slot``."""
        if not self.free_stubs:
            self._more_stubs()
        stub = self.free_stubs.popleft()
        fields = dict(self._fields)
        if hold_gil:
            fields["SAVE"] = fields["RESTORE"] = self._no_gil_change
        fields.update(SLOT=slot.address, TARGET=entry, STACK=stack_bytes(argtypes), MSG=id(slot.message))
        record = b"".join(fields[name].to_bytes(8, "little") for name in RECORD_FIELDS)
        ctypes.memmove(stub[1], record, len(record))
        return Gate(self, stub, slot)


#: By fork generation (``_forks``): a forked child makes its own.
_pools: dict[int, GatePool] = {}
_pools_lock = OwnedLock("the call gate pool")


def gate_pool() -> GatePool:
    """This process's gate pool (a forked child makes its own)."""
    generation = _forks.generation
    pool = _pools.get(generation)
    if pool is None:
        with _pools_lock:
            pool = _pools.get(generation)
            if pool is None:
                pool = _pools[generation] = GatePool()
    return pool


def make_function(text: JitText, restype: Any, argtypes: tuple[Any, ...], entry: int) -> JitFunction:
    """A callable into ``entry`` of the LIVE ``text``, through a (cached) gate."""
    pool = gate_pool()
    with pool.lock:
        slot = text._slot
        if slot is None:
            slot = text._slot = pool.slot(text)
        if not pool._gate:
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


def prepare(count: int) -> None:
    """Publish stubs until ``count`` callables can be made without a system call (what
    a program that must not make one later, or a harness counting them, calls first)."""
    pool = gate_pool()
    with pool.lock:
        while pool._gate and len(pool.free_stubs) < count:
            pool._more_stubs()


def allocator_of_gates() -> Allocator | None:
    """The allocator the gates of this process live in, if there is one yet (tests)."""
    pool = _pools.get(_forks.generation)
    return None if pool is None else pool.allocator


__all__ = [
    "Gate",
    "GatePool",
    "JitFunction",
    "Slot",
    "allocator_of_gates",
    "gate_pool",
    "in_flight",
    "make_function",
    "prepare",
    "retire",
    "revive",
    "stack_bytes",
]
