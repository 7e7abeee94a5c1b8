"""Program-level tests of the ISA simulator.

Programs are assembled with the Assembler and run with run_program(); the expected DRAM contents
are computed here, independently, from the documented semantics (vitamin/isa.py docstrings):
round half up ``(x + 2^(s-1)) >> s``, saturation to the signed (or unsigned) range, exact integer
products. golden.units is not used for expected values.
"""

import zlib

import numpy as np
import pytest

from vitamin import get_config
from vitamin.asm import Assembler
from vitamin.golden.isasim import run_program
from vitamin.isa import AccIn, Act, DmaMode, DType, Mem, OutMode, VecOp

TINY = get_config("tiny")
ECP5 = get_config("ecp5")
ESIZE = {"i8": 1, "u8": 1, "i16": 2, "i32": 8}   # i32: bytes per index-memory entry (a pair)
DT = {"i8": DType.I8, "u8": DType.U8, "i16": DType.I16}


def rnd(x, s):
    """Round half up of x / 2^s (s >= 0), element-wise; exact on int64."""
    x = np.asarray(x, dtype=np.int64)
    s = np.broadcast_to(np.asarray(s, dtype=np.int64), x.shape)
    half = np.where(s > 0, np.int64(1) << np.maximum(s - 1, 0), 0)
    return (x + half) >> s


def sat(x, bits=16):
    return np.clip(np.asarray(x, dtype=np.int64), -(1 << (bits - 1)), (1 << (bits - 1)) - 1)


def n_sat(x, bits=16):
    x = np.asarray(x, dtype=np.int64)
    return int(np.count_nonzero((x < -(1 << (bits - 1))) | (x > (1 << (bits - 1)) - 1)))


def run(a, inputs=None, **kw):
    prog = a.link()
    res, outs = run_program(prog, inputs or {}, **kw)
    assert res.ok, (res.status, res.error_pc, res.message)
    return res, outs, prog


# -- LOAD / STORE --------------------------------------------------------------------------------

@pytest.mark.parametrize("dt", ["i8", "u8", "i16"])
def test_strided_load_store_every_dtype(dt):
    rng = np.random.default_rng(1)
    info = np.iinfo({"i8": np.int8, "u8": np.uint8, "i16": np.int16}[dt])
    X = rng.integers(info.min, int(info.max) + 1, (6, 10))
    X[0, 3], X[1, 3], X[2, 4] = info.min, info.max, info.min   # the extremes inside the block
    es = ESIZE[dt]
    a = Assembler(TINY)
    x = a.tensor("x", "input", (6, 10), dt)
    y16 = a.tensor("y16", "output", (4, 6), "i16")
    yrt = a.tensor("yrt", "output", (4, 6), dt)
    # rows 0..3, columns 3..8 -> scratchpad rows of 8 words (with gaps)
    a.load(dram_addr=x + (0 * 10 + 3) * es, spad_addr=100, run=6, n0=4, ds0=10 * es, ss0=8,
           dtype=DT[dt], push_next=1)
    a.mark(id=1, pop_prev=1, push_next=1)
    a.store(dram_addr=y16, spad_addr=100, run=6, n0=4, ds0=12, ss0=8, dtype=DType.I16,
            pop_prev=1)
    a.store(dram_addr=yrt, spad_addr=100, run=6, n0=4, ds0=6 * es, ss0=8, dtype=DT[dt])
    a.end()
    res, out, _ = run(a, {"x": X})
    block = X[0:4, 3:9]
    assert np.array_equal(out["y16"], block)         # sign- (I8) or zero- (U8) extended
    assert np.array_equal(out["yrt"], block)         # round trip, no saturation
    if dt == "i8":
        assert out["y16"].min() == -128
    if dt == "u8":
        assert out["y16"].max() == 255 and out["y16"].min() >= 0
    assert res.counters["dram_read_bytes"] == 24 * es
    assert res.counters["dram_write_bytes"] == 24 * 2 + 24 * es
    assert res.counters["sat_events"] == 0


