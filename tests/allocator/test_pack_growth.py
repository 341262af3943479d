"""Packs map only what they hold and grow in place (``_packs``, ``Backend.grow``).

A pack is a ``pack_size`` slot of which the first request's needs, rounded up to
``COMMIT_STEP``, are mapped; when nothing fits, the pack is extended right after its
end before a new pack is reserved.  On the native backend the extension joins the
pack's VMA (one mapping however many texts), and when the addresses after a pack are
taken, it keeps its size and a new pack follows.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
from typing import Any

import pytest
from programs import const, mappings_over, needs_programs, traps

import execmem
from execmem._errors import OutOfMemoryError
from execmem._packs import COMMIT_STEP
from execmem.native import NativeBackend, _libc, _procmaps, _sync

MIB = 1 << 20
SAFE = lambda: _sync.ProbeResult(True, "test")  # noqa: E731


def test_first_pack_maps_one_step_and_grows_in_place(make_allocator: Any) -> None:
    backend, a = make_allocator()
    first = a.jit_text_alloc(16)
    (res,) = backend.reservations
    assert (res.size, res.capacity) == (COMMIT_STEP, 2 * MIB)
    texts = [a.jit_text_alloc(64) for _ in range(COMMIT_STEP // 64)]  # one more than fits
    assert backend.reservations == [res]
    assert res.size == 2 * COMMIT_STEP
    assert texts[-1].address == res.address + COMMIT_STEP  # right after the old end
    assert backend.counts["grow"] == 1 and backend.counts["reserve"] == 1
    assert a.stats()["events"]["packs_grown"] == 1
    assert backend.read(res.address + COMMIT_STEP + 64, 64) == b"\xcc" * 64
    first.free()


def test_a_batch_grows_the_pack_once_to_what_it_needs(make_allocator: Any) -> None:
    backend, a = make_allocator()
    a.jit_text_alloc(16)
    texts = a.jit_text_alloc_many([48] * 5000)
    (res,) = backend.reservations
    need = (1 + 5000) * 64
    assert res.size == -(-need // COMMIT_STEP) * COMMIT_STEP
    assert backend.counts["grow"] == 1
    a.publish(texts, [b"\x90" * 48] * len(texts))


def test_the_first_request_sets_the_first_size(make_allocator: Any) -> None:
    backend, a = make_allocator()
    a.jit_text_alloc_many([64] * 3000)
    (res,) = backend.reservations
    assert res.size == -(-3000 * 64 // COMMIT_STEP) * COMMIT_STEP and backend.counts["grow"] == 0


def test_a_full_pack_is_followed_by_a_new_one(make_allocator: Any) -> None:
    backend, a = make_allocator(pack_size=4 * COMMIT_STEP)
    for _ in range(4 * COMMIT_STEP // 1024 + 1):
        a.jit_text_alloc(1024)
    first, second = backend.reservations
    assert first.size == first.capacity == 4 * COMMIT_STEP
    assert second.size == COMMIT_STEP


def test_refused_growth_means_a_new_pack(make_allocator: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    backend, a = make_allocator()
    a.jit_text_alloc(16)
    monkeypatch.setattr(backend, "grow", lambda res, size: False)
    big = a.jit_text_alloc(COMMIT_STEP)
    first, second = backend.reservations
    assert first.size == COMMIT_STEP and big.address == second.address
    small = a.jit_text_alloc(16)  # what still fits goes to the first pack
    assert first.address <= small.address < first.address + first.size


def test_failed_growth_is_a_clear_error_that_changes_nothing(make_allocator: Any) -> None:
    backend, a = make_allocator()
    a.jit_text_alloc(16)
    before = repr(a.stats())
    backend.fail("grow")
    with pytest.raises(OutOfMemoryError, match="grow"):
        a.jit_text_alloc(COMMIT_STEP)
    assert repr(a.stats()) == before
    assert a.jit_text_alloc(COMMIT_STEP).address == backend.reservations[0].address + 64


def test_the_modeled_machine_gives_whole_packs() -> None:
    from execmem.emu import Machine

    m = Machine(arch="arm64", cpus=1)
    with execmem.Allocator(backend=m) as a:
        t = a.jit_text_alloc(16)
        res = t._pack.reservation
        assert res.size == res.capacity == 2 * MIB


# --- native -----------------------------------------------------------------------------------

native = needs_programs


@native
@pytest.mark.parametrize("mode", ["dual", "mprotect", "rwx"])
def test_native_growth_keeps_one_mapping_of_traps(mode: str, other_thread: None) -> None:
    with NativeBackend(mode, probe=SAFE, huge_pages=False) as b, execmem.Allocator(backend=b) as a:
        texts = a.jit_text_alloc_many([64] * 2500)  # 160,000 bytes: three steps
        a.publish(texts, [const(i) for i in range(len(texts))])
        res = texts[0]._pack.reservation
        assert res.size == 3 * COMMIT_STEP
        # Past the end: grows while mapped (mprotect mode: a page a text, its write unit).
        size = max(64, b.write_unit)
        more = a.jit_text_alloc_many([size] * (2 * COMMIT_STEP // size))
        a.publish(more, [const(10_000 + i) for i in range(len(more))])
        assert more[-1]._pack.reservation is res and res.size == 5 * COMMIT_STEP
        calls = [t.function(ctypes.c_int)() for t in (texts[0], texts[-1], more[0], more[-1])]
        assert calls == [0, 2499, 10_000, 10_000 + len(more) - 1]
        ((start, end, perms),) = mappings_over(res.address, res.size)
        assert (start, end) == (res.address, res.address + res.size)
        assert perms.startswith("r-x" if mode != "rwx" else "rwx")
        tail = more[-1].address + size - res.address
        assert ctypes.string_at(res.address + tail, res.size - tail) == traps(res.size - tail)
        assert mode == "rwx" or not _procmaps.wx_violations(b.owned_ranges())


@native
@pytest.mark.parametrize("mode", ["dual", "mprotect"])
def test_native_pack_blocked_from_growing_is_followed_by_a_new_pack(mode: str) -> None:
    with NativeBackend(mode, probe=SAFE, huge_pages=False) as b, execmem.Allocator(backend=b) as a:
        first = a.jit_text_alloc(16)
        first.write(0, const(1))
        first.map()
        res = first._pack.reservation
        sys_ = _libc.Syscalls()
        flags = _libc.MAP_PRIVATE | _libc.MAP_ANONYMOUS | _libc.MAP_FIXED_NOREPLACE
        obstacle = sys_.mmap(res.address + res.size, 4096, _libc.PROT_READ, flags)
        try:
            assert obstacle == res.address + res.size
            big = a.jit_text_alloc(COMMIT_STEP)
            big.write(0, const(2))
            big.map()
            assert big._pack.reservation is not res and res.size == COMMIT_STEP
            assert a.stats()["events"].get("packs_grown", 0) == 0
            assert (first.function(ctypes.c_int)(), big.function(ctypes.c_int)()) == (1, 2)
            big.free()
        finally:
            sys_.munmap(obstacle, 4096)


@native
def test_native_packs_are_placed_next_to_each_other(other_thread: None) -> None:
    """Later packs go right below the previous one: a code region, within branch range."""
    with NativeBackend("dual", probe=SAFE, huge_pages=False) as b, execmem.Allocator(backend=b, pack_size=4 * COMMIT_STEP) as a:
        texts = [a.jit_text_alloc(COMMIT_STEP) for _ in range(12)]  # four texts a pack
        packs = sorted({t._pack.reservation.address for t in texts})
        assert len(packs) == 3
        assert packs[2] - packs[0] == 2 * 4 * COMMIT_STEP


def test_growth_beyond_capacity_is_refused_without_a_system_call() -> None:
    with NativeBackend("dual", probe=SAFE, huge_pages=False) as b:
        r = b.reserve(COMMIT_STEP, 2 * MIB, 2 * MIB)
        before = dict(b.stats()["syscalls"])  # type: ignore[arg-type]
        assert b.grow(r, 4 * MIB) is False
        assert b.grow(r, COMMIT_STEP) is True
        assert dict(b.stats()["syscalls"]) == before  # type: ignore[arg-type]
        with pytest.raises(OutOfMemoryError):
            b.reserve(COMMIT_STEP, 16, 1 << 60)


@native
def test_a_tight_address_space_limit_gives_up_the_room_to_grow_not_the_pack() -> None:
    """Under ``RLIMIT_AS`` the 256 MiB of room above a new pack may not fit: the pack
    is still made (where it lands), in a child so the limit stays there."""
    script = (
        "import ctypes, resource, execmem\n"
        "vsz = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vsz + (64 << 20),) * 2)\n"
        "a = execmem.Allocator()\n"
        "texts = a.jit_text_alloc_many([64] * 100)\n"
        f"a.publish(texts, [bytes.fromhex({const(3).hex()!r})] * 100)\n"
        "print(texts[5].function(ctypes.c_int)())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, "3\n"), done.stderr


def test_stats_and_the_text_map_show_what_a_pack_grows_to(make_allocator: Any) -> None:
    from execmem._stats_cli import text_map

    _, a = make_allocator()
    a.jit_text_alloc(16)
    totals = a.stats()["totals"]
    assert (totals["reserved_bytes"], totals["capacity_bytes"]) == (COMMIT_STEP, 2 * MIB)
    assert "64 KiB (grows in place up to 2,048 KiB)" in text_map(a)
