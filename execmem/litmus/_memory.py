"""Where a litmus test's locations live on the modeled machine, in either dialect.

* **Plain** (herd's default and ifetch models): every location is 8 bytes in its own
  slot of statically mapped memory, so a name is one address.
* **VMSA** (``-variant vmsa``): every location ``x`` is a virtual page translated by a
  page-table entry ``PTE(x)`` (also written ``pte_x``) that maps a physical frame
  ``PA(x)`` (``phy_x``).  Guest code reaches ``x`` through the TLB and ``PTE(x)``
  directly (page tables are not translated, as in herd); the final value of ``x``
  is its frame's, as herd reports it.  Entries start as herd's default descriptor
  (valid, access flag and dirty state set, executable, EL0-accessible) mapping the
  location's own frame; a ``pte_x=(...)`` initial value overrides that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from execmem._errors import ExecmemError
from execmem.arch._model import Descriptor
from execmem.emu import Machine
from execmem.emu._layout import PAGE
from execmem.litmus._ast import Pte

_PTE = re.compile(r"PTE\(([A-Za-z_.$][\w.$]*)\)|pte_([A-Za-z_.$][\w.$]*)")
_PA = re.compile(r"PA\(([A-Za-z_.$][\w.$]*)\)|phy_([A-Za-z_.$][\w.$]*)")
#: herd's descriptor fields, in the order it prints them after ``oa``.
FIELDS = ("af", "db", "dbm", "valid", "el0", "x")
_DEFAULT = Descriptor(0)


class Unsupported(ExecmemError):
    """What the front end does not model: reported as ``unsupported`` with the reason."""


def split(name: str) -> tuple[str, str]:
    """``("pte", "x")`` for ``PTE(x)``/``pte_x``, ``("pa", "x")`` for ``PA(x)``/``phy_x``,
    ``("va", "x")`` for ``x``."""
    m = _PTE.fullmatch(name)
    if m:
        return "pte", m.group(1) or m.group(2)
    m = _PA.fullmatch(name)
    if m:
        return "pa", m.group(1) or m.group(2)
    return "va", name


@dataclass
class Memory:
    """The addresses of a test's locations (``vmsa``: pages, frames, entries)."""

    machine: Machine
    vmsa: bool
    va: dict[str, int] = field(default_factory=dict)
    entry: dict[str, int] = field(default_factory=dict)
    frame: dict[str, int] = field(default_factory=dict)

    @classmethod
    def lay_out(cls, machine: Machine, names: list[str], *, vmsa: bool, sizes: dict[str, int] | None = None) -> Memory:
        """Place every location (``sizes``: bytes of those bigger than 8, arrays)."""
        mem = cls(machine, vmsa)
        if not vmsa:
            for name in names:
                mem.va[name] = machine.alloc(max(8, (sizes or {}).get(name, 8)), value=0)
            return mem
        form = machine.isa.MODEL.descriptor
        for name in names:
            base = split(name)[1]
            if base in mem.va:
                continue
            mem.va[base], mem.entry[base] = machine.map_pages(PAGE)
            mem.frame[base] = machine.frames(PAGE)
            default = form.encode(Descriptor(mem.frame[base]))
            machine.poke(mem.entry[base], default.to_bytes(8, "little"))
        return mem

    def address(self, name: str) -> int:
        """The value of ``name`` used as an address (``x``, ``&x``, ``PTE(x)``, ``PA(x)``)."""
        kind, base = split(name) if self.vmsa else ("va", name)
        table = {"va": self.va, "pte": self.entry, "pa": self.frame}[kind]
        try:
            return table[base]
        except KeyError:
            raise Unsupported(f"location {name} is not laid out") from None

    def cell(self, name: str) -> int:
        """Where the value of memory location ``name`` is read (VA == PA there)."""
        if not self.vmsa:
            return self.address(name)
        kind, base = split(name)
        return self.entry[base] if kind == "pte" else self.frame[base]

    def descriptor(self, pte: Pte, owner: str | None = None) -> int:
        """The encoding of a descriptor value; ``oa`` defaults to ``owner``'s frame."""
        if not self.vmsa:
            raise Unsupported("page-table entry values need the VMSA dialect (--variant vmsa)")
        if pte.attrs:
            raise Unsupported(f"memory attributes ({', '.join(pte.attrs)}) are not modelled")
        if pte.oa is None and owner is None:
            raise Unsupported(f"descriptor {pte} has no output address")
        oa = pte.oa if pte.oa is not None else f"PA({owner})"
        kind, base = split(oa)
        if kind == "pte":
            raise Unsupported(f"an entry mapping a page table ({oa}) is not modelled")
        if base not in self.frame:
            raise Unsupported(f"output address {oa} names no location")
        values = {}
        for key, text in pte.fields:
            if key not in FIELDS or text not in ("0", "1"):
                raise Unsupported(f"descriptor field {key}:{text} is not modelled")
            values[key] = text == "1"
        d = Descriptor(self.frame[base], **values)
        return self.machine.isa.MODEL.descriptor.encode(d)  # type: ignore[no-any-return]

    def describe(self, value: int) -> str:
        """herd's spelling of a descriptor value: ``(oa:PA(x), af:0)`` (fields that
        differ from the default only)."""
        d = self.machine.isa.MODEL.descriptor.decode(value)
        names = {frame: base for base, frame in self.frame.items()}
        oa = f"PA({names[d.oa]})" if d.oa in names else f"{d.oa:#x}"
        parts = [f"oa:{oa}"] + [f"{key}:{int(getattr(d, key))}" for key in FIELDS if getattr(d, key) != getattr(_DEFAULT, key)]
        return "(" + ", ".join(parts) + ")"

    def name_of(self, address: int) -> str | None:
        """The location whose address (page) ``address`` is, if any."""
        for base, va in self.va.items():
            if va <= address < va + (PAGE if self.vmsa else 8):
                return base
        return None
