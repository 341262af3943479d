"""Real JIT clients of execmem's public API.

``calc`` (arithmetic expressions, x86-64 natively and arm64 on the modeled
machine), ``bf`` (a Brainfuck JIT with I/O callbacks), ``hotswap`` (replacing a
function under concurrent callers), ``bpf`` (a classic BPF packet-filter JIT),
``libc`` (direct calls into the C library from code placed near it).
Each runs with ``python -m execmem.examples.NAME`` or ``execmem example NAME``.
The folder is ``jit_examples/`` in the source tree and is installed as the
``execmem.examples`` package (as ``arch/`` is ``execmem.arch``): no top-level
package of its own in a user's environment.
"""

EXAMPLES = ("calc", "bf", "hotswap", "bpf", "libc")
