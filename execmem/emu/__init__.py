"""The modeled multi-CPU machine (one Unicorn instance per CPU).

See ``execmem.emu._semantics`` for the transition rules and ``_timeline`` for the
view-based memory they act on.
"""
