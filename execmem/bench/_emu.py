"""Benchmarks of the modeled machine (ratios against a baseline measured in the same run).

* ``guest_throughput``: a register-only loop (no racing accesses) on the modeled
  machine versus the same code on one raw Unicorn instance (``emu_start`` with no
  hooks and no instruction count: Unicorn's fastest mode).
* ``exploration_time``: exhaustive exploration of a two-thread program of
  litmus size (message passing with cache maintenance, 6-7 instructions a thread).
"""

from __future__ import annotations

import ctypes
import statistics
import time
from dataclasses import dataclass

import unicorn

from execmem import arch as _arch
from execmem._errors import UnsupportedError
from execmem.emu import Machine, MachineState
from execmem.emu._machine import assemble


def modeled() -> tuple[str, ...]:
    """The architectures the modeled machine runs (their ``*_isa`` has a bench loop)."""
    out = []
    for name in _arch.names():
        try:
            isa = _arch.isa(_arch.get(name))
        except UnsupportedError:
            continue
        if hasattr(isa, "BENCH_LOOP"):
            out.append(name)
    return tuple(out)


def _instructions(arch: str, code: bytes, labels: dict[str, int], base: int, n: int) -> int:
    """Instructions the loop executes in ``n`` iterations (set-up + n * body)."""
    isa = _arch.isa(_arch.get(arch))

    def count(start: int, stop: int) -> int:
        k = 0
        while start < stop:
            start += max(isa.decode_bytes(code[start - base :]).length, 1)
            k += 1
        return k

    return count(base, labels["loop"]) + n * count(labels["loop"], labels["end"])


@dataclass
class Throughput:
    arch: str
    instructions: int
    raw_seconds: float
    model_seconds: float

    @property
    def raw_mips(self) -> float:
        return self.instructions / self.raw_seconds / 1e6

    @property
    def model_mips(self) -> float:
        return self.instructions / self.model_seconds / 1e6

    @property
    def ratio(self) -> float:
        return self.raw_seconds / self.model_seconds


def _raw(arch: str, code: bytes, labels: dict[str, int], base: int) -> float:
    spec = _arch.get(arch)
    assert spec.engines.unicorn is not None
    uc = unicorn.unicorn.Uc(*spec.engines.unicorn)
    buf = ctypes.create_string_buffer(0x10000)
    uc.mem_map_ptr(base, 0x10000, unicorn.UC_PROT_ALL, ctypes.addressof(buf))
    ctypes.memmove(buf, code, len(code))
    started = time.perf_counter()
    uc.emu_start(base, labels["end"])
    return time.perf_counter() - started


def guest_throughput(arch: str, *, iterations: int = 2_000_000, repeats: int = 5) -> Throughput:
    spec = _arch.get(arch)
    src = _arch.isa(spec).BENCH_LOOP.format(n=iterations, lo=iterations & 0xFFFF, hi=iterations >> 16)
    base = 0x10_0000
    code, labels = assemble(spec, src, base)
    raw, model = [], []
    for _ in range(repeats):
        raw.append(_raw(arch, code, labels, base))
        m = Machine(arch, cpus=1)
        m.load(0, src, at=base)
        m.model()  # build the Unicorn instances outside the timed part, as for raw
        started = time.perf_counter()
        m.run_sequential()
        model.append(time.perf_counter() - started)
    instructions = _instructions(arch, code, labels, base, iterations)
    return Throughput(arch, instructions, statistics.median(raw), statistics.median(model))


def exploration_time(*, repeats: int = 5) -> tuple[float, int]:
    """Median seconds to explore message passing with cache maintenance exhaustively."""
    times, states = [], 0
    for _ in range(repeats):
        m = Machine("arm64", cpus=2, line_size=4)
        reader = m.load(1, "ldr w2, [x3]\ncbnz w2, l1\nl1: isb\nm0: b l0\nmov w9, #1\nl0:", perms="rwx")
        flag = m.alloc(4)
        m.load(0, "str w0, [x1]\ndc cvau, x1\ndsb ish\nic ivau, x1\ndsb ish\nstr w2, [x3]", perms="rwx")
        m.set_reg(0, "x0", 0xD503201F)
        m.set_reg(0, "x1", reader.labels["m0"])
        m.set_reg(0, "x2", 1)
        for c in (0, 1):
            m.set_reg(c, "x3", flag)
        def observe(st: MachineState, m: Machine = m) -> tuple[int, int]:
            return m.reg(st, 1, "w2"), m.reg(st, 1, "w9")

        started = time.perf_counter()
        result = m.explore(observe)
        times.append(time.perf_counter() - started)
        states = result.states
    return statistics.median(times), states


if __name__ == "__main__":
    for arch in modeled():
        t = guest_throughput(arch)
        print(f"{arch}: raw {t.raw_mips:.0f} M insn/s, modeled {t.model_mips:.0f} M insn/s, ratio {t.ratio:.2f}")
    seconds, states = exploration_time()
    print(f"two-thread exhaustive exploration: {seconds * 1000:.0f} ms, {states} states")
