"""Everything execmem knows about an architecture, supplied as data.

Each module here (``x86_64``, ``arm64``, ``riscv64``) exports one frozen
:class:`ArchSpec`.  The core (allocator, native backend, modeled machine, verifier)
never compares architecture names: it looks a spec up with :func:`get` and asks it.

The synchronization *recipes* are the heart of it: an ordered tuple of named steps
that the native backend executes for real and the modeled machine executes as model
actions.  The verification catalog derives its mutations from the same tuples
(:meth:`Recipe.without`, :meth:`Recipe.moved_before`), so what is verified on the
model is what runs natively.

Installed as ``execmem.arch`` (never as a top-level ``arch`` module, a name a popular
PyPI package owns).
"""

from __future__ import annotations

import importlib
import platform
from dataclasses import dataclass, field, replace
from types import ModuleType

from execmem._errors import UnsupportedError

#: Step names a recipe may use, with what each one does.  Backends implement every
#: name; a recipe is any ordering of them.
STEP_DOCS: dict[str, str] = {
    "write": "copy the staged code bytes to their final location through the writable side (never an executable mapping)",
    "clean_dcache": "clean data cache lines to the point of unification (arm64 DC CVAU)",
    "barrier": "data synchronization barrier that completes the maintenance so far (arm64 DSB ISH)",
    "invalidate_icache": "invalidate instruction cache lines to the point of unification (arm64 IC IVAU)",
    "local_cse": "context synchronization on the writing CPU (arm64 ISB, x86 serializing instruction)",
    "remote_cse": "context synchronization on every other CPU (membarrier SYNC_CORE, IPI)",
    "map": "install the executable view of fresh memory (mmap / page-table entry + TLB fill)",
    "atomic_store": "single-copy-atomic store of one aligned word (live patching)",
}


@dataclass(frozen=True)
class RecipeStep:
    """One named step of a synchronization recipe.

    ``skip_if`` names a cache-type feature (``"idc"``/``"dic"``, from CTR_EL0) under
    which the architecture makes the step unnecessary; ``why`` cites the source.
    """

    name: str
    why: str
    skip_if: str | None = None

    def __post_init__(self) -> None:
        if self.name not in STEP_DOCS:
            raise ValueError(f"unknown recipe step {self.name!r}")


