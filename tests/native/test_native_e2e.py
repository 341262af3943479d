"""End to end through the public API on the native backend: many tiny functions
densely packed, threads calling while others allocate, publish and free in the same
pack, and a W^X audit throughout."""

from __future__ import annotations

import ctypes
import random
import threading
import time
from typing import Any

import pytest
from programs import CONST_SIZE, needs_programs
from programs import const as const_fn

import execmem
from execmem.native import NativeBackend, _procmaps

pytestmark = [
    needs_programs,
    pytest.mark.skipif(not hasattr(execmem, "Allocator"), reason="the allocator core has not landed"),
]

PACK = 2 << 20


def audit(backend: NativeBackend) -> None:
    assert _procmaps.wx_violations(backend.owned_ranges()) == []


@pytest.mark.parametrize("mode", ("dual", "mprotect"))
def test_thousand_tiny_functions_densely_packed(mode: str) -> None:
    backend = NativeBackend(mode)
    allocator: Any = execmem.Allocator(backend=backend, pack_size=PACK, granularity=64)  # type: ignore[attr-defined]
    try:
        texts = []
        for i in range(1200):
            t = allocator.jit_text_alloc(16)
            t.write(0, const_fn(i))
            texts.append(t)
        for t in texts:
            t.map()
        audit(backend)
        packs = {t.address // PACK for t in texts}
        assert len(packs) <= 2, f"{len(texts)} tiny texts spread over {len(packs)} packs"
        for i, t in enumerate(texts):
            assert t.function(ctypes.c_int)() == i
        for t in texts[::2]:
            t.free()
        audit(backend)
        for i, t in enumerate(texts[1::2]):
            assert t.function(ctypes.c_int)() == 2 * i + 1
        stats = backend.stats()
        assert stats["reservations"] <= 2
    finally:
        allocator.close()
        backend.close()


@pytest.mark.parametrize("mode", ("dual", "mprotect"))
def test_threads_call_while_others_alloc_publish_free(mode: str) -> None:
    backend = NativeBackend(mode)
    allocator: Any = execmem.Allocator(backend=backend, pack_size=PACK, granularity=64)  # type: ignore[attr-defined]
    stop = threading.Event()
    errors: list[BaseException] = []
    stable = []
    for i in range(8):
        t = allocator.jit_text_alloc(16)
        t.write(0, const_fn(1000 + i))
        t.map()
        stable.append(t)

    def caller(k: int) -> None:
        fns = [t.function(ctypes.c_int) for t in stable]
        try:
            while not stop.is_set():
                for i, fn in enumerate(fns):
                    if fn() != 1000 + i:
                        raise AssertionError(f"caller {k}: stable text {i} changed")
        except BaseException as exc:
            errors.append(exc)

    def churner(seed: int) -> None:
        rng = random.Random(seed)
        live: list[tuple[Any, int]] = []
        try:
            while not stop.is_set():
                if live and rng.random() < 0.45:
                    t, v = live.pop(rng.randrange(len(live)))
                    assert t.function(ctypes.c_int)() == v
                    t.free()
                else:
                    v = rng.randrange(1 << 30)
                    t = allocator.jit_text_alloc(rng.choice((CONST_SIZE, 16, 100, 300)))
                    t.write(0, const_fn(v))
                    t.map()
                    live.append((t, v))
            for t, _ in live:
                t.free()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
    threads += [threading.Thread(target=churner, args=(s,)) for s in range(2)]
    for th in threads:
        th.start()
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline and not errors:
            audit(backend)
            time.sleep(0.05)
    finally:
        stop.set()
        for th in threads:
            th.join()
        try:
            assert not errors, errors[0]
            audit(backend)
        finally:
            allocator.close()
            backend.close()