def test_i32_index_memory_round_trip_and_reverse():
    E = np.array([[-(1 << 31), (1 << 31) - 1], [-1, 7], [123456789, -987654321], [0, -2],
                  [65536, 255]])
    a = Assembler(TINY)
    e = a.tensor("e", "input", (5, 2), "i32")
    y = a.tensor("y", "output", (5, 2), "i32")
    yr = a.tensor("yr", "output", (5, 2), "i32")
    a.load(mem=Mem.IDX, dram_addr=e, spad_addr=10, run=5, dtype=DType.I32)
    # reversed: entry 4 first, DRAM stride -8 bytes
    a.load(mem=Mem.IDX, dram_addr=e + 4 * 8, spad_addr=100, run=1, n0=5, ds0=-8, ss0=1,
           dtype=DType.I32, push_next=1)
    a.mark(id=0, pop_prev=1, push_next=1)
    a.store(mem=Mem.IDX, dram_addr=y, spad_addr=10, run=5, dtype=DType.I32, pop_prev=1)
    a.store(mem=Mem.IDX, dram_addr=yr, spad_addr=100, run=5, dtype=DType.I32)
    a.end()
    res, out, _ = run(a, {"e": E})
    assert np.array_equal(out["y"], E)
    assert np.array_equal(out["yr"], E[::-1])
    assert res.counters["dram_read_bytes"] == 80
    assert res.counters["dram_write_bytes"] == 80


def test_store_saturates_i8_and_u8_and_counts_events():
    V = np.array([-300, -129, -128, -1, 0, 127, 128, 255, 256, 32767, -32768, 5])
    a = Assembler(TINY)
    v = a.tensor("v", "input", (12,), "i16")
    y8 = a.tensor("y8", "output", (12,), "i8")
    yu = a.tensor("yu", "output", (12,), "u8")
    y16 = a.tensor("y16", "output", (12,), "i16")
    a.load(dram_addr=v, spad_addr=0, run=12, dtype=DType.I16, push_next=1)
    a.mark(id=0, pop_prev=1, push_next=1)
    a.store(dram_addr=y8, spad_addr=0, run=12, dtype=DType.I8, pop_prev=1)
    a.store(dram_addr=yu, spad_addr=0, run=12, dtype=DType.U8)
    a.store(dram_addr=y16, spad_addr=0, run=12, dtype=DType.I16)
    a.end()
    res, out, _ = run(a, {"v": V})
    assert np.array_equal(out["y8"], np.clip(V, -128, 127))
    assert np.array_equal(out["yu"], np.clip(V, 0, 255))
    assert np.array_equal(out["y16"], V)
    ev8 = int(np.count_nonzero((V < -128) | (V > 127)))
    evu = int(np.count_nonzero((V < 0) | (V > 255)))
    assert (ev8, evu) == (7, 7)
    assert res.counters["sat_events"] == ev8 + evu
    assert res.counters["dram_write_bytes"] == 12 + 12 + 24


def test_three_level_loops_with_negative_strides():
    A, B, C = 3, 4, 10
    X = np.arange(A * B * C).reshape(A, B, C) * 37 % 2000 - 1000
    a = Assembler(TINY)
    x = a.tensor("x", "input", (A, B, C), "i16")
    y = a.tensor("y", "output", (A, B, 3, 2), "i16")
    z = a.tensor("z", "output", (A, B, C), "i16")
    # load: i2 walks A backwards, i1 walks B backwards, i0 takes column pairs 2-3, 5-6, 8-9
    last = ((A - 1) * B * C + (B - 1) * C + 2) * 2
    a.load(dram_addr=x + last, spad_addr=0, run=2, n0=3, n1=B, n2=A, ds0=3 * 2,
           ds1=-C * 2, ds2=-B * C * 2, ss0=2, ss1=6, ss2=24, dtype=DType.I16, push_next=1)
    a.mark(id=0, pop_prev=1, push_next=1)
    a.store(dram_addr=y, spad_addr=0, run=2 * 3 * B * A, dtype=DType.I16, pop_prev=1)
    # store it back through the same negative strides: undoes the reversal
    a.store(dram_addr=z + last, spad_addr=0, run=2, n0=3, n1=B, n2=A, ds0=3 * 2,
            ds1=-C * 2, ds2=-B * C * 2, ss0=2, ss1=6, ss2=24, dtype=DType.I16)
    a.end()
    res, out, _ = run(a, {"x": X})
    exp = np.zeros((A, B, 3, 2), dtype=np.int64)
    for i2 in range(A):
        for i1 in range(B):
            for i0 in range(3):
                for e in range(2):
                    exp[i2, i1, i0, e] = X[A - 1 - i2, B - 1 - i1, 2 + 3 * i0 + e]
    assert np.array_equal(out["y"], exp)
    zexp = np.zeros_like(X)
    cols = [2, 3, 5, 6, 8, 9]
    zexp[:, :, cols] = X[:, :, cols]
    assert np.array_equal(out["z"], zexp)
    assert res.counters["dram_read_bytes"] == A * B * 6 * 2
    assert res.counters["dram_write_bytes"] == 2 * A * B * 6 * 2


