"""The publish recipe's instruction-cache step is necessary on a real, independently
written model of an instruction cache: QEMU's translation cache.

QEMU (8.1 and newer) translates guest code into blocks it keeps until the guest
stores to that code through a mapping QEMU watches, unmaps it, or runs ``IC IVAU``
over it (QEMU issue 1034).  Dual mode writes code with ``pwrite`` into the file behind
a read+execute view: QEMU never sees that store, just as an arm64 instruction cache
does not snoop it (Arm ARM D7.5.2).  So on arm64 under QEMU, code published over
old code at the same address runs the old translation unless the recipe invalidates
it: the native counterpart of the verification catalog's ``no-ic`` mutation.

The mutated recipe is data (``ArchSpec.with_recipes``) handed to the backend, as the
verification catalog hands it to the modeled machine: no allocator option reaches it.
"""

from __future__ import annotations

import ctypes

import pytest
from programs import HOST, const, needs_programs

import execmem
from execmem.arch import ArchSpec
from execmem.native import NativeBackend

pytestmark = [
    needs_programs,
    pytest.mark.skipif(
        "invalidate_icache" not in HOST.publish.names,
        reason=f"{HOST.name}: instruction fetch is coherent with stores; the recipe has no "
        "invalidate_icache step to remove",
    ),
]

ROUNDS = 20


def cpu_implementers() -> set[str]:
    """``CPU implementer`` values of /proc/cpuinfo (MIDR_EL1.Implementer)."""
    try:
        with open("/proc/cpuinfo") as f:
            return {line.split(":")[1].strip() for line in f if line.startswith("CPU implementer")}
    except OSError:
        return set()


#: MIDR_EL1.Implementer 0x00 is "reserved for software use" (Arm ARM, MIDR_EL1): the
#: CPU is an emulator's, such as QEMU's default "max" CPU.  Only there is stale code
#: certain after a missing invalidate: a hardware instruction cache may have dropped
#: the old line by itself (or have CTR_EL0.DIC=1).
EMULATED = cpu_implementers() == {"0x00"}


def republish_rounds(spec: ArchSpec) -> list[tuple[int, int]]:
    """``ROUNDS`` times: publish ``return old`` and call it (so it is translated), free
    it, publish ``return new`` at the same address (it comes back after the quarantine
    epoch) and call it.  Returns (old, got) for each round where ``got`` is not ``new``."""
    backend = NativeBackend("dual", arch=spec)
    a = execmem.Allocator(backend=backend, pack_size=1 << 16)
    wrong: list[tuple[int, int]] = []
    try:
        anchor = a.jit_text_alloc(64)
        anchor.write(0, const(0))
        anchor.map()  # the pack is mapped: what follows runs the publish recipe
        for k in range(ROUNDS):
            old, new = 1000 + k, 2000 + k
            t = a.jit_text_alloc(64)
            t.write(0, const(old))
            t.map()
            assert t.function(ctypes.c_int)() == old
            address = t.address
            t.free()
            others = []
            for _ in range(100):  # each publish into the mapped pack advances the epochs
                u = a.jit_text_alloc(64)
                u.write(0, const(new))
                u.map()
                if u.address == address:
                    break
                others.append(u)
            assert u.address == address, "the freed address never came back"
            got = u.function(ctypes.c_int)()
            assert got in (old, new), got
            if got != new:
                wrong.append((old, got))
            for text in (u, *others):
                text.free()
    finally:
        a.close()
        backend.close()
    return wrong


def test_the_full_recipe_never_runs_stale_code() -> None:
    assert republish_rounds(HOST) == []


@pytest.mark.skipif("invalidate_icache" in HOST.publish.names and not EMULATED, reason="stale code is certain only on an emulator's instruction "
                    "cache (QEMU); this CPU's may drop the old line by itself")
def test_without_ic_ivau_the_old_code_runs() -> None:
    mutated = HOST.with_recipes(publish=HOST.publish.without("invalidate_icache"))
    stale = republish_rounds(mutated)
    assert stale, f"{ROUNDS} republications without IC IVAU all ran the new code"
    print(f"\n[icache] without IC IVAU: {len(stale)} of {ROUNDS} republications ran the old code")
