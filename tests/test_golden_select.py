"""SELECT (DHSA budgeted key selection) in the golden model: ``units.select`` and
``Machine.op_select`` (docs/ISA.md, SELECT).

Hand-computed cases use chunk lengths 1, 4 and 16, whose 1/sqrt is exact in the table
(``rsqrt_norm`` gives r = 2^15, k = 0, 1, 2), so a chunk's score is its sum, rnd(sum, 1) or
rnd(sum, 2). Random cases compare with a token-level re-implementation written here.
"""

import math

import numpy as np
import pytest

from vitamin import get_config, isa
from vitamin.asm import Assembler
from vitamin.golden import units
from vitamin.golden.isasim import Fault, Machine, simulate
from vitamin.golden.numerics import rshift_round
from vitamin.isa import DmaMode, DType, ErrorCode, Mem, Opcode

TINY = get_config("tiny")


def _scores(chunks, limit=None):
    """Token scores with the given per-chunk sums: ``chunks`` = [(length, sum)], each sum put
    on the chunk's first token."""
    s = []
    for n, total in chunks:
        s += [total] + [0] * (n - 1)
    return np.array(s[:limit] if limit is not None else s, dtype=np.int64)


def _sel(starts, seq, limit, s, sink=0, recent=0, budget=1 << 20):
    return units.select(starts, seq, limit, s, sink, recent, budget, TINY)


# -- hand-computed ---------------------------------------------------------------------------------

def test_exact_chunk_scores():
    # lengths 1, 4, 16, 4: scores = sum, rnd(sum, 1), rnd(sum, 2), rnd(sum, 1)
    s = _scores([(1, 7), (4, 41), (16, -9), (4, -3)])
    got = units.select_scores([0, 1, 5, 21], 25, 25, s, TINY)
    assert got == [(7, 0, 1), (21, 1, 5), (-2, 5, 21), (-1, 21, 25)]


def test_budget_cut_inside_a_chunk():
    # chunk scores 2, 20, 10, -4: chunk 1 whole, then 2 tokens of chunk 2
    s = _scores([(4, 4), (4, 40), (4, 20), (4, -8)])
    assert _sel([0, 4, 8, 12], 16, 16, s, budget=6) == [[4, 6]]
    assert _sel([0, 4, 8, 12], 16, 16, s, budget=9) == [[0, 1], [4, 8]]
    assert _sel([0, 4, 8, 12], 16, 16, s, budget=4) == [[4, 4]]
    assert _sel([0, 4, 8, 12], 16, 16, s, budget=1) == [[4, 1]]


def test_ties_go_to_the_lower_chunk():
    s = _scores([(4, 0), (4, 8), (4, 8)])           # scores 0, 4, 4
    assert _sel([0, 4, 8], 12, 12, s, budget=5) == [[4, 5]]
    s = _scores([(4, 8), (4, 0), (4, 8)])           # scores 4, 0, 4
    assert _sel([0, 4, 8], 12, 12, s, budget=6) == [[0, 4], [8, 2]]
    # equal scores from different lengths: 16 tokens summing to 8 and 4 tokens summing to 4
    s = _scores([(4, 4), (16, 8)])                  # scores 2, 2
    assert _sel([0, 4], 20, 20, s, budget=3) == [[0, 3]]


def test_sink_and_recent():
    s = _scores([(4, 0), (4, 40), (4, 20), (4, 4)])  # scores 0, 20, 10, 2
    # sink 2, recent 3: F = [0,2) U [13,16), 5 tokens; budget 8 leaves 3 for chunk 1
    assert _sel([0, 4, 8, 12], 16, 16, s, sink=2, recent=3, budget=8) == \
        [[0, 2], [4, 3], [13, 3]]
    # sink reaches into chunk 1: its tokens outside F start at 5
    assert _sel([0, 4, 8, 12], 16, 16, s, sink=5, recent=0, budget=7) == [[0, 7]]
    # recent covers chunk 3 partly: chunk 3 (score 2) only has [12, 13) outside F
    assert _sel([0, 4, 8, 12], 16, 16, s, sink=0, recent=3, budget=12) == [[4, 12]]
    assert _sel([0, 4, 8, 12], 16, 16, s, sink=0, recent=3, budget=11) == [[4, 8], [13, 3]]


