"""herd7 litmus tests: a strict parser of the AArch64 format, its data model, a printer,
and the translation of herd's instruction spellings for Keystone.

>>> from execmem.litmus import parse_file
>>> t = parse_file("MP+rel+blr.litmus")                           # doctest: +SKIP
>>> t.condition.quantifier, t.condition.registers()               # doctest: +SKIP
('exists', (Reg(proc=1, name='X2'), Reg(proc=1, name='X6')))

See :mod:`execmem.litmus._ast` for the model; every error is :class:`execmem.LitmusError`
with ``"<file>:<line>: <what>"``.
"""

from __future__ import annotations

from execmem.litmus._ast import (
    FALSE,
    TRUE,
    And,
    Array,
    Atom,
    CodeLabel,
    CodeLine,
    Condition,
    FaultAtom,
    FrozenMap,
    Implies,
    Init,
    Instr,
    Int,
    LitmusTest,
    Loc,
    Location,
    LocAtom,
    Mem,
    Not,
    Or,
    Prop,
    Pte,
    Reg,
    Thread,
    Value,
    ValueAtom,
    atoms,
    evaluate_prop,
)
from execmem.litmus._condition import canonical_register, parse_condition
from execmem.litmus._herdasm import (
    assemble_line,
    assemble_thread,
    encode_instruction_value,
    process_labels,
    rewrite_labels,
    to_keystone,
)
from execmem.litmus._parse import format_test, parse_file, parse_litmus

__all__ = [
    "FALSE",
    "TRUE",
    "And",
    "Array",
    "Atom",
    "CodeLabel",
    "CodeLine",
    "Condition",
    "FaultAtom",
    "FrozenMap",
    "Implies",
    "Init",
    "Instr",
    "Int",
    "LitmusTest",
    "Loc",
    "LocAtom",
    "Location",
    "Mem",
    "Not",
    "Or",
    "Prop",
    "Pte",
    "Reg",
    "Thread",
    "Value",
    "ValueAtom",
    "assemble_line",
    "assemble_thread",
    "atoms",
    "canonical_register",
    "encode_instruction_value",
    "evaluate_prop",
    "format_test",
    "parse_condition",
    "parse_file",
    "parse_litmus",
    "process_labels",
    "rewrite_labels",
    "to_keystone",
]
