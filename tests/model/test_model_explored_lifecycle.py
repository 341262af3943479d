"""The allocator core's lifecycle on a two-CPU modeled machine, under the explorer.

Hypothesis generates short operation sequences (derandomized: the run is
deterministic).  Each sequence is *interpreted* on a fresh ``Machine(arch, cpus=2)``
with ``execmem.Allocator(backend=machine)``: CPU0 (the machine's host CPU) runs the
allocator's verbs - alloc, write, map / map_rw_inplace + write + finalize, update,
free (trap refill, quarantine, pack retirement and VA reuse), batch publish - and
the function-pointer swaps of a JIT, all recorded as model steps.  CPU1 runs guest
code concurrently: in each *round* it waits for ``go == r``, loads the published
function pointer and calls it, keeps the result in a register, and stores
``done = r``.  The JIT frees a text only when the reader cannot be calling it (it
was not published during the current round: the round boundary is the client's
grace period), exactly as the catalog's scenarios (``execmem.verify``) do.

Every sequence is explored exhaustively when its state graph fits a budget, else
by seeded random schedules.  In every explored final state:

* no CPU faulted (trap filler, a torn instruction, an unmapped page);
* the value CPU1 got in round ``r`` is a version of a text it could reach in that
  round, published (or patched) no earlier than the round's start: never a freed
  text's code (VA reuse), never a replaced version, never trap filler;
* the allocator's memory is trap filler everywhere except LIVE/WRITING texts, which
  hold exactly their shadow copies.

After building, the interpreter checks the allocator's own bookkeeping (handle
states, no reuse of quarantined space before an epoch, accounting).  The harness
can fail: the same sequences with ``publish`` lacking its ``remote_cse`` step (the
catalog's ``no-remote-cse`` mutation) must give at least one counterexample per
architecture; the slow variant also runs arm64's ``no-quarantine`` mutation on the
sequences that unmapped a pack.  ``pytest -s`` prints the figures.

Not covered: more than one caller CPU, the mprotect write unit, dedicated
(larger-than-half-a-pack) texts, failure injection (see the fault tests), and
``update`` shapes other than one whole patchable instruction.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass, field

import hypothesis
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import execmem
from execmem import JitText, TextState
from execmem import arch as _arch
from execmem.emu import Machine, MachineState
from execmem.emu._trace import format_trace

ARCHES = ("arm64", "x86_64")
MAX_ROUNDS = 3

#: Reader registers: (pointer slot, go flag, done flag, scratch, called pointer, results...)
_READER_REGS = {
    "arm64": ("x3", "x5", "x6", "x2", "x1", ("x19", "x20", "x21")),
    "x86_64": ("rbx", "rbp", "r12", "rdx", "rsi", ("r8", "r9", "r10")),
}


def _reader_round(arch: str, r: int) -> str:
    res = _READER_REGS[arch][5][r - 1]
    if arch == "arm64":
        return (
            f"spin{r}: ldar x2, [x5]\ncmp x2, #{r}\nb.ne spin{r}\n"
            f"ldr x1, [x3]\ncbz x1, skip{r}\nblr x1\nmov {res}, x0\n"
            f"skip{r}: mov x2, #{r}\nstlr x2, [x6]\n"
        )
    return (
        f"spin{r}: mov rdx, [rbp]\ncmp rdx, {r}\njne spin{r}\n"
        f"mov rsi, [rbx]\ntest rsi, rsi\njz skip{r}\ncall rsi\nmov {res}, rax\n"
        f"skip{r}: mov qword ptr [r12], {r}\n"
    )


def _function(arch: str, values: tuple[int, int], second: bool) -> str:
    """arm64: a B/NOP head chooses one of two constants (both on the CMODX list, so
    ``update`` may flip it live); x86-64: ``mov eax, imm32`` in one aligned word."""
    if arch == "arm64":
        head = "b l1" if second else "nop"
        return f"{head}\nmovz x0, #{values[0]}\nret\nl1: movz x0, #{values[1]}\nret"
    return f"mov eax, {values[1] if second else values[0]}\nret"


# -- operation sequences ---------------------------------------------------------------------

#: (verb, a, b): the interpreter maps a/b onto whatever is eligible at that point.
Op = tuple[str, int, int]

_OPS = st.one_of(
    # alloc + write, then by a: 0/1 map (either version first); 2 map_rw_inplace, write,
    # finalize; 3 staged and 4 written in place, both left for a later batch publish.
    # b: bit 0 swap the pointer to it, bit 1 a bigger text (several chunks)
    st.tuples(st.just("new"), st.integers(0, 4), st.integers(0, 3)),
    st.tuples(st.just("new"), st.integers(0, 2), st.just(1)),
    st.tuples(st.just("swap"), st.integers(0, 7), st.just(0)),
    st.tuples(st.just("unpublish"), st.just(0), st.just(0)),
    st.tuples(st.just("update"), st.integers(0, 7), st.integers(0, 1)),
    st.tuples(st.just("free"), st.integers(0, 7), st.just(0)),
    # publish every staged text in one batch; a: publish() or batch() (+ a live patch)
    st.tuples(st.just("publish"), st.integers(0, 1), st.integers(0, 7)),
    st.tuples(st.just("round"), st.just(0), st.just(0)),
    # unpublish, end the round, free every text: the pack empties (VA reuse next)
    st.tuples(st.just("recycle"), st.just(0), st.just(0)),
)


@st.composite
def sequences(draw: st.DrawFn) -> tuple[int, list[Op], bool]:
    keep_empty = draw(st.integers(0, 1))
    ops = draw(st.lists(_OPS, min_size=3, max_size=7))
    cleanup = draw(st.booleans())
    return keep_empty, ops, cleanup


# -- the interpreter ---------------------------------------------------------------------------


@dataclass(eq=False)
class _Text:
    handle: JitText
    values: tuple[int, int]
    second: bool  # which of the two values the code returns now
    state: TextState
    #: (start, end) of its chunks
    span: tuple[int, int] = (0, 0)
    history: list[int] = field(default_factory=list)  # every value it returned while LIVE

    @property
    def value(self) -> int:
        return self.values[1] if self.second else self.values[0]


class Run:
    """One sequence built on one machine (see the module docstring)."""

    def __init__(self, arch: str, keep_empty: int, ops: list[Op], cleanup: bool, *,
                 recipes: dict[str, _arch.Recipe] | None = None, quarantine: bool = True) -> None:
        self.arch = arch
        spec = _arch.get(arch).with_recipes(**(recipes or {}))
        self.m = m = Machine(spec if quarantine else spec.without_quarantine(), cpus=2)
        self.a = execmem.Allocator(backend=m, pack_size=0x1000, granularity=64, keep_empty=keep_empty)
        self.host = m.host()
        self.slot, self.go, self.done = m.alloc(8), m.alloc(8), m.alloc(8)
        self.texts: list[_Text] = []
        self.next_value = 0x101
        #: (start, end, epochs started when freed) of footprints freed from mapped packs
        self.freed: list[tuple[int, int, int]] = []
        #: (pack, chunk) -> the chunk's bytes when its text was freed: a free writes nothing,
        #: the chunk keeps them until the refill (next epoch, or before reuse)
        self.unfilled: dict[tuple[int, int], bytes] = {}
        self.current: _Text | None = None  # what the slot holds
        self.round = 1
        #: per round: texts CPU1 may call, and every value it may legitimately get
        self.reachable: list[set[_Text]] = [set(), set()]
        self.allowed: list[set[int]] = [set(), set()]
        self.log: list[str] = []
        # Set-up (not explored): a first text, published.
        first = self._new(how=0, big=False)
        self._swap(first)
        m.checkpoint()
        self.reachable[1] = {first}
        self.allowed[1] = {first.value}
        self.host.store(self.go, 1, release=True, note="go 1")
        for op in ops:
            self.apply(op)
        self.host.await_value(self.done, self.round, note=f"CPU1 finished round {self.round}")
        if cleanup:
            self.log.append("cleanup")
            for t in list(self.texts):
                if t.state is not TextState.FREED:
                    self._free(t)
        self.rounds = self.round
        ptr, go, done, _, _, results = _READER_REGS[arch]
        m.load(1, "".join(_reader_round(arch, r) for r in range(1, self.rounds + 1)))
        for reg, value in ((ptr, self.slot), (go, self.go), (done, self.done)):
            m.set_reg(1, reg, value)
        for reg in results:
            m.set_reg(1, reg, 0)
        self.check_bookkeeping()
        self.expected_memory = self._expected_memory()

    # -- verbs -------------------------------------------------------------------------------

    def _stamp(self) -> tuple[int, int]:
        epochs: dict[str, int] = self.a.stats()["epochs"]  # type: ignore[assignment]
        return epochs["started"], epochs["completed"]

    def _footprint(self, t: JitText) -> tuple[int, int]:
        start = t._pack.address + t._chunk * self.a.granularity
        return start, start + t._nchunks * self.a.granularity

    def _new(self, how: int, big: bool) -> _Text:
        values = (self.next_value, self.next_value + 1)
        self.next_value += 2
        size = 200 if big else 32
        h = self.a.jit_text_alloc(size)
        span = self._footprint(h)
        for chunk in range(h._chunk, h._chunk + h._nchunks):
            self.unfilled.pop((id(h._pack), chunk), None)
        _, completed = self._stamp()
        for start, end, stamp in self.freed if self.a.arch.quarantine else ():
            if start < span[1] and span[0] < end:
                assert completed > stamp, "quarantined space reused before its epoch"
        t = _Text(h, values, second=how in (1, 4), state=TextState.RESERVED, span=span)
        code = execmem.asm(_function(self.arch, values, t.second), self.arch, h.address)
        self.texts.append(t)
        if how in (2, 4):
            h.map_rw_inplace()
            half = len(code) // 2 // 4 * 4
            h.write(0, code[:half])
            h.write(half, code[half:])
            if how == 4:
                self.log.append(f"new {h.address:#x} in place, not finalized")
                t.state = TextState.WRITING
                return t
            self.log.append(f"new {h.address:#x} in place")
            h.finalize()
            self._live(t)
        else:
            h.write(0, code)
            if how == 3:
                self.log.append(f"new {h.address:#x} staged")
            else:
                self.log.append(f"new {h.address:#x} map")
                h.map()
                self._live(t)
        return t

    def _live(self, t: _Text) -> None:
        t.state = TextState.LIVE
        t.history.append(t.value)

    def _swap(self, t: _Text | None) -> None:
        address = t.handle.address if t is not None else 0
        self.log.append(f"slot = {address:#x}")
        self.host.store(self.slot, address, release=True, note=f"publish pointer {address:#x}")
        self.current = t
        self._reach(t)

    def _reach(self, t: _Text | None) -> None:
        if len(self.reachable) <= self.round:
            return  # set-up
        if t is None:
            self.allowed[self.round].add(0)
            return
        self.reachable[self.round].add(t)
        self.allowed[self.round].add(t.value)

    def _free(self, t: _Text) -> None:
        self.log.append(f"free {t.handle.address:#x} ({t.state.name})")
        mapped = t.handle._pack.reservation.mapped
        started, _ = self._stamp()
        h, g = t.handle, self.a.granularity
        if t.state is not TextState.RESERVED:  # its memory holds code (all of it once WRITING)
            data = h.read()
            data += self.a.arch.trap_bytes(h._nchunks * g - len(data))
            for i in range(h._nchunks):
                self.unfilled[id(h._pack), h._chunk + i] = data[i * g : (i + 1) * g]
        t.handle.free()
        t.state = TextState.FREED
        if mapped:
            self.freed.append((*t.span, started))

    def _patch(self, t: _Text) -> None:
        """Flip a live text to its other version (arm64: B <-> NOP; x86: a new imm32)."""
        h = t.handle
        if self.arch == "arm64":
            new = execmem.asm("nop" if t.second else "b .+12", self.arch, h.address)
            t.second = not t.second
        else:
            t.values = (t.values[0], self.next_value) if not t.second else (self.next_value, t.values[1])
            self.next_value += 1
            t.second = not t.second
            new = execmem.asm(f"mov eax, {t.value}", self.arch, h.address)
        self.log.append(f"update {h.address:#x} -> {t.value:#x}")
        h.update(0, new)

    def _patched(self, t: _Text) -> None:
        t.history.append(t.value)
        if t in self.reachable[self.round]:
            self.allowed[self.round].add(t.value)

    def apply(self, op: Op) -> None:
        verb, a, b = op
        live = [t for t in self.texts if t.state is TextState.LIVE]
        if verb == "new":
            t = self._new(a, big=bool(b & 2))
            if b & 1 and t.state is TextState.LIVE:
                self._swap(t)
        elif verb == "swap":
            choices = [t for t in live if t is not self.current]
            if choices:
                self._swap(choices[a % len(choices)])
        elif verb == "unpublish":
            if self.current is not None:
                self._swap(None)
        elif verb == "update":
            if live:
                t = live[a % len(live)]
                self._patch(t)
                self._patched(t)
        elif verb == "free":
            # The client's grace period: never free what CPU1 may be calling this round.
            choices = [t for t in self.texts if t.state is not TextState.FREED and t not in self.reachable[self.round]]
            if choices:
                self._free(choices[a % len(choices)])
        elif verb == "publish":
            staged = [t for t in self.texts if t.state in (TextState.RESERVED, TextState.WRITING)]
            patch = live[b % len(live)] if live and a else None
            if not staged and patch is None:
                return
            self.log.append(f"publish {len(staged)} texts{' + update' if patch else ''} in one batch")
            if a:
                with self.a.batch():
                    for t in staged:
                        if t.state is TextState.WRITING:
                            t.handle.finalize()
                        else:
                            t.handle.map()
                    if patch is not None:
                        self._patch(patch)
            else:
                self.a.publish([t.handle for t in staged])
            for t in staged:
                self._live(t)
            if patch is not None:
                self._patched(patch)
        elif verb == "recycle":
            self.log.append("recycle")
            if self.current is not None:
                self._swap(None)
            self.apply(("round", 0, 0))
            for t in list(self.texts):
                if t.state is not TextState.FREED and t not in self.reachable[self.round]:
                    self._free(t)
        elif verb == "round":
            if self.round >= MAX_ROUNDS:
                return
            self.log.append("round")
            self.host.await_value(self.done, self.round, note=f"CPU1 finished round {self.round}")
            self.round += 1
            self.host.store(self.go, self.round, release=True, note=f"go {self.round}")
            self.reachable.append(set())
            self.allowed.append(set())
            self._reach(self.current)
        else:  # pragma: no cover
            raise AssertionError(verb)

    # -- checks ------------------------------------------------------------------------------

    def check_bookkeeping(self) -> None:
        stats = self.a.stats()
        for t in self.texts:
            assert t.handle.state is t.state
        by_state = stats["texts"]
        assert isinstance(by_state, dict)
        for state in (TextState.RESERVED, TextState.WRITING, TextState.LIVE):
            assert by_state[state.name] == sum(1 for t in self.texts if t.state is state)
        epochs = stats["epochs"]
        assert isinstance(epochs, dict) and epochs["started"] == epochs["completed"]
        packs = stats["packs"]
        assert isinstance(packs, list)
        for pack in packs:
            assert pack["live_bytes"] + pack["free_bytes"] + pack["quarantined_bytes"] == pack["size"]

    def _expected_memory(self) -> list[tuple[int, bytes]]:
        """(frame alias, bytes) of every reservation still held: traps except live code
        and chunks still to be refilled (the bookkeeping's ``dirty``), which keep the bytes
        their freed text left."""
        out = []
        g = self.a.granularity
        for pack, _retired in self.a._pool.rows():
            res = pack.reservation
            data = bytearray(self.a.arch.trap_bytes(res.size))
            dirty = pack.chunks.dirty
            while dirty:
                chunk = (dirty & -dirty).bit_length() - 1
                dirty &= dirty - 1
                data[chunk * g : (chunk + 1) * g] = self.unfilled.get((id(pack), chunk), data[chunk * g : (chunk + 1) * g])
            for t in self.texts:
                if t.state in (TextState.LIVE, TextState.WRITING) and t.handle._pack is pack:
                    off = t.handle.address - res.address
                    code = t.handle.read()
                    data[off : off + len(code)] = code
            out.append((res.token.alias, bytes(data)))  # type: ignore[attr-defined]
        return out

    def hazard(self, st_: MachineState) -> str:
        m = self.m
        for c in (0, 1):
            if st_.cpus[c].faults:
                pc, kind, _ = st_.cpus[c].faults[0]
                return f"CPU{c} {kind} at {pc:#x}"
        results = _READER_REGS[self.arch][5]
        for r in range(1, self.rounds + 1):
            got = m.reg(st_, 1, results[r - 1]) & 0xFFFF_FFFF
            if got not in self.allowed[r]:
                return f"round {r}: CPU1 got {got:#x}, not one of {sorted(self.allowed[r])}"
        tl, g = st_.timeline, m.isa.MODEL.granule
        for alias, data in self.expected_memory:
            for off in range(0, len(data), g):
                if tl.value_at(alias + off, tl.end) != data[off : off + g]:
                    return f"memory at frame {alias + off:#x} is not the trap filler or the live code expected"
        return ""

    def _stuck(self, schedule: list[int]) -> str:
        """Why a path could not finish: a CPU faulted (then the other waits forever)."""
        _, last = self.m.replay(schedule)
        for c in (0, 1):
            if last.cpus[c].faults:
                pc, kind, _ = last.cpus[c].faults[0]
                return f"CPU{c} {kind} at {pc:#x}"
        return "deadlock: every CPU blocked"

    # -- exploring ----------------------------------------------------------------------------

    def explore(self, *, max_states: int, runs: int, seed: int = 0) -> Outcome:
        """Exhaustive (depth-first, state hashing) within ``max_states``; when that is
        not enough, also ``runs`` seeded random schedules.  Stops at the first hazard."""
        started = time.perf_counter()
        out = Outcome()

        def observe(s: MachineState) -> Hashable:
            return self.hazard(s)

        ex = self.m.explore(observe, max_states=max_states, stop=bool)
        out.states = ex.states
        out.complete = ex.complete
        out.schedules = ex.schedules
        for obs, w in ex.finals.items():
            if obs:
                out.hazards.setdefault(str(obs), w.schedule)
        if ex.stuck is not None:
            out.hazards.setdefault(self._stuck(ex.stuck.schedule), ex.stuck.schedule)
        if not ex.complete and not out.hazards:
            rnd = self.m.explore(observe, exhaustive_search=False, runs=runs, seed=seed)
            out.runs, out.steps = rnd.runs, rnd.states
            for obs, w in rnd.finals.items():
                if obs:
                    out.hazards.setdefault(str(obs), w.schedule)
            if rnd.stuck is not None:
                out.hazards.setdefault(self._stuck(rnd.stuck.schedule), rnd.stuck.schedule)
        out.seconds = time.perf_counter() - started
        return out

    def explain(self, out: Outcome) -> str:
        """The first hazard, the operations and the replayed per-CPU trace."""
        text, schedule = next(iter(out.hazards.items()))
        steps, _ = self.m.replay(schedule)
        names = ("CPU0 allocator", "CPU1 caller")
        return f"{self.arch}: {text}\n  ops: {' / '.join(self.log)}\n{format_trace(steps, 2, names=names)}"


@dataclass
class Outcome:
    complete: bool = False
    #: distinct states of the depth-first search, and complete executions it covered
    #: (all of them when ``complete``; distinct final states otherwise)
    states: int = 0
    schedules: int = 0
    #: random schedules run after an incomplete search, and their steps
    runs: int = 0
    steps: int = 0
    seconds: float = 0.0
    hazards: dict[str, list[int]] = field(default_factory=dict)


# -- the tests ---------------------------------------------------------------------------------


def _no_remote_cse(arch: str) -> dict[str, _arch.Recipe]:
    """The catalog's ``no-remote-cse`` mutation (x86-64: ``no-serialize``'s remote half)."""
    return {"publish": _arch.get(arch).recipe("publish").without("remote_cse")}


#: A sequence that empties the pack and reuses its address for different code (seeds/000).
VA_REUSE: tuple[int, list[Op], bool] = (0, [("new", 0, 1), ("recycle", 0, 0), ("new", 0, 1)], False)


@dataclass
class Figures:
    sequences: int = 0
    ops: int = 0
    rounds: int = 0
    exhaustive: int = 0
    states: int = 0
    schedules: int = 0
    runs: int = 0
    steps: int = 0
    caught: dict[str, int] = field(default_factory=dict)
    tried: dict[str, int] = field(default_factory=dict)
    example: str = ""
    seconds: float = 0.0

    def add(self, out: Outcome) -> None:
        self.exhaustive += out.complete
        self.states += out.states
        self.schedules += out.schedules
        self.runs += out.runs
        self.steps += out.steps

    def report(self, arch: str, label: str) -> str:
        caught = ", ".join(f"{name} caught in {n}/{self.tried.get(name, 0)}" for name, n in self.caught.items())
        return (
            f"\n[{arch} {label}] {self.sequences} sequences, {self.ops} ops, {self.rounds} reader rounds: "
            f"{self.exhaustive} explored exhaustively, the rest to {self.states} states depth-first "
            f"+ {self.runs} random schedules ({self.steps} steps); {self.schedules} complete executions "
            f"counted depth-first; every one safe.  Mutants: {caught}.  {self.seconds:.1f}s"
            + (f"\n  first counterexample: {self.example}" if self.example else "")
        )


def _mutants(arch: str, extra: bool) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {"no-remote-cse": {"recipes": _no_remote_cse(arch)}}
    if extra:
        out["no-quarantine"] = {"quarantine": False}
    return out


def _lifecycle(arch: str, *, examples: int, seed: int, max_states: int, runs: int, extra_mutants: bool = False) -> Figures:
    fig = Figures()
    seen: set[str] = set()
    mutants = _mutants(arch, extra_mutants)
    fig.caught = dict.fromkeys(mutants, 0)
    started = time.perf_counter()

    @hypothesis.seed(seed)
    @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @example(seq=VA_REUSE)
    @given(seq=sequences())
    def check(seq: tuple[int, list[Op], bool]) -> None:
        if repr(seq) in seen:
            return
        seen.add(repr(seq))
        keep_empty, ops, cleanup = seq
        run = Run(arch, keep_empty, ops, cleanup)
        out = run.explore(max_states=max_states, runs=runs)
        if out.hazards:
            pytest.fail(run.explain(out))
        fig.sequences += 1
        fig.ops += len(ops)
        fig.rounds += run.rounds
        fig.add(out)
        unmapped = run.m.stats()["calls"].get("unmap", 0)  # type: ignore[attr-defined]
        for name, kw in mutants.items():
            if name == "no-quarantine" and not unmapped:
                continue  # quarantine matters only where a pack was unmapped and remapped
            fig.tried[name] = fig.tried.get(name, 0) + 1
            mutant = Run(arch, keep_empty, ops, cleanup, **kw)  # type: ignore[arg-type]
            bad = mutant.explore(max_states=max_states, runs=runs)
            if bad.hazards:
                fig.caught[name] += 1
                if not fig.example:
                    fig.example = f"{name}: {next(iter(bad.hazards))}; ops: {' / '.join(mutant.log)}"

    check()
    fig.seconds = time.perf_counter() - started
    return fig


@pytest.mark.parametrize("arch", ARCHES)
def test_allocator_lifecycle_on_two_cpus_under_the_explorer(arch: str) -> None:
    fig = _lifecycle(arch, examples=10, seed=0, max_states=600, runs=12)
    print(fig.report(arch, "quick"))
    assert fig.sequences >= 8
    assert fig.caught["no-remote-cse"] >= 1, "the no-remote-cse mutation went unnoticed: the harness is vacuous"


def test_va_reuse_without_quarantine_runs_the_freed_code_arm64() -> None:
    """The VA_REUSE sequence (safe in the test above) with quarantine off: CPU1 calls the
    new text and runs the freed text's instructions, still in flight (seeds/000)."""
    run = Run("arm64", *VA_REUSE, quarantine=False)
    out = run.explore(max_states=2000, runs=20)
    assert out.hazards, "no counterexample without quarantine"
    freed = run.texts[0]
    assert freed.state is TextState.FREED and run.texts[-1].handle.address == freed.handle.address
    assert any(f"got {freed.value:#x}" in h for h in out.hazards), run.explain(out)
    print("\n" + run.explain(out).splitlines()[0])


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHES)
def test_allocator_lifecycle_on_two_cpus_under_the_explorer_more(arch: str) -> None:
    fig = _lifecycle(arch, examples=16, seed=1, max_states=1200, runs=20, extra_mutants=arch == "arm64")
    print(fig.report(arch, "slow"))
    assert fig.caught["no-remote-cse"] >= 1
    if arch == "arm64":
        assert fig.caught["no-quarantine"] >= 1
