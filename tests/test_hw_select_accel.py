# amaranth: UnusedElaboratable=no
"""SELECT on the whole accelerator (Verilator model of the tiny preset) against the golden model.

A DHSA query-block step: LOAD the chunk starts (index memory) and the per-token scores, SELECT
with the chunk count in a host register, gather the selected key rows and token scores with
SPANS-mode LOADs counted by SELECT's register, a causal SOFTMAX over the gathered scores with
the key positions from SELECT's span list, STORE everything. The final DRAM, status and
counters must equal golden's (``run_and_compare`` of tests/test_hw_accel.py); the random
differential programs of that file draw SELECT too.
"""

import numpy as np
from test_hw_accel import run_and_compare, sim  # noqa: F401  (sim is the shared fixture)

from vitamin import get_config
from vitamin.asm import Assembler
from vitamin.golden import units
from vitamin.isa import DmaMode, DType, ErrorCode, Mem, Opcode, SmMode

TINY = get_config("tiny")
D = 4       # key row width


def _dhsa_program(seed, *, bad_starts=False):
    rng = np.random.default_rng(seed)
    seq = int(rng.integers(60, 200))
    limit = int(rng.integers(seq // 2, seq + 1))
    cnt = int(rng.integers(1, 20))
    starts = np.sort(rng.choice(np.arange(1, seq), size=cnt - 1, replace=False))
    starts = np.concatenate([[0], starts])
    if bad_starts:
        starts[-1] = starts[-2]
    sink, recent = int(rng.integers(0, 9)), int(rng.integers(0, 17))
    forced = len(set(range(min(sink, limit))) | set(range(max(0, limit - recent), limit)))
    budget = int(rng.integers(max(forced, 1), limit + 1))
    scores = rng.integers(-2000, 2000, size=seq)
    keys = rng.integers(-30000, 30000, size=(seq, D))

    a = Assembler(TINY)
    t_st = a.tensor("starts", "input", (cnt, 2), "i32")
    t_sc = a.tensor("scores", "input", (seq,), "i16")
    t_k = a.tensor("keys", "input", (seq, D), "i16")
    o_k = a.tensor("gathered", "output", (budget, D), "i16")
    o_p = a.tensor("probs", "output", (budget,), "i16")
    o_sp = a.tensor("spans", "output", (cnt + 2, 2), "i32")
    a.load(dram_addr=t_st, spad_addr=0, run=cnt, dtype=DType.I32, mem=Mem.IDX)
    a.load(dram_addr=t_sc, spad_addr=100, run=seq, dtype=DType.I16, push_next=1)
    a.emit(Opcode.SELECT, pop_prev=1, push_prev=1, n_chunks=0, count_reg=1, chunk_addr=0,
           seq=seq, limit=limit, in_addr=100, sink=sink, recent=recent, budget=budget,
           out_addr=200, dst_reg=2, rows_reg=3)
    a.load(dram_addr=t_k, spad_addr=1000, run=D, mode=DmaMode.SPANS, idx_addr=200,
           count_reg=2, ds0=2 * D, ss0=D, dtype=DType.I16, pop_next=1)
    a.load(dram_addr=t_sc, spad_addr=3000, run=1, mode=DmaMode.SPANS, idx_addr=200,
           count_reg=2, ds0=2, ss0=1, dtype=DType.I16, push_next=1)
    a.softmax(mode=SmMode.FULL, causal=1, kpos_spans=1, count_reg=2, idx_addr=200, m=1,
              n=budget, in_addr=3000, in_stride=budget, out_addr=4000, out_stride=budget,
              mult=3000, shift=6, q_pos=limit - 1 - int(rng.integers(0, 4)), pop_prev=1,
              push_next=1)
    a.store(dram_addr=o_p, spad_addr=4000, run=budget, dtype=DType.I16, pop_prev=1)
    a.store(dram_addr=o_k, spad_addr=1000, run=budget * D, dtype=DType.I16)
    a.store(dram_addr=o_sp, spad_addr=200, run=cnt + 2, dtype=DType.I32, mem=Mem.IDX)
    a.end()
    prog = a.link()
    ins = {"starts": np.stack([starts, rng.integers(-5, 5, size=cnt)], axis=1),
           "scores": scores, "keys": keys}
    sel = units.select(starts, seq, limit, scores[:limit], sink, recent, budget, TINY)
    return prog, ins, {1: cnt}, sel


def test_dhsa_step_matches_golden(sim):  # noqa: F811
    cases, sels = [], []
    for seed in range(4):
        prog, ins, regs, sel = _dhsa_program(seed)
        cases.append((prog, ins, regs, {"throttle": seed % 2}))
        sels.append((prog, sel))
    prog, ins, regs, _ = _dhsa_program(7, bad_starts=True)
    cases.append((prog, ins, regs, {"sequential": True}))
    res = run_and_compare(sim, cases)
    for (g, r), (prog, sel) in zip(res, sels, strict=False):
        assert g.ok
        # the selection is the one the golden function gives, and fills the budget
        got = prog.read_tensor(g.dram, "spans")[:len(sel)]
        np.testing.assert_array_equal(got, sel)
        assert sum(n for _, n in sel) == prog.symbol("probs").shape[0]
    g, r = res[-1]
    assert g.status == ErrorCode.BAD_FIELD and g.error_pc == 2
