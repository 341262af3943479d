"""The modeled multi-CPU machine (one Unicorn instance per CPU).

``Machine`` builds and runs a machine; ``execmem.Allocator(backend=Machine(...))``
runs the allocator core on it.  The model: ``_semantics`` (transition rules),
``_timeline`` (the view-based memory they act on), ``_kernel`` (translation, TLBs,
interrupts, host actions), ``_explore`` (exhaustive and random exploration, replay).
"""

from execmem.emu._explore import Exploration, Witness
from execmem.emu._machine import HostProgram, Machine, Program, assemble
from execmem.emu._state import MachineState, Step

__all__ = ["Exploration", "HostProgram", "Machine", "MachineState", "Program", "Step", "Witness", "assemble"]
