"""Real JIT clients of execmem's public API.

``calc`` (arithmetic expressions, x86-64 natively and arm64 on the modeled
machine), ``bf`` (a Brainfuck JIT with I/O callbacks), ``hotswap`` (replacing a
function under concurrent callers), ``bpf`` (a classic BPF packet-filter JIT).
Each runs with ``python -m jit_examples.NAME`` or ``execmem example NAME``.
"""

EXAMPLES = ("calc", "bf", "hotswap", "bpf")