@pytest.mark.parametrize("t", [0, 3, 4])
def test_blk_reg_selects_a_block(t):
    T, D = 5, 8
    X = (np.arange(T * D).reshape(T, D) + 1) * (-1) ** np.arange(D)
    a = Assembler(TINY)
    x = a.tensor("x", "input", (T, D), "i16")
    y = a.tensor("y", "output", (D,), "i16")
    z = a.tensor("z", "output", (T, D), "i16")
    a.reg("t", 1, 0, T - 1)
    a.load(dram_addr=x, spad_addr=0, run=D, blk_reg=1, blk_stride=D * 2, dtype=DType.I16,
           push_next=1)
    a.mark(id=0, pop_prev=1, push_next=1)
    a.store(dram_addr=y, spad_addr=0, run=D, dtype=DType.I16, pop_prev=1)
    # REG[2] = T-1-t picks the destination row (blk_stride in bytes)
    a.store(dram_addr=z, spad_addr=0, run=D, blk_reg=2, blk_stride=D * 2, dtype=DType.I16)
    a.end()
    res, out, _ = run(a, {"x": X}, regs={1: t, 2: T - 1 - t})
    assert np.array_equal(out["y"], X[t])
    zexp = np.zeros((T, D), dtype=np.int64)
    zexp[T - 1 - t] = X[t]
    assert np.array_equal(out["z"], zexp)


@pytest.mark.parametrize("cfg", [TINY, ECP5], ids=["tiny", "ecp5"])
@pytest.mark.parametrize("count", [None, 2])
def test_spans_gather_and_scatter(cfg, count):
    H, N, D = 2, 12, 6
    K = (np.arange(H * N * D).reshape(H, N, D) * 13) % 601 - 300
    SP = np.array([[2, 3], [9, 1], [0, 2], [5, 0], [10, 2]])   # (start, length), any order
    used = SP if count is None else SP[:count]
    rows = [r for s, n in used for r in range(s, s + n)]
    R = len(rows)
    a = Assembler(cfg)
    k = a.tensor("k", "input", (H, N, D), "i16")
    sp = a.tensor("sp", "input", (5, 2), "i32")
    g = a.tensor("g", "output", (H, 11, D - 2), "i16")
    s = a.tensor("s", "output", (H, N, D), "i16")
    a.load(mem=Mem.IDX, dram_addr=sp, spad_addr=40, run=5, dtype=DType.I32)
    cnt = dict(count_reg=3) if count else dict(n2=5)
    # columns 1..D-2 of the listed rows, for both heads; on chip rows of D words
    a.load(mode=DmaMode.SPANS, dram_addr=k + 2, spad_addr=0, run=D - 2, n1=H, ds0=D * 2,
           ds1=N * D * 2, ss0=D, ss1=64, idx_addr=40, dtype=DType.I16, push_next=1, **cnt)
    a.mark(id=0, pop_prev=1, push_next=1)
    a.store(dram_addr=g, spad_addr=0, run=D - 2, n0=R, n1=H, ds0=(D - 2) * 2,
            ds1=11 * (D - 2) * 2, ss0=D, ss1=64, dtype=DType.I16, pop_prev=1)
    # scatter the gathered rows back to their positions (spans mode STORE)
    a.store(mode=DmaMode.SPANS, dram_addr=s + 2, spad_addr=0, run=D - 2, n1=H, ds0=D * 2,
            ds1=N * D * 2, ss0=D, ss1=64, idx_addr=40, dtype=DType.I16, **cnt)
    a.end()
    res, out, _ = run(a, {"k": K, "sp": SP}, regs={3: count} if count else None)
    gexp = np.zeros((H, 11, D - 2), dtype=np.int64)
    gexp[:, :R] = K[:, rows, 1:D - 1]
    assert np.array_equal(out["g"], gexp)
    sexp = np.zeros((H, N, D), dtype=np.int64)
    sexp[:, rows, 1:D - 1] = K[:, rows, 1:D - 1]
    assert np.array_equal(out["s"], sexp)
    assert res.counters["dram_read_bytes"] == 5 * 8 + H * R * (D - 2) * 2
    assert res.counters["dram_write_bytes"] == 2 * H * R * (D - 2) * 2


