"""The modeled multi-CPU machine (one Unicorn instance per CPU).

``Machine`` builds and runs a machine; ``execmem.Allocator(backend=Machine(...))``
runs the allocator core on it.  The model: ``_semantics`` (transition rules),
``_execute`` (loads, stores, atomics), ``_translate`` (page-table walks, TLBs,
faults), ``_maintenance`` (DC, IC, TLBI on the timeline), ``_timeline`` (the
view-based memory they act on), ``_kernel`` (entries, host actions), ``_host`` (host
steps, interrupts), ``_explore`` (exhaustive and random exploration, replay),
``_layout`` (the address space).
"""

from execmem.emu._explore import Exploration, Witness
from execmem.emu._kernel import HostProgram
from execmem.emu._machine import Machine, Program, assemble
from execmem.emu._state import MachineState, Step

__all__ = ["Exploration", "HostProgram", "Machine", "MachineState", "Program", "Step", "Witness", "assemble"]