def test_sink_and_recent_overlap():
    s = _scores([(4, 4), (4, 40), (4, 20)])
    # sink 6 and recent 6 of limit 10 cover everything: F alone, beyond the budget
    assert _sel([0, 4, 8], 12, 10, s[:10], sink=6, recent=6, budget=3) == [[0, 10]]
    # F larger than the budget: F alone, no chunk
    assert _sel([0, 4, 8], 12, 12, s, sink=3, recent=2, budget=4) == [[0, 3], [10, 2]]
    # sink and recent beyond limit
    assert _sel([0, 4, 8], 12, 5, s[:5], sink=100, recent=100, budget=1) == [[0, 5]]


def test_limit_clips_and_drops_chunks():
    s = _scores([(4, 4), (4, 40), (4, 20), (4, 400)])
    # limit 9: chunk 2 is [8, 9) (score s_8 = 20), chunk 3 (start 12) is not a candidate
    ch = units.select_scores([0, 4, 8, 12], 16, 9, s, TINY)
    assert ch == [(2, 0, 4), (20, 4, 8), (20, 8, 9)]
    assert _sel([0, 4, 8, 12], 16, 9, s[:9], budget=5) == [[4, 5]]
    assert _sel([0, 4, 8, 12], 16, 9, s[:9], budget=2) == [[4, 2]]
    # limit exactly at a chunk start: that chunk is not a candidate
    assert units.select_scores([0, 4, 8, 12], 16, 8, s, TINY) == [(2, 0, 4), (20, 4, 8)]
    assert _sel([0, 4, 8, 12], 16, 0, s[:0], sink=3, recent=3, budget=5) == []


def test_budget_larger_than_available():
    s = _scores([(4, 4), (4, -40), (4, 20)])
    assert _sel([0, 4, 8], 12, 12, s, budget=1000) == [[0, 12]]
    # tokens before the first chunk are only selected through F
    assert _sel([2, 6], 12, 10, s[:10], budget=1000) == [[2, 8]]
    assert _sel([2, 6], 12, 10, s[:10], sink=1, budget=1000) == [[0, 1], [2, 8]]
    assert _sel([], 12, 10, s[:10], sink=1, recent=2, budget=1000) == [[0, 1], [8, 2]]


def test_chunk_scores_follow_length_normalised_sums():
    rng = np.random.default_rng(5)
    for _ in range(200):
        n = int(rng.integers(1, 3000))
        s = rng.integers(-32768, 32768, size=n)
        [(score, _, _)] = units.select_scores([0], n, n, s, TINY)
        ref = s.sum() / math.sqrt(n)
        assert abs(score - ref) <= 1e-4 * abs(ref) + 1, (n, score, ref)


# -- random, against a token-level re-implementation ---------------------------------------------

def _reference(starts, seq, limit, s, sink, recent, budget):
    """Token by token: every token of a candidate chunk carries its chunk's score and index."""
    prefix = np.concatenate([[0], np.cumsum(np.asarray(s, dtype=np.int64))])
    score = np.zeros(limit, dtype=np.int64)
    chunk = np.full(limit, -1)
    bounds = list(starts) + [seq]
    for c in range(len(starts)):
        a, e = bounds[c], min(bounds[c + 1], limit)
        if a >= limit:
            break
        r, k = units.rsqrt_norm(e - a, TINY)
        score[a:e] = rshift_round((prefix[e] - prefix[a]) * int(r), 15 + int(k))
        chunk[a:e] = c
    pos = np.arange(limit)
    forced = (pos < sink) | (pos >= limit - recent)
    keep = forced.copy()
    left = budget - int(forced.sum())
    cand = [j for j in range(limit) if chunk[j] >= 0 and not forced[j]]
    cand.sort(key=lambda j: (-score[j], chunk[j], j))
    for j in cand[:max(left, 0)]:
        keep[j] = True
    out = []
    for j in np.flatnonzero(keep):
        if out and out[-1][0] + out[-1][1] == j:
            out[-1][1] += 1
        else:
            out.append([int(j), 1])
    return out


def _random_case(rng):
    seq = int(rng.integers(1, 120))
    limit = int(rng.integers(0, seq + 1)) if rng.random() < 0.7 else seq
    n = int(rng.integers(0, min(seq, 20) + 1))
    starts = sorted(rng.choice(seq + int(rng.integers(0, 3)), size=n, replace=False).tolist())
    if n and rng.random() < 0.5:
        starts[0] = 0
    kind = rng.choice(["small", "wide", "ties"])
    if kind == "ties":
        s = rng.choice([-2, 0, 2], size=limit)
    else:
        hi = 32768 if kind == "wide" else 20
        s = rng.integers(-hi, hi, size=limit)
    sink = int(rng.choice([0, 0, 1, 3, rng.integers(0, seq + 2)]))
    recent = int(rng.choice([0, 0, 2, 5, rng.integers(0, seq + 2)]))
    budget = int(rng.choice([1, 4, 16, rng.integers(1, seq + 10), 1 << 31]))
    return starts, seq, limit, s, sink, recent, budget