def test_spans_instruction_feeds_count_and_block_registers():
    N, D, blk = 24, 4, 3
    K = np.arange(N * D).reshape(N, D) - 40
    # selected blocks 4, 2, 5 (and -1: none); sink block 0; diagonal blocks 6, 7; limit 22
    # -> blocks {0, 2, 4, 5, 6, 7} -> rows [0,3) [6,9) [12,22) after merging and clipping
    spans = [(0, 3), (6, 3), (12, 10)]
    rows = [r for s, n in spans for r in range(s, s + n)]
    BL = np.array([[4, 9], [-1, 0], [2, 8], [5, 7]])
    a = Assembler(TINY)
    k = a.tensor("k", "input", (N, D), "i16")
    bl = a.tensor("bl", "input", (4, 2), "i32")
    g = a.tensor("g", "output", (len(rows), D), "i16")
    mk = a.tensor("mk", "output", (N, D), "i16")
    sp_out = a.tensor("sp", "output", (3, 2), "i32")
    a.load(mem=Mem.IDX, dram_addr=bl, spad_addr=0, run=4, dtype=DType.I32, push_next=1)
    a.spans(pop_prev=1, push_prev=1, k=4, idx_addr=0, block=blk, sink=1, diag_lo=6, diag_n=2,
            limit=22, out_addr=16, dst_reg=5, rows_reg=6)
    a.load(pop_next=1, push_next=1, mode=DmaMode.SPANS, dram_addr=k, spad_addr=0, run=D,
           ds0=D * 2, ss0=D, idx_addr=16, count_reg=5, dtype=DType.I16)
    a.mark(id=0, pop_prev=1, push_next=1)
    a.store(pop_prev=1, dram_addr=g, spad_addr=0, run=D * len(rows), dtype=DType.I16)
    # one row at mk + REG[6] rows: REG[6] = total rows of the spans
    a.store(dram_addr=mk, spad_addr=0, run=D, blk_reg=6, blk_stride=D * 2, dtype=DType.I16)
    a.store(mem=Mem.IDX, dram_addr=sp_out, spad_addr=16, run=3, dtype=DType.I32)
    a.end()
    res, out, _ = run(a, {"k": K, "bl": BL})
    assert np.array_equal(out["sp"], np.array(spans))
    assert np.array_equal(out["g"], K[rows])
    mexp = np.zeros((N, D), dtype=np.int64)
    mexp[len(rows)] = K[rows[0]]
    assert np.array_equal(out["mk"], mexp)


# -- MATMUL --------------------------------------------------------------------------------------

def _mm_prog(cfg, A, B, *, b_trans=False, split=None, chan=None, res=None, act=Act.NONE,
             mult=1, shift=0, res_mult=0, res_shift=0, acc_addr=0):
    """LOAD A (i16), B (i8, stored transposed if b_trans), optional channel table / residual;
    MATMUL (or two, accumulating in ACC, when split = k1); STORE Y."""
    m, k = A.shape
    n = B.shape[1]
    a = Assembler(cfg)
    xa = a.tensor("a", "input", (m, k), "i16")
    wb = a.const("b", B.T.copy() if b_trans else B, "i8")
    y = a.tensor("y", "output", (m, n), "i16")
    A_ADDR, B_ADDR, O_ADDR, C_ADDR, R_ADDR = 0, 2048, 4096, 6144, 7168
    a_stride, b_rows, b_cols = k + 3, (n if b_trans else k), (k if b_trans else n)
    b_stride = b_cols + 1
    out_stride = n + 2
    loads = [dict(dram_addr=xa, spad_addr=A_ADDR, run=k, n0=m, ds0=k * 2, ss0=a_stride,
                  dtype=DType.I16),
             dict(dram_addr=wb, spad_addr=B_ADDR, run=b_cols, n0=b_rows, ds0=b_cols,
                  ss0=b_stride, dtype=DType.I8)]
    if chan is not None:
        ct = a.const("chan", chan, "i16")
        loads.append(dict(dram_addr=ct, spad_addr=C_ADDR, run=4 * n, dtype=DType.I16))
    if res is not None:
        rr = a.tensor("r", "input", (m, n), "i16")
        loads.append(dict(dram_addr=rr, spad_addr=R_ADDR, run=n, n0=m, ds0=n * 2,
                          ss0=out_stride, dtype=DType.I16))
    for i, ld in enumerate(loads):
        a.load(push_next=int(i == len(loads) - 1), **ld)
    common = dict(m=m, n=n, a_stride=a_stride, b_stride=b_stride, b_trans=int(b_trans),
                  acc_addr=acc_addr)
    epi = dict(out=OutMode.SPAD, out_addr=O_ADDR, out_stride=out_stride, mult=mult,
               shift=shift, act=act)
    if chan is not None:
        epi.update(chan_en=1, chan_addr=C_ADDR)
    if res is not None:
        epi.update(res_en=1, res_addr=R_ADDR, res_mult=res_mult, res_shift=res_shift)
    b_k_step = 1 if b_trans else b_stride          # B address step per k
    if split is None:
        a.matmul(pop_prev=1, push_next=1, k=k, a_addr=A_ADDR, b_addr=B_ADDR, **common, **epi)
    else:
        a.matmul(pop_prev=1, k=split, a_addr=A_ADDR, b_addr=B_ADDR, out=OutMode.ACC, **common)
        a.matmul(push_next=1, k=k - split, a_addr=A_ADDR + split,
                 b_addr=B_ADDR + split * b_k_step, acc_in=AccIn.ACC, **common, **epi)
    a.store(pop_prev=1, dram_addr=y, spad_addr=O_ADDR, run=n, n0=m, ds0=n * 2,
            ss0=out_stride, dtype=DType.I16)
    a.end()
    return a


