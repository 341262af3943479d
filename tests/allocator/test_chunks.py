"""Chunk bookkeeping (``execmem._chunks``): tables, then hypothesis against a list model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from execmem._chunks import FREE, LIVE, QUARANTINED, ChunkMap, run_starts


@pytest.mark.parametrize(
    ("bits", "length", "expected"),
    [
        (0b1111, 1, 0b1111),
        (0b1111, 2, 0b0111),
        (0b1111, 4, 0b0001),
        (0b1111, 5, 0),
        (0b1101_1110, 3, 0b0000_0110),
        (0b1110_0111, 3, 0b0010_0001),
        ((1 << 100) - 1, 37, (1 << 64) - 1),
    ],
)
def test_run_starts_table(bits: int, length: int, expected: int) -> None:
    assert run_starts(bits, length) & ((1 << 128) - 1) == expected


@given(st.integers(0, (1 << 80) - 1), st.integers(1, 40))
def test_run_starts_matches_naive(bits: int, length: int) -> None:
    naive = 0
    for i in range(80):
        if all(bits >> (i + j) & 1 for j in range(length)):
            naive |= 1 << i
    assert run_starts(bits, length) & ((1 << 80) - 1) == naive


def test_first_fit_honours_step_and_free_space() -> None:
    m = ChunkMap(16)
    m.take(0, 3)
    assert m.find(2) == 3
    assert m.find(2, 4) == 4
    assert m.find(4, 8) == 8
    assert m.find(9, 4) == 4
    assert m.find(9, 8) is None
    assert m.find(13) == 3
    assert m.find(14) is None
    assert m.find(0) is None


def test_take_release_stop_bits_and_merge() -> None:
    m = ChunkMap(8)
    m.take(0, 2)
    m.take(2, 3)
    assert m.span_of(0) == 2 and m.span_of(2) == 3
    with pytest.raises(ValueError):
        m.span_of(1)  # inside an allocation
    with pytest.raises(ValueError):
        m.take(4, 2)  # overlaps
    assert m.release(0) == 2
    assert m.release(2) == 3
    assert m.find(8) == 0  # the two freed spans merged with the tail
    with pytest.raises(ValueError):
        m.release(0)


def test_quarantine_until_epoch() -> None:
    m = ChunkMap(8)
    m.take(0, 8)
    m.release(0)
    m.quarantine(0, 4, stamp=3)
    assert m.find(5) is None
    assert m.find(5, among=m.free | m.quarantined) == 0
    assert m.count(QUARANTINED) == 4 and m.count(FREE) == 4
    assert m.mature(3) == 0  # completed == stamp: the epoch running at the free may predate it
    assert m.mature(4) == 4
    assert m.find(8) == 0
    assert m.quarantine_stamps() == []


def test_states_and_runs() -> None:
    m = ChunkMap(10)
    m.take(1, 2)
    m.take(6, 1)
    m.quarantine(3, 2, stamp=0)
    assert m.states() == ".LLqq.L..."
    assert m.runs() == [(FREE, 1), (LIVE, 2), (QUARANTINED, 2), (FREE, 1), (LIVE, 1), (FREE, 3)]
    assert sum(n for _, n in m.runs()) == 10
    m.reset()
    assert m.states() == "." * 10


@settings(parent=settings.get_profile("execmem"))
@given(
    st.lists(st.tuples(st.sampled_from(["alloc", "free", "mature"]), st.integers(1, 9), st.sampled_from([1, 2, 4])), max_size=60),
    st.sampled_from([1024, 4, 12]),
)
def test_against_a_list_model(ops: list[tuple[str, int, int]], window: int) -> None:
    """First fit, as a list of chunk states says; small windows exercise the search near
    the hint (and falling back from it) on a 40-chunk map."""
    n = 40
    m = ChunkMap(n, window=window)
    model: list[str] = [FREE] * n
    allocs: dict[int, tuple[int, int]] = {}
    stamp = 0
    for op, k, step in ops:
        if op == "alloc":
            want = next(
                (i for i in range(0, n - k + 1, step) if all(model[i + j] == FREE for j in range(k))),
                None,
            )
            got = m.find(k, step)
            assert got == want
            if got is not None:
                m.take(got, k)
                model[got : got + k] = [LIVE] * k
                allocs[got] = (k, stamp)
        elif op == "free" and allocs:
            start = sorted(allocs)[k % len(allocs)]
            count, _ = allocs.pop(start)
            assert m.release(start) == count
            m.quarantine(start, count, stamp)
            model[start : start + count] = [QUARANTINED] * count
        elif op == "mature":
            stamp += 1
            m.mature(stamp)
            model = [FREE if s == QUARANTINED else s for s in model]
        assert [m.state(i) for i in range(n)] == model
        assert m.count(LIVE) + m.count(FREE) + m.count(QUARANTINED) == n