def test_random_against_token_level_reference():
    rng = np.random.default_rng(17)
    for _ in range(600):
        case = _random_case(rng)
        got = units.select(*case[:4], *case[4:], TINY)
        assert got == _reference(*case), case
        rows = sum(n for _, n in got)
        starts, seq, limit, s, sink, recent, budget = case
        forced = len(set(range(min(sink, limit))) | set(range(max(0, limit - recent), limit)))
        chunked = set(range(starts[0], limit)) if starts else set()
        covered = len(chunked | set(range(min(sink, limit)))
                      | set(range(max(0, limit - recent), limit)))
        assert rows == (forced if forced >= budget else min(budget, covered)), case
        for (a, n), (b, _) in zip(got, got[1:]):
            assert n >= 1 and a + n < b           # ascending, merged, non-empty


# -- Machine.op_select: registers, index memory, faults --------------------------------------------

def _machine(starts=(), spad=(), regs=None):
    mach = Machine(TINY, np.zeros(4096, np.uint8), regs)
    mach.idx[:, :] = -77
    mach.idx[10:10 + len(starts), 0] = starts
    mach.spad[100:100 + len(spad)] = spad
    return mach


def _fields(**kw):
    f = dict(n_chunks=0, count_reg=0, chunk_addr=10, seq=16, limit=16, in_addr=100, sink=0,
             recent=0, budget=6, out_addr=200, dst_reg=5, rows_reg=6)
    f.update(kw)
    _, dec = isa.decode(isa.encode(Opcode.SELECT, **f))
    return dec


def test_op_select_writes_spans_and_registers():
    s = _scores([(4, 4), (4, 40), (4, 20), (4, -8)])
    mach = _machine([0, 4, 8, 12], s)
    mach.op_select(_fields(n_chunks=4, budget=9, sink=0))
    np.testing.assert_array_equal(mach.idx[200:203], [[0, 1], [4, 8], [-77, -77]])
    assert mach.regs[5] == 2 and mach.regs[6] == 9
    # count from a register; same register for both: rows win
    mach = _machine([0, 4, 8, 12], s, regs={3: 2})
    mach.op_select(_fields(n_chunks=4, count_reg=3, budget=9, dst_reg=7, rows_reg=7))
    # chunks 0 and 1 only: chunk 1 = [4, 16) sums 52 over 12 tokens (score 15 > 2)
    assert mach.regs[7] == 9
    np.testing.assert_array_equal(mach.idx[200:202], [[4, 9], [-77, -77]])
    # output over the chunk list itself
    mach = _machine([0, 4, 8, 12], s)
    mach.op_select(_fields(n_chunks=4, budget=9, out_addr=10, dst_reg=0, rows_reg=0))
    np.testing.assert_array_equal(mach.idx[10:12], [[0, 1], [4, 8]])
    assert mach.idx[12, 0] == 8 and (mach.regs == 0).all()


@pytest.mark.parametrize("over,regs,starts,code", [
    (dict(budget=0), None, [0, 4], ErrorCode.BAD_FIELD),
    (dict(limit=17), None, [0, 4], ErrorCode.BAD_FIELD),
    (dict(limit=1 << 31, seq=(1 << 32) - 1), None, [0, 4], ErrorCode.BAD_FIELD),
    (dict(count_reg=2), {2: -1}, [0, 4], ErrorCode.BAD_FIELD),
    (dict(chunk_addr=TINY.idx_entries - 1), None, [0, 4], ErrorCode.IDX_RANGE),
    (dict(count_reg=2), {2: 1 << 30}, [0, 4], ErrorCode.IDX_RANGE),
    (dict(in_addr=TINY.spad_words - 15), None, [0, 4], ErrorCode.SPAD_RANGE),
    (dict(in_addr=TINY.spad_words - 15), None, [4, 4], ErrorCode.SPAD_RANGE),  # before starts
    (dict(), None, [4, 4], ErrorCode.BAD_FIELD),
    (dict(), None, [5, 4], ErrorCode.BAD_FIELD),
    (dict(), None, [-1, 4], ErrorCode.BAD_FIELD),
    (dict(limit=2), None, [0, 4, 30, 20], ErrorCode.BAD_FIELD),     # beyond limit: checked too
    (dict(out_addr=TINY.idx_entries - 1, budget=9), None, [0, 4, 8, 12], ErrorCode.IDX_RANGE),
])
def test_op_select_faults_change_nothing(over, regs, starts, code):
    s = _scores([(4, 4), (4, 40), (4, 20), (4, -8)])
    mach = _machine(starts, s, regs)
    before = (mach.idx.copy(), mach.regs.copy())
    f = _fields(n_chunks=len(starts), **over)
    with pytest.raises(Fault) as e:
        mach.op_select(f)
    assert e.value.code == code, e.value
    np.testing.assert_array_equal(mach.idx, before[0])
    np.testing.assert_array_equal(mach.regs, before[1])


