"""The contract between the allocator core and the memory it manages.

The core (packs, chunks, quarantine, handle states) is architecture- and
host-neutral: everything that touches memory goes through a :class:`Backend`.
Three backends implement it:

* ``execmem.native.NativeBackend`` - real mmap'd memory in this process;
* ``execmem.emu.Machine`` - the modeled multi-CPU machine (each call becomes model
  steps on the machine's host CPU, interleavable with guest code on other CPUs);
* ``execmem._memory_backend.MemoryBackend`` - plain bytes, for tests of the core.

Lifecycle of a :class:`Reservation` (a pack, or one large text's own region)::

    reserve()  -> RESERVED: VA fixed, backing allocated and trap-filled through the
                  writable side, executable view NOT installed (nothing can be
                  fetched from it, so nothing stale can be in flight)
    grow()     -> the same reservation, longer: more trap-filled bytes right after
                  it, in the same state (never-executed addresses: nothing stale)
    map()      -> MAPPED: executable view installed (the ``map`` recipe step)
    unmap()    -> UNMAPPED: executable view removed, VA still reserved so the system
                  cannot hand it to anyone else while it is quarantined
    map()      -> MAPPED again (only after a synchronization epoch: fresh again)
    release()  -> gone: VA and backing returned to the system

The core runs recipes (``arch.Recipe``) step by step: it routes ``write`` to
:meth:`Backend.write`, ``map`` to :meth:`Backend.map`, ``atomic_store`` to
:meth:`Backend.atomic_store`, and every other step name to
:meth:`Backend.run_step` with the address ranges of the whole batch, once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from execmem.arch import ArchSpec


@dataclass(eq=False)
class Reservation:
    """One contiguous region of executable address space (identity semantics)."""

    #: Executable virtual address; fixed for the life of the reservation.
    address: int
    #: Bytes usable now (mapped while ``mapped``); :meth:`Backend.grow` may raise it.
    size: int
    #: Whether the executable view is currently installed.
    mapped: bool = False
    #: Backend-private state (file descriptors, alias addresses, model frames...).
    token: object = field(default=None, repr=False)
    #: The most ``size`` may grow to in place (``size`` itself when it cannot grow).
    capacity: int = 0

    def __post_init__(self) -> None:
        self.capacity = max(self.capacity, self.size)


#: An address range ``(start, size)`` in executable address space.
Range = tuple[int, int]


@runtime_checkable
class Backend(Protocol):
    """What the allocator core needs from memory.  See the module docstring."""

    @property
    def arch(self) -> ArchSpec:
        """The architecture whose recipes this backend executes."""
        ...

    @property
    def page_size(self) -> int: ...

    @property
    def mode(self) -> str:
        """Human-readable mode: "dual-mapping", "mprotect", "rwx", "emulated", "memory"
        (for reports only: the core asks the capabilities below, never the mode)."""
        ...

    @property
    def write_unit(self) -> int:
        """Smallest unit whose protection can change independently of its neighbours.

        Texts written in place never share such a unit with live text (the page size
        in mprotect mode, 1 where writes go through a separate writable view).
        """
        ...

    @property
    def cache_features(self) -> frozenset[str]:
        """Cache-type features of the (host or modeled) CPU, e.g. ``{"idc"}`` on arm64."""
        ...

    @property
    def max_reservation(self) -> int | None:
        """The largest reservation :meth:`reserve` accepts (``None``: no bound), so that
        an allocator refuses a pack size that can never be reserved up front."""
        ...

    @property
    def concurrent_patch_safe(self) -> bool:
        """Whether :meth:`atomic_store` is safe while other threads execute the same
        write unit (not in mprotect mode, where the page is briefly not executable)."""
        ...

    @property
    def callable_in_process(self) -> bool:
        """Whether published code can be called from this process (``JitText.function``);
        not on the modeled machine or plain bytes, which run code elsewhere or nowhere."""
        ...

    def reserve(self, size: int, align: int, capacity: int | None = None, *, window: Range | None = None) -> Reservation:
        """Reserve ``size`` bytes of VA aligned to ``align`` with trap-filled backing.

        ``capacity`` (at least ``size``) asks for room to :meth:`grow` in place up to
        that many bytes; the backend may instead give all of it at once (the returned
        ``size`` says what it gave).  ``window`` (``(low, high)``, ``near=``) asks for
        the whole capacity inside ``[low, high)``.  Raises ``OutOfMemoryError`` (also
        when no free place lies in the window) / ``SystemCallError`` and leaves
        nothing behind on failure.
        """
        ...

    def grow(self, reservation: Reservation, size: int) -> bool:
        """Extend ``reservation`` in place to ``size`` bytes (up to its capacity) with
        trap-filled backing in the reservation's current state.

        False when the addresses right after it are no longer free (or the backend
        cannot grow): nothing changed.  Raises like :meth:`reserve` on a real failure,
        and leaves the reservation as it was.
        """
        ...

    def reserve_data(self, size: int, align: int, window: Range | None = None) -> Reservation:
        """Zero-filled read+write memory that is never executable (``jit_data_alloc``),
        in ``window`` if given.  :meth:`write` and :meth:`release` take it (and
        :meth:`map` refuses it); raises like :meth:`reserve`."""
        ...

    def read_data(self, reservation: Reservation, offset: int, size: int) -> bytes:
        """The current bytes of a data region (``UnsupportedError`` where they live
        elsewhere than in this process's view, as on the modeled machine)."""
        ...

    def map(self, reservation: Reservation) -> None:
        """Install the executable (read+execute, never writable) view."""
        ...

    def unmap(self, reservation: Reservation) -> None:
        """Remove the executable view (with the TLB maintenance it needs); keep the VA."""
        ...

    def release(self, reservation: Reservation) -> None:
        """Return VA and backing to the system.  The reservation is unusable afterwards."""
        ...

    def write(self, reservation: Reservation, offset: int, data: bytes) -> None:
        """Store ``data`` at ``reservation.address + offset`` through the writable view.

        Never makes any page writable and executable at once.
        """
        ...

    def atomic_store(self, reservation: Reservation, offset: int, data: bytes) -> None:
        """One single-copy-atomic store of ``data`` (1, 2, 4 or 8 bytes, naturally aligned)."""
        ...

    def begin_inplace(self, reservation: Reservation, offset: int, size: int) -> None:
        """Prepare ``[offset, offset+size)`` for in-place writes (mprotect mode: make RW)."""
        ...

    def end_inplace(self, reservation: Reservation, offset: int, size: int) -> None:
        """Undo :meth:`begin_inplace` (mprotect mode: back to read+execute)."""
        ...

    def readable(self, address: int, size: int) -> bool:
        """Whether every byte of ``[address, address+size)`` is mapped readable in the
        address space the recipes run on (``sync_code``: cache maintenance by address
        faults elsewhere).  Raises ``SystemCallError`` when the backend cannot tell."""
        ...

    def run_step(self, step: str, ranges: Sequence[Range]) -> None:
        """Execute one synchronization recipe step over the batch's ranges.

        ``step`` is one of ``clean_dcache``, ``barrier``, ``invalidate_icache``,
        ``local_cse`` and ``remote_cse`` (see ``execmem.arch.STEP_DOCS``).  A completed
        ``remote_cse`` means every thread of the process (every CPU of the model) has
        taken a context-synchronization event since the call started.
        """
        ...

    def stats(self) -> Mapping[str, object]:
        """What the backend actually obtained and did (pages, huge pages, sync counts...)."""
        ...

    def close(self) -> None:
        """Release everything still held.  Idempotent."""
        ...


__all__ = ["Backend", "Range", "Reservation"]