def _mats(rng, m, k, n, amax=2000):
    return rng.integers(-amax, amax + 1, (m, k)), rng.integers(-128, 128, (k, n))


@pytest.mark.parametrize("cfg", [TINY, ECP5], ids=["tiny", "ecp5"])
@pytest.mark.parametrize("b_trans", [False, True])
def test_matmul_plain_requantise_and_saturate(cfg, b_trans):
    rng = np.random.default_rng(2)
    m, k, n = (5, 11, 7) if cfg is TINY else (19, 40, 37)
    A, B = _mats(rng, m, k, n)
    res, out, _ = run(_mm_prog(cfg, A, B, b_trans=b_trans, mult=3, shift=4), {"a": A})
    acc = A @ B
    v = rnd(acc * 3, 4)
    assert np.array_equal(out["y"], sat(v))
    assert res.counters["sat_events"] == n_sat(v) > 0
    assert res.counters["macs"] == m * k * n
    assert res.counters["dram_read_bytes"] == m * k * 2 + k * n
    assert res.counters["dram_write_bytes"] == m * n * 2


@pytest.mark.parametrize("b_trans", [False, True])
@pytest.mark.parametrize("acc_addr", [0, 17])
def test_matmul_accumulates_across_two_instructions(b_trans, acc_addr):
    rng = np.random.default_rng(3)
    m, k, n = 6, 14, 9
    A, B = _mats(rng, m, k, n)
    res, out, _ = run(_mm_prog(TINY, A, B, b_trans=b_trans, split=5, mult=1, shift=8,
                               acc_addr=acc_addr), {"a": A})
    assert np.array_equal(out["y"], sat(rnd(A @ B, 8)))
    # the second half alone would be different: the first really was accumulated
    assert not np.array_equal(out["y"], sat(rnd(A[:, 5:] @ B[5:], 8)))
    assert res.counters["macs"] == m * k * n


@pytest.mark.parametrize("cfg", [TINY, ECP5], ids=["tiny", "ecp5"])
def test_matmul_channel_table(cfg):
    rng = np.random.default_rng(4)
    m, k, n = 5, 12, 7
    A, B = _mats(rng, m, k, n)
    bias = np.array([-70000, 123456, -5, 0, 65535, -65536, 99999])
    mult = np.array([1, -2, 300, 7, -32768, 32767, 5])
    shift = np.array([0, 3, 10, 1, 20, 16, 62])
    lo = (bias & 0xFFFF).astype(np.uint16).view(np.int16).astype(np.int64)   # low half, as a word
    hi = bias >> 16
    chan = np.stack([lo, hi, mult, shift], axis=1)                            # [n, 4] words
    res, out, _ = run(_mm_prog(cfg, A, B, chan=chan, mult=0, shift=0), {"a": A})
    v = rnd((A @ B + bias[None, :]) * mult[None, :], shift[None, :])
    assert np.array_equal(out["y"], sat(v))
    assert res.counters["sat_events"] == n_sat(v)


def test_matmul_residual_add():
    rng = np.random.default_rng(5)
    m, k, n = 4, 8, 6
    A, B = _mats(rng, m, k, n)
    R = rng.integers(-32768, 32768, (m, n))
    R[0, :2] = [32767, -32768]
    res, out, _ = run(_mm_prog(TINY, A, B, res=R, mult=5, shift=7, res_mult=-3, res_shift=1),
                      {"a": A, "r": R})
    y = sat(rnd((A @ B) * 5, 7))
    z = y + rnd(R * -3, 1)
    assert np.array_equal(out["y"], sat(z))
    assert n_sat(z) > 0
    assert res.counters["sat_events"] == n_sat(rnd((A @ B) * 5, 7)) + n_sat(z)