def test_op_select_edges_that_do_not_fault():
    mach = _machine([0, 4])
    mach.op_select(_fields(n_chunks=2, limit=0, in_addr=(1 << 22) - 1, out_addr=512))
    assert mach.regs[5] == 0 and mach.regs[6] == 0
    mach = _machine([])
    mach.op_select(_fields(n_chunks=0, chunk_addr=TINY.idx_entries, sink=2, budget=1))
    np.testing.assert_array_equal(mach.idx[200], [0, 2])
    # the output ends exactly at the last entry
    mach = _machine([0, 4, 8, 12], _scores([(4, 4), (4, 40), (4, 20), (4, -8)]))
    mach.op_select(_fields(n_chunks=4, budget=9, out_addr=TINY.idx_entries - 2))
    np.testing.assert_array_equal(mach.idx[-2:], [[0, 1], [4, 8]])


def test_select_in_a_program():
    """LOAD chunk starts and token scores, SELECT with a register count, gather the selected
    rows with a SPANS-mode LOAD counted by SELECT's register, STORE them and the span list."""
    a = Assembler(TINY)
    st = a.tensor("starts", "input", (5, 2), "i32")
    sc = a.tensor("scores", "input", (40,), "i16")
    keys = a.tensor("keys", "input", (40, 3), "i16")
    out = a.tensor("out", "output", (12, 3), "i16")
    osp = a.tensor("spans", "output", (8, 2), "i32")
    starts = np.array([0, 7, 12, 20, 33])
    scores = np.random.default_rng(3).integers(-300, 300, size=40)
    kv = np.arange(120).reshape(40, 3)
    a.load(dram_addr=st, spad_addr=0, run=5, dtype=DType.I32, mem=Mem.IDX)
    a.load(dram_addr=sc, spad_addr=64, run=40, dtype=DType.I16, push_next=1)
    a.emit(Opcode.SELECT, pop_prev=1, push_prev=1, n_chunks=0, count_reg=1, chunk_addr=0,
           seq=40, limit=38, in_addr=64, sink=2, recent=3, budget=12, out_addr=8, dst_reg=2,
           rows_reg=3)
    a.load(dram_addr=keys, spad_addr=1000, run=3, mode=DmaMode.SPANS, idx_addr=8, count_reg=2,
           ds0=6, ss0=3, dtype=DType.I16, pop_next=1, push_next=1)
    a.mark(1, pop_prev=1, push_next=1)
    a.store(dram_addr=out, spad_addr=1000, run=36, dtype=DType.I16, pop_prev=1)
    a.store(dram_addr=osp, spad_addr=8, run=8, dtype=DType.I32, mem=Mem.IDX)
    a.end()
    prog = a.link()
    img = prog.dram_image()
    for name, v in {"starts": np.stack([starts, starts * 0 + 5], axis=1), "scores": scores,
                    "keys": kv}.items():
        prog.write_tensor(img, name, v)
    res = simulate(TINY, img, prog.n_instr, regs={1: 5}).check()
    want = units.select(starts, 40, 38, scores[:38], 2, 3, 12, TINY)
    rows = [r for s0, n in want for r in range(s0, s0 + n)]
    assert len(rows) == 12
    np.testing.assert_array_equal(prog.read_tensor(res.dram, "out"), kv[rows])
    got_spans = prog.read_tensor(res.dram, "spans")[:len(want)]
    np.testing.assert_array_equal(got_spans, want)