@dataclass(frozen=True)
class Recipe:
    """An ordered tuple of :class:`RecipeStep`, executed once per batch."""

    name: str
    steps: tuple[RecipeStep, ...]
    #: ``effective`` per feature set, made once (every publish asks).
    _effective: dict[frozenset[str], tuple[RecipeStep, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(step.name for step in self.steps)

    def effective(self, features: frozenset[str] = frozenset()) -> tuple[RecipeStep, ...]:
        """The steps that remain under the given cache-type features (``{"idc", "dic"}``)."""
        if type(features) is not frozenset:
            features = frozenset(features)
        steps = self._effective.get(features)
        if steps is None:
            steps = self._effective[features] = tuple(s for s in self.steps if s.skip_if is None or s.skip_if not in features)
        return steps

    def without(self, name: str, *, occurrence: int | None = None) -> Recipe:
        """This recipe minus every step called ``name`` (or only its n-th occurrence)."""
        if name not in self.names:
            raise ValueError(f"recipe {self.name!r} has no step {name!r}")
        kept: list[RecipeStep] = []
        seen = 0
        for step in self.steps:
            if step.name == name:
                seen += 1
                if occurrence is None or seen - 1 == occurrence:
                    continue
            kept.append(step)
        return Recipe(f"{self.name}-without-{name}", tuple(kept))

    def moved_before(self, name: str, anchor: str) -> Recipe:
        """This recipe with step ``name`` moved just before the first ``anchor``."""
        if name not in self.names or anchor not in self.names:
            raise ValueError(f"recipe {self.name!r} lacks {name!r} or {anchor!r}")
        moving = next(s for s in self.steps if s.name == name)
        rest = [s for s in self.steps if s is not moving]
        index = next(i for i, s in enumerate(rest) if s.name == anchor)
        rest.insert(index, moving)
        return Recipe(f"{self.name}-{name}-before-{anchor}", tuple(rest))


@dataclass(frozen=True)
class PatchRule:
    """Which live patches the architecture allows while other CPUs may execute the code.

    ``word`` is the size of the single-copy-atomic store used; a patch must lie inside
    one aligned word.  ``whole_instruction`` requires old and new bytes to each be
    exactly one instruction.  ``mnemonics`` (if not empty) lists the instructions that
    may be modified concurrently with execution (both old and new must be in it).
    """

    word: int
    whole_instruction: bool
    mnemonics: frozenset[str] = frozenset()
    max_size: int = 8
    why: str = ""


@dataclass(frozen=True)
class DirectBranch:
    """A direct branch or call whose target ``JitText.retarget`` may rewrite in place.

    The instruction is ``size`` bytes, read as one little-endian integer: it is this
    branch when ``word & mask == match``; its signed displacement is the ``bits``-bit
    field at ``shift``, in units of ``scale`` bytes, counted from the next instruction
    (``from_next``, x86) or from the branch itself (arm64).
    """

    name: str
    size: int
    mask: int
    match: int
    shift: int
    bits: int
    scale: int = 1
    from_next: bool = False

    def matches(self, code: bytes) -> bool:
        return len(code) == self.size and int.from_bytes(code, "little") & self.mask == self.match

    def encode(self, code: bytes, address: int, target: int) -> bytes | None:
        """``code`` with its displacement set to reach ``target`` from ``address``, or
        ``None`` when the field cannot express it (out of reach or misaligned)."""
        distance = target - (address + self.size if self.from_next else address)
        if distance % self.scale:
            return None
        displacement = distance // self.scale
        if not -(1 << (self.bits - 1)) <= displacement < 1 << (self.bits - 1):
            return None
        field_mask = ((1 << self.bits) - 1) << self.shift
        word = int.from_bytes(code, "little") & ~field_mask | (displacement << self.shift) & field_mask
        return word.to_bytes(self.size, "little")


@dataclass(frozen=True)
class AsmSyntax:
    """One assembler syntax Keystone offers for an architecture.

    ``keystone_option`` is the ``KS_OPT_SYNTAX`` value to set (``None``: Keystone's
    default).  ``foreign`` is a regular expression matching a token that only another
    syntax uses (``%rax`` in Intel syntax): a statement containing one is refused with
    ``hint`` instead of being half-assembled.
    """

    name: str
    keystone_option: int | None = None
    foreign: str = ""
    hint: str = ""


@dataclass(frozen=True)
class AsmDialect:
    """What ``execmem.asm`` needs to know about Keystone's assembler for one architecture.

    Measured on Keystone 0.9.2; ``execmem/_asm.py`` explains how each field is used.
    """

    #: The syntaxes ``asm(syntax=...)`` accepts; the first is the default.
    syntaxes: tuple[AsmSyntax, ...]
    #: Starts a comment anywhere outside a string (besides ``//`` and ``/* */``), "" if none.
    line_comment: str
    #: Size in bytes of the ``.word`` directive.
    word_size: int
    #: Capstone mnemonics whose last operand, when it is an immediate, is a PC-relative
    #: target: ``asm`` checks that the encoding reaches the target the source names,
    #: because Keystone 0.9.2 silently truncates one out of reach.
    pc_relative: frozenset[str]
    #: Of those, the ones that form the target's page address (``adrp``): page size.
    page_relative: tuple[tuple[str, int], ...] = ()
    #: The largest output assembled in this process (larger sources go to a helper
    #: process): beyond it Keystone may end the process (see ``fixups_abort``).
    inprocess_output: int = 1 << 20
    #: Keystone ends the process (``report_fatal_error``) when a fixup is out of range
    #: or misaligned, so label references that could produce one are assembled in a
    #: helper process.
    fixups_abort: bool = False
    #: Branches ``{disp32}`` may force to their long form (GNU as syntax), by mnemonic.
    long_branches: tuple[tuple[str, str], ...] = ()
    #: Instruction prefixes that may stand alone as a statement (``rep; movsb``): their
    #: bytes join the next statement's instruction.
    prefixes: frozenset[str] = frozenset()


@dataclass(frozen=True)
class EngineModes:
    """Keystone / Capstone / Unicorn (arch, mode) constants for one architecture.

    Written as numbers, not as the libraries' names, so that describing an
    architecture imports none of them: allocating and calling code needs no
    emulator (56 MB of Unicorn), only the modeled machine does.  A test checks each
    number against the installed library's constant.
    """

    keystone: tuple[int, int] | None
    capstone: tuple[int, int] | None
    unicorn: tuple[int, int] | None


@dataclass(frozen=True)
class ElfIdentity:
    """What an ELF file for this architecture carries, for the files execmem writes
    for debuggers and profilers (``execmem.debuginfo``: jitdump, GDB's JIT interface).

    ``machine`` is ``e_machine`` (System V gABI, ``<elf.h>``); ``flags`` the
    ``e_flags`` the host's dynamic loader accepts (its psABI); ``ret`` one return
    instruction, the whole body of the hook function GDB sets its breakpoint on.
    """

    machine: int
    ret: bytes
    flags: int = 0


@dataclass(frozen=True)
class ArchSpec:
    """The frozen description of one architecture (see the module docstring)."""

    name: str
    aliases: tuple[str, ...]
    #: Repeating pattern that fills every byte of executable memory not holding live code.
    trap_fill: bytes
    #: Every instruction starts at a multiple of this.
    insn_align: int
    max_insn_size: int
    pointer_size: int
    engines: EngineModes
    #: Publishing into memory that is already mapped executable (the common case).
    publish: Recipe
    #: Publishing into fresh memory whose executable view is installed by the recipe's
    #: ``map`` step (no CPU can hold instructions from an address that was not mapped).
    publish_fresh: Recipe
    #: Live patching of published code (``JitText.update``).
    patch: Recipe
    patch_rule: PatchRule
    #: Events that are context-synchronizing (discard in-flight instructions).
    cse_events: tuple[str, ...]
    #: TLB maintenance styles the machine model offers, the first is the default.
    tlb_styles: tuple[str, ...]
    #: Cache-type features (CTR_EL0) that remove recipe steps, if any.
    cache_features: tuple[str, ...] = ()
    #: Freed addresses are handed out again only after an epoch (every CPU has taken a
    #: context-synchronization event since the free): instructions fetched before the
    #: free survive TLB and cache maintenance until then (seeds/000).  False only in
    #: the verification catalog's ``no-quarantine`` mutations.
    quarantine: bool = True
    #: Default (D-line, I-line) sizes when the host cannot tell.
    cache_lines: tuple[int, int] = (64, 64)
    #: The largest distance in bytes a direct call reaches both ways, from any byte of
    #: the instruction to its target (``near=`` placement keeps a text and the address
    #: within it; 0: no direct call reaches anywhere, ``near=`` is refused).
    branch_reach: int = 0
    #: Tiny routines the native backend runs on this architecture when it is the host,
    #: as ``(name, source)``: Keystone assembly, or only ``.word`` directives where
    #: Keystone has no assembler.  Names: ``store1/2/4/8`` (``(address, value)``: one
    #: single-copy-atomic store), ``local_cse``, ``barrier``, ``clean_dcache`` /
    #: ``invalidate_icache`` (``(start, end, line)``), ``read_cache_type``; optional
    #: ``serialize`` and ``has_serialize`` (a cheaper ``local_cse`` and the test for it)
    #: and ``probe_membarrier`` (fork a child that tries membarrier; pid or -errno).
    host_routines: tuple[tuple[str, str], ...] = ()
    #: The call gate of ``function()`` callables (``execmem._gates``), one per process:
    #: entered from a stub holding the GIL, with the caller's arguments and the
    #: address of a *record* in a scratch register (its 8-byte fields: slot, target,
    #: stack bytes, save, restore, raise, exception, message).  It atomically
    #: increments the counter at slot, issues a full barrier and reads the flag at
    #: slot+8; if set, decrements and returns raise(exception, message); else
    #: state = save(), calls target with the arguments and the caller's first "stack
    #: bytes" of stack arguments, decrements, restore(state), returns the result.
    #: Empty: calls are counted in Python instead.
    call_gate: str = ""
    #: A callable's stub, at most 32 bytes: ``{RECORD}`` into the gate's record
    #: register, then a jump to ``{GATE}`` (both 8-byte values in the code).
    gate_stub: str = ""
    #: ``retire(slot) -> calls in flight``: store 1 at slot+8, full barrier, load slot.
    gate_retire: str = ""
    #: How Keystone assembles for this architecture (``None``: no Keystone assembler).
    asm: AsmDialect | None = None
    #: Direct branches ``JitText.retarget`` can rewrite in place, keeping their length.
    direct_branches: tuple[DirectBranch, ...] = ()
    #: One line per row for the README's synchronization table.
    summary: str = ""
    #: How ELF files describe code of this architecture (``None``: no ELF support).
    elf: ElfIdentity | None = None
    #: Extra per-architecture hooks used by the modeled machine (decoders etc.).
    extras: dict[str, object] = field(default_factory=dict, compare=False, hash=False)

    @property
    def default_tlb(self) -> str:
        return self.tlb_styles[0]

    def recipe(self, name: str) -> Recipe:
        recipes = {"publish": self.publish, "publish_fresh": self.publish_fresh, "patch": self.patch}
        try:
            return recipes[name]
        except KeyError:
            raise UnsupportedError(f"{self.name} has no recipe {name!r}") from None

    def with_recipes(self, **recipes: Recipe) -> ArchSpec:
        """A copy with some recipes replaced: the verification mutations, handed to a
        backend (``Machine(spec.with_recipes(publish=...))``) whose allocator runs them."""
        unknown = set(recipes) - {"publish", "publish_fresh", "patch"}
        if unknown or not all(isinstance(r, Recipe) for r in recipes.values()):
            raise ValueError(f"with_recipes takes publish, publish_fresh and patch Recipes, not {sorted(recipes)}")
        return replace(self, **recipes)  # type: ignore[arg-type]

    def without_quarantine(self) -> ArchSpec:
        """A copy whose freed addresses are reused at once (a verification mutation)."""
        return replace(self, quarantine=False)

    def trap_bytes(self, size: int) -> bytes:
        """``size`` bytes of trap filler, aligned to the start of the pattern."""
        reps = -(-size // len(self.trap_fill))
        return (self.trap_fill * reps)[:size]


_MODULES = ("x86_64", "arm64", "riscv64")
_HOST_NAMES = {
    "x86_64": "x86_64",
    "amd64": "x86_64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "riscv64": "riscv64",
}


def names() -> tuple[str, ...]:
    """Canonical names of every supported architecture."""
    return _MODULES


def get(name: str | None = None) -> ArchSpec:
    """The spec for ``name`` (canonical or alias), or for the host when ``None``.

    Raises ``UnsupportedError`` for an unknown name, ``TypeError`` for a non-string.
    """
    if name is None:
        return host()
    if not isinstance(name, str):  # a wrong type is a TypeError, as in asm(arch=...)
        raise TypeError(f"architecture name must be str or None, not {type(name).__name__}")
    key = name.strip().lower().replace("-", "_")
    for module_name in _MODULES:
        spec = _load(module_name)
        if key == spec.name or key in spec.aliases:
            return spec
    raise UnsupportedError(
        f"unknown architecture {name!r}; known: {', '.join(_MODULES)}"
    )


def host() -> ArchSpec:
    """The spec of the machine this process runs on."""
    machine = platform.machine().lower()
    try:
        return _load(_HOST_NAMES[machine])
    except KeyError:
        raise UnsupportedError(f"execmem does not support host architecture {machine!r}") from None


_cache: dict[str, ArchSpec] = {}


def _load(module_name: str) -> ArchSpec:
    spec = _cache.get(module_name)
    if spec is None:
        module = importlib.import_module(f"{__name__}.{module_name}")
        spec = module.SPEC
        if not isinstance(spec, ArchSpec):
            raise TypeError(f"{module_name}.SPEC is not an ArchSpec")
        _validate(spec)
        _cache[module_name] = spec
    return spec


def _validate(spec: ArchSpec) -> None:
    """The core relies on these properties; check them once at load time."""
    problems: list[str] = []
    if not spec.trap_fill or (spec.insn_align % len(spec.trap_fill) and len(spec.trap_fill) % spec.insn_align):
        problems.append("trap_fill length must divide or be divided by insn_align")
    if spec.insn_align & (spec.insn_align - 1):
        problems.append("insn_align must be a power of two")
    for recipe in (spec.publish, spec.publish_fresh):
        if "write" not in recipe.names:
            problems.append(f"recipe {recipe.name} never writes the code")
    if "map" not in spec.publish_fresh.names:
        problems.append("publish_fresh must contain a map step")
    if spec.branch_reach < 0:
        problems.append("branch_reach must not be negative")
    if spec.patch_rule.word & (spec.patch_rule.word - 1):
        problems.append("patch word must be a power of two")
    for branch in spec.direct_branches:
        if branch.size > spec.patch_rule.max_size or branch.match & ~branch.mask:
            problems.append(f"direct branch {branch.name} cannot be patched atomically or never matches")
    if spec.asm is not None:
        names = {b.name for b in spec.direct_branches}
        if not spec.asm.syntaxes or any(name not in names for _, name in spec.asm.long_branches):
            problems.append("asm dialect needs a syntax, and long branches must be direct branches")
    if problems:
        raise ValueError(f"invalid ArchSpec {spec.name}: " + "; ".join(problems))


def isa(spec: ArchSpec) -> ModuleType:
    """The instruction-semantics module the modeled machine uses for ``spec``.

    ``execmem.arch.<name>_isa`` exports the register file, a decoder that says which
    registers an instruction reads and writes and which instructions the model must
    perform itself, and the memory-model rule table (see ``arm64_isa``).
    """
    try:
        return importlib.import_module(f"{__name__}.{spec.name}_isa")
    except ModuleNotFoundError:
        raise UnsupportedError(f"the modeled machine does not support {spec.name} yet") from None


__all__ = [
    "STEP_DOCS",
    "ArchSpec",
    "AsmDialect",
    "AsmSyntax",
    "DirectBranch",
    "ElfIdentity",
    "EngineModes",
    "PatchRule",
    "Recipe",
    "RecipeStep",
    "get",
    "host",
    "isa",
    "names",
]