def test_matmul_relu():
    rng = np.random.default_rng(6)
    m, k, n = 6, 10, 5
    A, B = _mats(rng, m, k, n)
    res, out, _ = run(_mm_prog(TINY, A, B, act=Act.RELU, mult=7, shift=9), {"a": A})
    acc = A @ B
    assert np.array_equal(out["y"], sat(rnd(np.maximum(acc, 0) * 7, 9)))
    assert (acc < 0).any() and (out["y"][acc < 0] == 0).all()


# -- VEC -----------------------------------------------------------------------------------------

def _vec_prog(op, m, n, **f):
    a = Assembler(TINY)
    rows_a = m * f.get("group", 1)
    xa = a.tensor("a", "input", (rows_a, n), "i16")
    xb = a.tensor("b", "input", (m, n), "i16")
    y = a.tensor("y", "output", (m, n), "i16")
    a.load(dram_addr=xa, spad_addr=0, run=n, n0=rows_a, ds0=n * 2, ss0=n + 1, dtype=DType.I16)
    a.load(dram_addr=xb, spad_addr=1000, run=n, n0=m, ds0=n * 2, ss0=n + 3, dtype=DType.I16,
           push_next=1)
    a.vec(pop_prev=1, push_next=1, op=op, m=m, n=n, a_addr=0, a_stride=n + 1, b_addr=1000,
          b_stride=n + 3, out_addr=2000, out_stride=n, **f)
    a.store(pop_prev=1, dram_addr=y, spad_addr=2000, run=n * m, dtype=DType.I16)
    a.end()
    return a


@pytest.mark.parametrize("op", ["copy", "add", "mul", "pool"])
def test_vec_ops(op):
    rng = np.random.default_rng(7)
    m, n, group = 5, 7, 3
    A = rng.integers(-32768, 32768, (m * (group if op == "pool" else 1), n))
    B = rng.integers(-32768, 32768, (m, n))
    if op == "copy":
        f = dict(ma=-3, sa=1)
        v = rnd(A * -3, 1)
    elif op == "add":
        f = dict(ma=5, sa=2, mb=-7, sb=3)
        v = rnd(A * 5, 2) + rnd(B * -7, 3)
    elif op == "mul":
        f = dict(ma=3, sa=16)
        v = rnd(A * B * 3, 16)
    else:
        f = dict(ma=11, sa=4, group=group)
        v = rnd(A.reshape(m, group, n).sum(axis=1) * 11, 4)
    res, out, _ = run(_vec_prog(getattr(VecOp, op.upper()), m, n, **f), {"a": A, "b": B})
    assert np.array_equal(out["y"], sat(v))
    assert n_sat(v) > 0
    assert res.counters["sat_events"] == n_sat(v)


# -- MoE: TOPK + ROUTE + gather / scatter MATMUL with predication ---------------------------------

def _topk_ref(R, k):
    out = []
    for row in R:
        order = sorted(range(len(row)), key=lambda j: (-int(row[j]), j))[:k]
        out.append([(j, int(row[j])) for j in order])
    return out


