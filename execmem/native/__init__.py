"""Real executable memory in this process: :class:`NativeBackend`.

It implements the Backend contract (``execmem._backend``) for the allocator core, on
Linux x86-64 (run and tested here), arm64 and riscv64 (written from the architecture
manuals; their routine texts and CTR_EL0 decoding are tested on any host).

Modes (``NativeBackend(mode=...)``; details in ``_mapping``):

* ``"dual"`` (default) - a memfd (else ``/dev/shm``, else the temp dir) mapped
  read+execute at the text's address; writes go into the file with ``pwrite``, so
  the code is mapped nowhere writable and no stray store of this process can change
  it (a live patch's atomic store goes through a one-page read+write window of the
  file, unmapped right after).  ``map`` installs the read+execute view over the
  reserved (inaccessible) address, ``unmap`` puts an inaccessible anonymous mapping
  back.  The views are mapped from a *read-only* descriptor of the file
  (``/proc/self/fd/N`` reopened), so ``mprotect(view, PROT_WRITE)`` fails with
  EACCES.  A forked child keeps (and may call) the parent's texts as they were at
  fork: each view becomes a private snapshot and the parent's descriptors are
  closed in the child (``_fork``); this backend refuses every operation in the
  child except ``close``/``release``/``stats`` (``ForkedProcessError``).  Without ``/proc`` the
  views fall back to the read+write descriptor
  (``stats()["backing_detail"]["views"]``).  On hugetlbfs, which has no ``write``,
  a whole-pack file is written through a read+write alias (``MADV_DONTFORK``,
  sealed ``F_SEAL_FUTURE_WRITE``).  Nothing here stops a same-user process that can
  ``ptrace`` this one.
* ``"mprotect"`` - one anonymous mapping per reservation whose pages toggle between
  inaccessible, read+write and read+execute; ``write_unit`` is the page size.
  ``atomic_store`` makes the page briefly non-executable, so it is not safe while
  other threads execute that page (``concurrent_patch_safe`` is False).
* ``"rwx"`` - read+write+execute while mapped; only when asked for by name.

Synchronization (``run_step``; details in ``_sync``): per host, chosen once from a
table keyed by the architecture's name.  On x86-64 ``local_cse`` is SERIALIZE or an
IRET to self (CPUID asks once which) and ``remote_cse`` is
``membarrier(PRIVATE_EXPEDITED_SYNC_CORE)``, with fallbacks ``PRIVATE_EXPEDITED`` ->
an mprotect TLB-shootdown IPI -> ``GLOBAL``; membarrier is first tried by a forked
child that runs only machine code, because some seccomp profiles kill on first use
(``_probe``).  The mechanism in use, why, and every fallback taken are in ``stats()``.

Every system call goes through one dispatcher (``_libc``), counted per backend
(``stats()["syscalls"]``) and failable on purpose in tests (``_libc.inject``).
Failures raise ``SystemCallError`` / ``OutOfMemoryError`` with the errno and leave
nothing half-created.

Large pages: reservations of 2 MiB or more are 2 MiB aligned; ``MFD_HUGETLB`` is used
when the system has huge pages reserved, else ``MADV_HUGEPAGE`` is a hint;
``stats()["huge_pages"]["obtained_bytes"]`` is read from ``/proc/self/smaps``.

Sizes: one reservation may not exceed ``NativeBackend(max_reservation=...)``,
by default the machine's RAM, and never the user address space; a larger request
is an ``OutOfMemoryError`` before any system call (not an OOM kill later).

Locks (``_locks``): a Python signal handler that re-enters a backend whose lock the
interrupted code holds gets ``BadStateError`` instead of a deadlock; accounting and
one-time setup locks are re-entrant.  Every lock is reinitialized in a forked child,
so a fork while another thread holds one never deadlocks the child.

Small helper routines (atomic stores, SERIALIZE/IRET/ISB, cache maintenance, the
membarrier probe) are assembled from ``ArchSpec.host_routines`` once per process into
a private page made read+execute after it is written (``_routines``).
"""

from __future__ import annotations

from execmem.native._native import NativeBackend

__all__ = ["NativeBackend"]
