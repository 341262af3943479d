"""JIT scenarios (allocator flows on the modeled machine)."""
