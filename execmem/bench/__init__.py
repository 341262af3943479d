"""Benchmarks: execmem versus the usual way, and the modeled machine versus raw Unicorn."""