@pytest.mark.parametrize("cfg", [TINY, ECP5], ids=["tiny", "ecp5"])
def test_moe_topk_route_gather_scatter(cfg):
    rng = np.random.default_rng(8)
    T, D, DO, E, TOPK = 7, 10, 6, 6, 2
    X = rng.integers(-3000, 3000, (T, D))
    W = rng.integers(-128, 128, (E, D, DO))
    Y0 = rng.integers(-20000, 20000, (T, DO))
    Y0[0, 0] = 32000
    # router probabilities (Q.15); experts 1 and 4 are never in a top 2; row 3 has a tie
    R = rng.integers(1000, 30000, (T, E))
    R[:, 1] = rng.integers(0, 100, T)
    R[:, 4] = rng.integers(0, 100, T)
    R[3, [0, 2, 3, 5]] = [20000, 25000, 25000, 100]     # tie 2 / 3: the lower index first
    R[6, :] = [0, 0, 0, 0, 0, 0]                         # all equal: experts 0, 1
    mult, shift = 5, 6
    a = Assembler(cfg)
    x = a.tensor("x", "input", (T, D), "i16")
    w = a.const("w", W, "i8")
    y0 = a.tensor("y0", "input", (T, DO), "i16")
    r = a.tensor("r", "input", (T, E), "i16")
    y = a.tensor("y", "output", (T, DO), "i16")
    qo = a.tensor("q", "output", (T * TOPK, 2), "i32")
    qt = a.tensor("qt", "output", (E, 2), "i32")
    XA, WA, YA, RA = 0, 512, 2048, 3072
    a.load(dram_addr=x, spad_addr=XA, run=T * D, dtype=DType.I16)
    a.load(dram_addr=w, spad_addr=WA, run=E * D * DO, dtype=DType.I8)
    a.load(dram_addr=y0, spad_addr=YA, run=T * DO, dtype=DType.I16)
    a.load(dram_addr=r, spad_addr=RA, run=T * E, dtype=DType.I16, push_next=1)
    a.topk(pop_prev=1, k=TOPK, m=T, n=E, in_addr=RA, in_stride=E, idx_addr=0)
    a.route(k=TOPK, n_experts=E, m=T, idx_addr=0, q_addr=100, qtab_addr=200)
    for e in range(E):
        a.matmul(pred_en=1, pred_q=e, gather=1, scatter=1, queue=e, out=OutMode.SPAD_ADD, m=T,
                 k=D, n=DO, a_addr=XA, a_stride=D, b_addr=WA + e * D * DO, b_stride=DO,
                 out_addr=YA, out_stride=DO, mult=mult, shift=shift)
    # not predicated, empty queue: runs over zero tokens
    a.matmul(gather=1, scatter=1, queue=4, out=OutMode.SPAD_ADD, m=T, k=D, n=DO, a_addr=XA,
             a_stride=D, b_addr=WA, b_stride=DO, out_addr=YA, out_stride=DO, mult=mult,
             shift=shift, push_next=1)
    a.store(pop_prev=1, dram_addr=y, spad_addr=YA, run=T * DO, dtype=DType.I16)
    a.store(mem=Mem.IDX, dram_addr=qo, spad_addr=100, run=T * TOPK, dtype=DType.I32)
    a.store(mem=Mem.IDX, dram_addr=qt, spad_addr=200, run=E, dtype=DType.I32)
    a.end()
    res, out, _ = run(a, {"x": X, "y0": Y0, "r": R})

    top = _topk_ref(R, TOPK)
    assert [j for j, _ in top[3]] == [2, 3] and [j for j, _ in top[6]] == [0, 1]
    queues = {e: [(t, p) for t in range(T) for j, p in top[t] if j == e] for e in range(E)}
    qexp, qtab, off = [], [], 100
    for e in range(E):
        qtab.append((off, len(queues[e])))
        qexp += queues[e]
        off += len(queues[e])
    assert np.array_equal(out["q"], np.array(qexp))
    assert np.array_equal(out["qt"], np.array(qtab))
    Y = Y0.astype(np.int64).copy()
    events = 0
    for e in range(E):
        for t, p in queues[e]:
            v = rnd(X[t] @ W[e] * mult, shift)
            events += n_sat(v)
            z = Y[t] + rnd(sat(v) * p, 15)
            events += n_sat(z)
            Y[t] = sat(z)
    assert np.array_equal(out["y"], Y)
    assert res.counters["sat_events"] == events
    empty = [e for e in range(E) if not queues[e]]
    assert 4 in empty and 1 not in empty          # token 6 (all-zero row) picked expert 1
    assert res.counters["skipped"] == len(empty)
    assert res.counters["macs"] == sum(len(q) for q in queues.values()) * D * DO


# -- MARK, trace, counters -----------------------------------------------------------------------

def test_mark_snapshots():
    rng = np.random.default_rng(9)
    m, k, n = 4, 6, 8
    A, B = _mats(rng, m, k, n)
    a = Assembler(TINY)
    xa = a.tensor("a", "input", (m, k), "i16")
    wb = a.const("b", B, "i8")
    y = a.tensor("y", "output", (m, n), "i16")
    a.load(dram_addr=xa, spad_addr=0, run=m * k, dtype=DType.I16)
    a.load(dram_addr=wb, spad_addr=512, run=k * n, dtype=DType.I8, push_next=1)
    mm = dict(m=m, k=k, n=n, a_addr=0, a_stride=k, b_addr=512, b_stride=n, out=OutMode.SPAD,
              out_addr=1024, out_stride=n, mult=1, shift=20)
    a.mark(7, pop_prev=1)
    a.matmul(**mm)
    a.mark(8)
    a.matmul(**{**mm, "k": 3, "shift": 0, "mult": 100})
    a.mark(9, push_next=1)
    a.store(pop_prev=1, dram_addr=y, spad_addr=1024, run=m * n, dtype=DType.I16)
    a.end()
    res, out, _ = run(a, {"a": A})
    assert [i for i, _ in res.marks] == [7, 8, 9]
    s7, s8, s9 = (s for _, s in res.marks)
    rd = m * k * 2 + k * n
    assert (s7["macs"], s8["macs"], s9["macs"]) == (0, m * k * n, m * k * n + m * 3 * n)
    assert s7["dram_read_bytes"] == s9["dram_read_bytes"] == rd
    assert s9["dram_write_bytes"] == 0 and res.counters["dram_write_bytes"] == m * n * 2
    assert s8["instructions"] - s7["instructions"] == 2
    v = rnd((A[:, :3] @ B[:3]) * 100, 0)
    assert s8["sat_events"] == 0 and s9["sat_events"] == n_sat(v) > 0
    assert res.counters["instructions"] == 9


def test_trace_records_every_instruction_and_store_ranges():
    a = Assembler(TINY)
    x = a.tensor("x", "input", (4, 8), "i16")
    y = a.tensor("y", "output", (4, 8), "i16")
    z = a.tensor("z", "output", (4, 16), "i8")
    a.load(dram_addr=x, spad_addr=0, run=32, dtype=DType.I16, push_next=1)
    a.vec(pop_prev=1, push_next=1, op=VecOp.COPY, m=4, n=8, a_addr=0, a_stride=8, out_addr=64,
          out_stride=8, ma=1, sa=1)
    a.store(pop_prev=1, dram_addr=y, spad_addr=64, run=32, dtype=DType.I16)
    # strided: 3 bytes of every row of z, starting at column 2
    a.store(dram_addr=z + 2, spad_addr=64, run=3, n0=4, ds0=16, ss0=8, dtype=DType.I8)
    a.end()
    prog = a.link()
    X = np.arange(32).reshape(4, 8) * 7 - 100
    res, out = run_program(prog, {"x": X}, trace=True)
    assert res.ok
    assert [t["pc"] for t in res.trace] == list(range(prog.n_instr))
    assert [t["op"] for t in res.trace] == ["LOAD", "VEC", "STORE", "STORE", "END"]
    ys, zs = prog.symbol("y"), prog.symbol("z")
    assert res.trace[0]["writes"] == [] and res.trace[1]["writes"] == []
    assert res.trace[2]["writes"] == [(ys.addr, ys.addr + 32 * 2)]
    (lo, hi), = res.trace[3]["writes"]
    written = [zs.addr + 16 * r + 2 + c for r in range(4) for c in range(3)]
    assert (lo, hi) == (min(written), max(written) + 1)
    assert res.trace[-1]["dram_crc"] == zlib.crc32(res.dram.tobytes())
    assert res.trace[0]["dram_crc"] == res.trace[1]["dram_crc"] != res.trace[2]["dram_crc"]
    zexp = np.zeros((4, 16), dtype=np.int64)
    zexp[:, 2:5] = sat(rnd(X, 1)[:, :3], 8)
    assert np.array_equal(out["z"], zexp)
    assert np.array_equal(out["y"], rnd(X, 1))


def test_counters_exact_for_a_mixed_program():
    a = Assembler(TINY)
    b8 = a.tensor("b8", "input", (40,), "i8")
    bu = a.tensor("bu", "input", (40,), "u8")
    w = a.tensor("w", "input", (40,), "i16")
    e = a.tensor("e", "input", (6, 2), "i32")
    o = a.tensor("o", "output", (64,), "i16")
    a.load(dram_addr=b8, spad_addr=0, run=3, n0=4, n1=2, ds0=5, ds1=20, ss0=3, ss1=12,
           dtype=DType.I8)                                                  # 24 bytes
    a.load(dram_addr=bu, spad_addr=100, run=7, dtype=DType.U8)              # 7
    a.load(dram_addr=w, spad_addr=200, run=2, n0=3, n1=2, n2=2, ds0=4, ds1=12, ds2=24,
           ss0=2, ss1=6, ss2=12, dtype=DType.I16)                           # 24 el = 48
    a.load(mem=Mem.IDX, dram_addr=e, spad_addr=0, run=6, dtype=DType.I32, push_next=1)  # 48
    a.mark(0, pop_prev=1, push_next=1)
    a.store(pop_prev=1, dram_addr=o, spad_addr=0, run=5, n0=3, ds0=10, ss0=5,
            dtype=DType.I16)                                                # 30
    a.store(dram_addr=o + 40, spad_addr=0, run=9, dtype=DType.I8)           # 9
    a.store(mem=Mem.IDX, dram_addr=o + 60, spad_addr=1, run=4, dtype=DType.I32)         # 32
    a.end()
    res, _, _ = run(a, {"b8": np.arange(40) - 20, "bu": np.arange(40) * 6,
                        "w": np.arange(40), "e": np.arange(12).reshape(6, 2)})
    assert res.counters["dram_read_bytes"] == 24 + 7 + 48 + 48
    assert res.counters["dram_write_bytes"] == 30 + 9 + 32
    assert res.counters["instructions"] == 9
    assert res.counters["macs"] == 0 and res.counters["skipped"] == 0
