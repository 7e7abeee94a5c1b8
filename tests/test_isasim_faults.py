"""Hardware faults of the ISA simulator.

Every fault must halt the machine with the right ErrorCode, the faulting pc and a message naming
the problem; simulate() must return (never raise, never hang). Programs are built with the
Assembler; the DRAM image is patched where the fault cannot be assembled (zeroed words, undefined
enum values).
"""

import numpy as np
import pytest
from amaranth.lib import data

from vitamin import get_config, isa
from vitamin.asm import Assembler, Ref
from vitamin.golden.isasim import RunResult, check_tokens, simulate
from vitamin.isa import AccIn, DmaMode, DType, ErrorCode, Mem, Opcode, OutMode, SmMode, VecOp

TINY = get_config("tiny")


def _sim(prog, inputs=None, *, regs=None, n_instr=None, image=None, config=None):
    img = prog.dram_image() if image is None else image
    for name, v in (inputs or {}).items():
        prog.write_tensor(img, name, v)
    res = simulate(config or prog.config, img, prog.n_instr if n_instr is None else n_instr,
                   regs=regs)
    assert isinstance(res, RunResult)
    return res


def _expect(res, code, pc, *words):
    assert res.status == code, (res.status, res.message)
    assert res.error_pc == pc, (res.error_pc, res.message)
    for w in words:
        assert w.lower() in res.message.lower(), (w, res.message)


def _copy_prog(config=TINY, extra=None):
    """LOAD x -> VEC COPY -> STORE y, with tokens; `extra(a, x, y)` may add instructions first."""
    a = Assembler(config)
    x = a.tensor("x", "input", (4, 8), "i16")
    y = a.tensor("y", "output", (4, 8), "i16")
    if extra:
        extra(a, x, y)
    a.load(dram_addr=x, spad_addr=0, run=32, dtype=DType.I16, push_next=1)
    a.vec(op=VecOp.COPY, m=4, n=8, a_addr=0, a_stride=8, out_addr=64, out_stride=8, ma=1,
          sa=0, pop_prev=1, push_next=1)
    a.store(dram_addr=y, spad_addr=64, run=32, dtype=DType.I16, pop_prev=1)
    a.end()
    return a


X = np.arange(32).reshape(4, 8) - 7


# -- decode faults -------------------------------------------------------------------------------

def test_zeroed_word_is_illegal_opcode():
    prog = _copy_prog().link()
    img = prog.dram_image()
    img[1 * 64:2 * 64] = 0                       # the VEC COPY in the middle
    res = _sim(prog, {"x": X}, image=img)
    _expect(res, ErrorCode.ILLEGAL_OPCODE, 1, "opcode")
    assert res.message == "illegal opcode 0"
    out = prog.read_tensor(res.dram, "y")
    assert not out.any()                         # the STORE after the fault never ran


def test_unassigned_opcode_is_illegal():
    prog = _copy_prog().link()
    img = prog.dram_image()
    img[2 * 64] = (int(img[2 * 64]) & 0xE0) | 17   # opcode (bits 0..4) 17 is not defined
    res = _sim(prog, {"x": X}, image=img)
    _expect(res, ErrorCode.ILLEGAL_OPCODE, 2, "illegal opcode 17")


def test_undefined_enum_value_is_bad_field():
    a = Assembler(TINY)
    a.matmul(m=2, k=2, n=4, a_addr=0, a_stride=2, b_addr=64, b_stride=4, out=OutMode.SPAD,
             out_addr=128, out_stride=4, mult=1, shift=0)
    a.end()
    prog = a.link()
    img = prog.dram_image()
    f = data.Layout.cast(isa.Matmul)["act"]
    word = int.from_bytes(img[:64].tobytes(), "little") | (3 << f.offset)   # act = 3: undefined
    img[:64] = np.frombuffer(word.to_bytes(64, "little"), np.uint8)
    res = _sim(prog, image=img)
    _expect(res, ErrorCode.BAD_FIELD, 0, "act", "undefined value 3")


def test_no_end_within_n_instr():
    prog = _copy_prog().link()
    res = _sim(prog, {"x": X}, n_instr=prog.n_instr - 1)       # END cut off
    _expect(res, ErrorCode.NO_END, prog.n_instr - 1, "no END", str(prog.n_instr - 1))
    res = _sim(prog, {"x": X}, n_instr=0)
    _expect(res, ErrorCode.NO_END, 0, "END")


def test_fetch_past_the_dram_image():
    a = Assembler(TINY)
    for i in range(3):
        a.mark(i)
    a.end()
    img = a.link().dram_image()[:3 * 64]                       # image ends before END
    res = simulate(TINY, img, 10)
    _expect(res, ErrorCode.DRAM_RANGE, 3, "fetch", "outside")
    assert res.counters["instructions"] == 3                   # the MARKs before it ran


# -- address faults ------------------------------------------------------------------------------

def a_x():
    """The 16-element input tensor "x" that every _single() program declares."""
    return Ref("x")


def _single(build, config=TINY, **kw):
    a = Assembler(config)
    a.tensor("x", "input", (16,), "i16")
    build(a)
    a.end()
    prog = a.link()
    return prog, _sim(prog, **kw)


# The window of a one-instruction _single() program: the DRAM image's size (the layout does not
# depend on the instruction's fields).
WINDOW = 8192


@pytest.mark.parametrize("op", ["load", "store"])
def test_dram_range_past_the_window(op):
    prog, res = _single(lambda a: getattr(a, op)(dram_addr=WINDOW, spad_addr=0, run=1,
                                                 dtype=DType.I16))
    assert prog.dram_size == WINDOW
    _expect(res, ErrorCode.DRAM_RANGE, 0, "DRAM address", f"{WINDOW:#x}", "outside")
    # the last whole element inside the window is fine
    prog, res = _single(lambda a: getattr(a, op)(dram_addr=WINDOW - 2, spad_addr=0, run=1,
                                                 dtype=DType.I16))
    assert res.ok, res.message


def test_dram_range_element_straddles_the_end():
    prog, res = _single(lambda a: a.load(dram_addr=WINDOW - 1, spad_addr=0, run=1,
                                         dtype=DType.I16))
    _expect(res, ErrorCode.DRAM_RANGE, 0, "DRAM address")
    prog, res = _single(lambda a: a.load(mem=Mem.IDX, dram_addr=WINDOW - 12, spad_addr=0,
                                         run=2, dtype=DType.I32))     # 2 x 8 bytes
    _expect(res, ErrorCode.DRAM_RANGE, 0, "DRAM address")


def test_dram_range_negative_stride_and_register_block():
    # rows i0 = 0, 1, 2 at x, x - 2^20, ...: below address 0
    prog, res = _single(lambda a: a.load(dram_addr=a_x(), spad_addr=0, run=2, n0=3,
                                         ds0=-(1 << 20), ss0=2, dtype=DType.I16))
    _expect(res, ErrorCode.DRAM_RANGE, 0, "DRAM address")
    # blk = REG[3] * blk_stride moves the address out of the window; in range when REG = 0
    def build(a):
        a.store(dram_addr=0x1100, spad_addr=0, run=1, blk_reg=3, blk_stride=1 << 22,
                dtype=DType.I8)
    prog, res = _single(build, regs={3: 5})
    _expect(res, ErrorCode.DRAM_RANGE, 0, "DRAM address", f"{0x1100 + 5 * (1 << 22):#x}")
    prog, res = _single(build, regs={3: 0})
    assert res.ok, res.message


def test_dram_range_huge_counts_fault_instead_of_exhausting_memory():
    # The addresses leave the window at i0 = 1; the simulator must fault, not try to build
    # 2^64 element addresses (BUG: MemoryError escapes simulate()).
    def build(a):
        a.load(dram_addr=0, spad_addr=0, run=65535, n0=65535, n1=65535, n2=65535,
               ds0=1 << 24, dtype=DType.I16)
    prog, res = _single(build)
    _expect(res, ErrorCode.DRAM_RANGE, 0, "DRAM address")


@pytest.mark.parametrize("case", ["load", "store", "matmul_a", "matmul_b", "matmul_out",
                                  "vec_out", "softmax_in", "chan_table"])
def test_spad_range(case):
    top = TINY.spad_words

    def build(a):
        x = a_x()
        if case == "load":
            a.load(dram_addr=x, spad_addr=top - 8, run=16, dtype=DType.I16)
        elif case == "store":
            a.store(dram_addr=x, spad_addr=top - 1, run=1, n0=2, ss0=1, dtype=DType.I16)
        elif case.startswith("matmul"):
            kw = dict(m=2, k=4, n=4, a_addr=0, a_stride=4, b_addr=64, b_stride=4,
                      out=OutMode.SPAD, out_addr=128, out_stride=4, mult=1, shift=0)
            kw[{"matmul_a": "a_addr", "matmul_b": "b_addr", "matmul_out": "out_addr"}[case]] = \
                top - 5
            a.matmul(**kw)
        elif case == "vec_out":
            a.vec(op=VecOp.COPY, m=2, n=4, a_addr=0, a_stride=4, out_addr=top - 6,
                  out_stride=4, ma=1, sa=0)
        elif case == "softmax_in":
            a.softmax(m=2, n=4, in_addr=top - 4, in_stride=4, out_addr=0, out_stride=4,
                      mult=100, shift=0)
        else:
            a.matmul(m=2, k=4, n=4, a_addr=0, a_stride=4, b_addr=64, b_stride=4,
                     out=OutMode.SPAD, out_addr=128, out_stride=4, chan_en=1,
                     chan_addr=top - 12)
    prog, res = _single(build)
    _expect(res, ErrorCode.SPAD_RANGE, 0, "outside", f"{top - 1:#x}")


def test_acc_range():
    lines = TINY.acc_lines
    # n = 6 -> 2 tiles of cols = 4; m = 3 -> lines acc_addr .. acc_addr + 5
    ok = dict(m=3, k=2, n=6, a_addr=0, a_stride=2, b_addr=64, b_stride=6, out=OutMode.ACC)
    prog, res = _single(lambda a: a.matmul(acc_addr=lines - 6, **ok))
    assert res.ok, res.message
    prog, res = _single(lambda a: a.matmul(acc_addr=lines - 5, **ok))
    _expect(res, ErrorCode.ACC_RANGE, 0, "accumulator lines", str(lines))


@pytest.mark.parametrize("case", ["load", "store", "topk", "route_in", "route_queue"])
def test_idx_range(case):
    n = TINY.idx_entries

    def build(a):
        x = a_x()
        if case == "load":
            a.load(mem=Mem.IDX, dram_addr=x, spad_addr=n - 1, run=2, dtype=DType.I32)
        elif case == "store":
            a.store(mem=Mem.IDX, dram_addr=x, spad_addr=n, run=1, dtype=DType.I32)
        elif case == "topk":
            a.topk(k=2, m=3, n=4, in_addr=0, in_stride=4, idx_addr=n - 5)
        elif case == "route_in":
            a.route(k=2, n_experts=4, m=3, idx_addr=n - 5, q_addr=0, qtab_addr=100)
        else:
            # 2 tokens x top-1 -> 2 queue entries; q_addr leaves room for one
            a.topk(k=1, m=2, n=4, in_addr=0, in_stride=4, idx_addr=0)
            a.route(k=1, n_experts=4, m=2, idx_addr=0, q_addr=n - 1, qtab_addr=100)
    prog, res = _single(build)
    pc = 1 if case == "route_queue" else 0
    limit = f"{n - 1:#x}" if case in ("load", "store") else str(n - 1)   # DMA reports hex
    _expect(res, ErrorCode.IDX_RANGE, pc, "outside", limit)


def _acc_prog(second_acc_addr, clobber_at=None, first_out=OutMode.ACC):
    a = Assembler(TINY)
    a.tensor("x", "input", (16,), "i16")
    mm = dict(m=2, k=2, n=8, a_addr=0, a_stride=2, b_addr=64, b_stride=8)   # 2 tiles x 2 lines
    if first_out is not None:
        a.matmul(out=first_out, acc_addr=0, out_addr=256, out_stride=8, mult=1, **mm)
    if clobber_at is not None:          # an epilogue MATMUL: its accumulator lines end undefined
        a.matmul(out=OutMode.SPAD, acc_addr=clobber_at, out_addr=512, out_stride=8, mult=1, **mm)
    a.matmul(acc_in=AccIn.ACC, out=OutMode.SPAD, acc_addr=second_acc_addr, out_addr=256,
             out_stride=8, mult=1, **mm)
    a.end()
    prog = a.link()
    return prog, _sim(prog)


def test_accumulating_onto_undefined_accumulator_lines_is_bad_field():
    prog, res = _acc_prog(0)
    assert res.ok, res.message
    for second, clobber, first, pc in [(0, None, None, 0),          # never written
                                       (2, None, OutMode.ACC, 1),   # lines 4..5 never written
                                       (0, 2, OutMode.ACC, 2),      # clobbered by an epilogue
                                       (0, None, OutMode.SPAD, 1)]:  # written only by epilogue
        prog, res = _acc_prog(second, clobber, first)
        _expect(res, ErrorCode.BAD_FIELD, pc, "accumulator lines", "no partial sums")
    prog, res = _acc_prog(0, clobber_at=4)      # epilogue on lines 4..7: 0..3 stay defined
    assert res.ok, res.message


def test_rowstate_range():
    rows = TINY.rowstate_rows
    prog, res = _single(lambda a: a.softmax(mode=SmMode.ONLINE, first=1, m=4, n=4, in_addr=0,
                                            in_stride=4, out_addr=64, out_stride=4, mult=100,
                                            shift=0, rs_base=rows - 3))
    _expect(res, ErrorCode.ROWSTATE_RANGE, 0, "row state", str(rows - 1))


# -- field faults --------------------------------------------------------------------------------

MM = dict(m=2, k=4, n=4, a_addr=0, a_stride=4, b_addr=64, b_stride=4, out=OutMode.SPAD,
          out_addr=128, out_stride=4, mult=1, shift=0)


@pytest.mark.parametrize("name,build,words", [
    ("matmul k=0", lambda a: a.matmul(**{**MM, "k": 0}), ["k = 0"]),
    ("matmul k>max_k", lambda a: a.matmul(**{**MM, "k": TINY.max_k + 1}),
     [f"k = {TINY.max_k + 1}", str(TINY.max_k)]),
    ("matmul m=0", lambda a: a.matmul(**{**MM, "m": 0}), ["m = 0"]),
    ("matmul n>max_dim", lambda a: a.matmul(**{**MM, "n": TINY.max_dim + 1}),
     [f"n = {TINY.max_dim + 1}"]),
    ("matmul shift 63", lambda a: a.matmul(**{**MM, "shift": 63}), ["shift 63"]),
    ("matmul act_shift 63", lambda a: a.matmul(**{**MM, "act_shift": 63}), ["act_shift"]),
    ("matmul SPAD_ADD without scatter",
     lambda a: a.matmul(**{**MM, "out": OutMode.SPAD_ADD}), ["scatter"]),
    ("matmul queue >= max_experts",
     lambda a: a.matmul(**{**MM, "gather": 1, "queue": TINY.max_experts}), ["queue"]),
    ("load run=0", lambda a: a.load(dram_addr=a_x(), spad_addr=0, run=0, dtype=DType.I16),
     ["run"]),
    ("load n1=0", lambda a: a.load(dram_addr=a_x(), spad_addr=0, run=1, n1=0,
                                   dtype=DType.I16), ["n0 and n1"]),
    ("store n2=0", lambda a: a.store(dram_addr=a_x(), spad_addr=0, run=1, n2=0,
                                     dtype=DType.I16), ["n2"]),
    ("load I32 into spad", lambda a: a.load(dram_addr=a_x(), spad_addr=0, run=1,
                                            dtype=DType.I32), ["I32"]),
    ("store idx as I16", lambda a: a.store(mem=Mem.IDX, dram_addr=a_x(), spad_addr=0, run=1,
                                           dtype=DType.I16), ["I32"]),
    ("softmax negative mult", lambda a: a.softmax(m=1, n=4, in_addr=0, in_stride=4,
                                                  out_addr=8, out_stride=4, mult=-5, shift=0),
     ["mult", "-5"]),
    ("softmax shift 63", lambda a: a.softmax(m=1, n=4, in_addr=0, in_stride=4, out_addr=8,
                                             out_stride=4, mult=5, shift=63), ["shift 63"]),
    ("vec sa 63", lambda a: a.vec(op=VecOp.COPY, m=1, n=4, a_addr=0, a_stride=4, out_addr=8,
                                  out_stride=4, ma=1, sa=63), ["sa"]),
    ("vec pool group 0", lambda a: a.vec(op=VecOp.POOL, m=1, n=4, group=0, a_addr=0,
                                         a_stride=4, out_addr=8, out_stride=4, ma=1, sa=0),
     ["group"]),
    ("topk k=0", lambda a: a.topk(k=0, m=1, n=4, in_addr=0, in_stride=4, idx_addr=0), ["k = 0"]),
    ("topk k>n", lambda a: a.topk(k=5, m=1, n=4, in_addr=0, in_stride=4, idx_addr=0),
     ["k = 5"]),
    ("route n_experts>max", lambda a: a.route(k=1, n_experts=TINY.max_experts + 1, m=1,
                                              idx_addr=0, q_addr=8, qtab_addr=64),
     ["n_experts"]),
    ("layernorm eps_e 41", lambda a: a.layernorm(m=1, n=4, in_addr=0, in_stride=4, out_addr=8,
                                                 out_stride=4, param_addr=64, eps_m=1,
                                                 eps_e=41, shift=0), ["eps_e"]),
    ("spans block 0", lambda a: a.spans(k=1, idx_addr=0, block=0, limit=8, out_addr=8),
     ["block"]),
    ("predicate queue >= max_experts",
     lambda a: a.vec(op=VecOp.COPY, m=1, n=4, a_addr=0, a_stride=4, out_addr=8, out_stride=4,
                     ma=1, sa=0, pred_en=1, pred_q=TINY.max_experts), ["predicate queue"]),
])
def test_bad_field(name, build, words):
    prog, res = _single(build)
    _expect(res, ErrorCode.BAD_FIELD, 0, *words)


def test_acc_in_scale_and_row_norm_need_rowstate_in_range():
    rows = TINY.rowstate_rows
    prog, res = _single(lambda a: a.matmul(**{**MM, "acc_in": AccIn.SCALE,
                                              "rs_base": rows - 1}))
    _expect(res, ErrorCode.ROWSTATE_RANGE, 0, "row state")


def test_route_expert_out_of_range():
    a = Assembler(TINY)
    ent = a.tensor("ent", "input", (3, 2), "i32")      # (expert, probability) entries
    a.load(mem=Mem.IDX, dram_addr=ent, spad_addr=0, run=3, dtype=DType.I32, push_next=1)
    a.route(pop_prev=1, k=1, n_experts=4, m=3, idx_addr=0, q_addr=16, qtab_addr=64)
    a.end()
    prog = a.link()
    res = _sim(prog, {"ent": np.array([[1, 100], [5, 200], [3, 300]])})
    _expect(res, ErrorCode.ROUTE_RANGE, 1, "token 1", "expert 5", "0..3")
    res = _sim(prog, {"ent": np.array([[1, 100], [3, 200], [-2, 300]])})
    _expect(res, ErrorCode.ROUTE_RANGE, 1, "expert -2")
    res = _sim(prog, {"ent": np.array([[1, 100], [3, 200], [-1, 300]])})   # -1 = none: fine
    assert res.ok, res.message


@pytest.mark.parametrize("where", ["dma", "softmax"])
@pytest.mark.parametrize("idx_addr,count", [(8, -2), (0, -1)])
def test_negative_span_count_register_faults(where, idx_addr, count):
    # BUG: a negative REG[count_reg] slices the index memory from the end (idx_addr=0, count=-1
    # reads 511 spans) or crashes with a ValueError from np.concatenate (idx_addr=8, count=-2).
    a = Assembler(TINY)
    a.tensor("x", "input", (64,), "i16")
    if where == "dma":
        a.load(mode=DmaMode.SPANS, dram_addr=a_x(), spad_addr=0, run=2, idx_addr=idx_addr,
               count_reg=4, ds0=4, ss0=2, dtype=DType.I16)
    else:
        a.softmax(m=1, n=2, in_addr=0, in_stride=2, out_addr=8, out_stride=2, mult=100,
                  shift=0, causal=1, kpos_spans=1, count_reg=4, idx_addr=idx_addr)
    a.end()
    prog = a.link()
    res = _sim(prog, regs={4: count})
    assert res.status in (ErrorCode.IDX_RANGE, ErrorCode.BAD_FIELD), (res.status, res.message)
    assert res.error_pc == 0


# -- halting: pc, partial results ----------------------------------------------------------------

def test_fault_halts_after_earlier_stores_and_before_later_ones():
    a = Assembler(TINY)
    x = a.tensor("x", "input", (4, 8), "i16")
    y0 = a.tensor("y0", "output", (4, 8), "i16")
    y1 = a.tensor("y1", "output", (4, 8), "i16")
    a.load(dram_addr=x, spad_addr=0, run=32, dtype=DType.I16, push_next=1)
    a.vec(op=VecOp.COPY, m=4, n=8, a_addr=0, a_stride=8, out_addr=64, out_stride=8, ma=1,
          sa=0, pop_prev=1, push_next=1)
    a.vec(op=VecOp.COPY, m=4, n=8, a_addr=0, a_stride=8, out_addr=128, out_stride=8, ma=-1,
          sa=0, push_next=1)
    a.vec(op=VecOp.COPY, m=4, n=8, a_addr=0, a_stride=8, out_addr=192, out_stride=8, ma=2,
          sa=0, push_next=1)
    a.store(dram_addr=y0, spad_addr=64, run=32, dtype=DType.I16, pop_prev=1)          # pc 4
    bad = a.store(dram_addr=0x7FFFFFF0, spad_addr=128, run=32, dtype=DType.I16,
                  pop_prev=1)                                                         # pc 5
    a.store(dram_addr=y1, spad_addr=192, run=32, dtype=DType.I16, pop_prev=1)         # pc 6
    a.end()
    prog = a.link()
    img = prog.dram_image()
    prog.write_tensor(img, "x", X)
    res = simulate(TINY, img, prog.n_instr, trace=True)
    # the message names the highest offending address: the last element of the run
    _expect(res, ErrorCode.DRAM_RANGE, bad, "DRAM address", f"{0x7FFFFFF0 + 31 * 2:#x}")
    assert np.array_equal(prog.read_tensor(res.dram, "y0"), X)      # earlier STORE landed
    assert not prog.read_tensor(res.dram, "y1").any()                # later STORE did not run
    assert [t["pc"] for t in res.trace] == list(range(bad))         # nothing traced from pc 5
    assert res.counters["dram_write_bytes"] == 64
    # the input image is not modified; the result is a copy
    assert not prog.read_tensor(img, "y0").any()


def test_fault_in_compute_keeps_earlier_results():
    a = Assembler(TINY)
    x = a.tensor("x", "input", (4, 8), "i16")
    y = a.tensor("y", "output", (4, 8), "i16")
    a.load(dram_addr=x, spad_addr=0, run=32, dtype=DType.I16, push_next=1)
    a.vec(op=VecOp.COPY, m=4, n=8, a_addr=0, a_stride=8, out_addr=64, out_stride=8, ma=3,
          sa=0, pop_prev=1, push_next=1)
    a.store(dram_addr=y, spad_addr=64, run=32, dtype=DType.I16, pop_prev=1)
    a.matmul(**{**MM, "k": 0})                                                        # pc 3
    a.end()
    prog = a.link()
    res = _sim(prog, {"x": X})
    _expect(res, ErrorCode.BAD_FIELD, 3, "k = 0")
    assert np.array_equal(prog.read_tensor(res.dram, "y"), 3 * X)
    assert res.counters["macs"] == 0


# -- dependency tokens ---------------------------------------------------------------------------

def test_pop_without_push_deadlocks():
    a = Assembler(TINY)
    a.tensor("x", "input", (16,), "i16")
    a.load(dram_addr=a_x(), spad_addr=0, run=8, dtype=DType.I16)          # no push
    a.vec(op=VecOp.COPY, m=1, n=8, a_addr=0, a_stride=8, out_addr=64, out_stride=8, ma=1,
          sa=0, pop_prev=1)
    a.end()
    prog = a.link()
    res = _sim(prog)
    _expect(res, ErrorCode.DEADLOCK, 1, "deadlock", "VEC pops", "never pushed")
    assert res.counters["instructions"] == 0       # detected before anything runs


def test_pop_next_without_push_deadlocks():
    a = Assembler(TINY)
    a.tensor("x", "input", (16,), "i16")
    a.load(dram_addr=a_x(), spad_addr=0, run=8, dtype=DType.I16, pop_next=1)
    a.end()
    res = _sim(a.link())
    _expect(res, ErrorCode.DEADLOCK, 0, "LOAD pops", "never pushed")


def test_unconsumed_token_at_end_deadlocks():
    a = Assembler(TINY)
    a.tensor("x", "input", (16,), "i16")
    a.load(dram_addr=a_x(), spad_addr=0, run=8, dtype=DType.I16, push_next=1)
    a.vec(op=VecOp.COPY, m=1, n=8, a_addr=0, a_stride=8, out_addr=64, out_stride=8, ma=1,
          sa=0, push_next=1)                                                   # never popped
    a.end()
    prog = a.link()
    res = _sim(prog)
    _expect(res, ErrorCode.DEADLOCK, prog.n_instr - 1, "unconsumed", "LOAD->COMPUTE",
            "COMPUTE->STORE")


@pytest.mark.parametrize("op,hdr,words", [
    ("load", "pop_prev", ["LOAD", "previous"]),
    ("load", "push_prev", ["LOAD", "previous"]),
    ("store", "push_next", ["STORE", "next"]),
    ("store", "pop_next", ["STORE", "next"]),
])
def test_token_towards_a_missing_module_is_bad_field(op, hdr, words):
    a = Assembler(TINY)
    a.tensor("x", "input", (16,), "i16")
    a.vec(op=VecOp.COPY, m=1, n=8, a_addr=0, a_stride=8, out_addr=64, out_stride=8, ma=1, sa=0)
    getattr(a, op)(dram_addr=a_x(), spad_addr=0, run=8, dtype=DType.I16, **{hdr: 1})
    a.end()
    res = _sim(a.link())
    _expect(res, ErrorCode.BAD_FIELD, 1, *words)


def _token_prog(config, seq):
    """Program from a list of 'L', 'C', 'S' items with header flags, e.g. ('L', 'push_next')."""
    a = Assembler(config)
    x = a.tensor("x", "input", (64,), "i16")
    y = a.tensor("y", "output", (64,), "i16")
    for i, (u, *flags) in enumerate(seq):
        h = {f: 1 for f in flags}
        if u == "L":
            a.load(dram_addr=x + 2 * (i % 8), spad_addr=i % 8, run=1, dtype=DType.I16, **h)
        elif u == "C":
            a.vec(op=VecOp.ADD, m=1, n=8, a_addr=0, a_stride=8, b_addr=16 + 8 * (i % 4),
                  b_stride=8, out_addr=16 + 8 * ((i + 1) % 4), out_stride=8, ma=1, sa=0,
                  mb=1, sb=0, **h)
        else:
            a.store(dram_addr=y + 16 * (i % 4), spad_addr=16 + 8 * (i % 4), run=8,
                    dtype=DType.I16, **h)
    a.end()
    return a.link()


def _n_pushes_then_pops(n):
    return [("L", "push_next")] * n + [("C", "pop_prev")] * n


def test_more_pushes_than_token_depth_drain():
    n = TINY.token_depth + 4
    prog = _token_prog(TINY, _n_pushes_then_pops(n))
    res = _sim(prog, {"x": np.arange(64)})
    assert res.ok, res.message
    assert res.counters["instructions"] == 2 * n + 1


def test_pushes_ahead_of_pops_limited_by_token_and_command_depth():
    # n pushes, then n pops. token_depth pushes complete at once; the other pushes wait in the
    # LOAD queue (cmd_depth). Fetch reaches the first pop, and the consumer drains the tokens,
    # as long as n - token_depth <= cmd_depth; one more push and fetch stalls behind it forever.
    small = TINY.replace(token_depth=2, cmd_depth=4)
    for n in (3, 6):
        res = _sim(_token_prog(small, _n_pushes_then_pops(n)), {"x": np.arange(64)})
        assert res.ok, (n, res.message)
    res = _sim(_token_prog(small, _n_pushes_then_pops(7)), {"x": np.arange(64)})
    _expect(res, ErrorCode.DEADLOCK, 2, "LOAD@2", "fetch blocked")


def test_full_token_queue_with_consumer_behind_blocked_fetch_deadlocks():
    # L0..L2 push to COMPUTE; with token_depth = 1 L1's push waits for C5's pop. With
    # cmd_depth = 2 the LOAD queue holds L1, L2, fetch stalls at L3 and never reaches C5.
    seq = [("L", "push_next")] * 3 + [("L",)] * 2 + [("C", "pop_prev")] * 3
    for cfg, ok in [(TINY.replace(cmd_depth=2, token_depth=1), False),
                    (TINY.replace(token_depth=1), True),
                    (TINY.replace(cmd_depth=2), True)]:
        prog = _token_prog(cfg, seq)
        res = _sim(prog, {"x": np.arange(64)})
        if ok:
            assert res.ok, (cfg.cmd_depth, cfg.token_depth, res.message)
        else:
            _expect(res, ErrorCode.DEADLOCK, 1, "deadlock", "LOAD@1", "fetch blocked")
            assert res.counters["instructions"] == 0


def test_pop_before_its_push_in_program_order_is_rejected():
    # C0 waits for a LOAD token whose LOAD comes after it in program order. The hardware would
    # run the LOAD first (or deadlock on a blocked fetch), the simulator in program order would
    # not: the meaning would depend on the schedule, so the program is rejected (BAD_FIELD).
    seq = [("C", "pop_prev"), ("C",), ("C",), ("L", "push_next")]
    for depth in (2, 16):
        prog = _token_prog(TINY.replace(cmd_depth=depth), seq)
        res = _sim(prog, {"x": np.arange(64)})
        _expect(res, ErrorCode.BAD_FIELD, 0, "no earlier instruction")


def test_check_tokens_direct():
    z = dict(pop_prev=0, pop_next=0, push_prev=0, push_next=0, pred_en=0, pred_q=0)
    instrs = [(Opcode.LOAD, {**z, "push_next": 1}), (Opcode.MATMUL, {**z, "pop_prev": 1}),
              (Opcode.END, dict(z))]
    check_tokens(instrs, TINY)          # balanced: returns None
    from vitamin.golden.isasim import Fault
    with pytest.raises(Fault) as e:
        check_tokens(instrs[1:], TINY)
    assert e.value.code == ErrorCode.DEADLOCK and e.value.pc == 0


# -- robustness: bounded random programs never raise ---------------------------------------------

def test_random_small_programs_never_raise():
    rng = np.random.default_rng(1234)
    counts = {"run", "n0", "n1", "n2", "m", "k", "n", "group", "n_spans", "diag_n", "sink",
              "block", "n_chunks"}
    ops = [Opcode.LOAD, Opcode.STORE, Opcode.MATMUL, Opcode.SOFTMAX, Opcode.LAYERNORM,
           Opcode.TOPK, Opcode.ROUTE, Opcode.SPANS, Opcode.VEC, Opcode.MARK, Opcode.SELECT]
    from amaranth.lib import enum as aenum
    seen = set()
    for _ in range(250):
        words = []
        for _ in range(int(rng.integers(1, 5))):
            op = ops[int(rng.integers(len(ops)))]
            f = {}
            for name, fl in data.Layout.cast(isa.FORMATS[op]):
                if name == "hdr":
                    continue
                sh = fl.shape
                if isinstance(sh, type) and issubclass(sh, aenum.Enum):
                    f[name] = list(sh)[int(rng.integers(len(list(sh))))]
                    continue
                signed = name in isa.SIGNED_FIELDS
                w = fl.width - 1 if signed else fl.width
                if name in counts:
                    v = int(rng.integers(1, 9))
                elif rng.random() < 0.6:
                    v = int(rng.integers(0, min(1 << w, 64)))
                else:
                    v = int(rng.integers(0, 1 << w))
                if signed and rng.random() < 0.2:
                    v = -v
                f[name] = v
            if op in (Opcode.LOAD, Opcode.STORE):
                spad_dt = [DType.I8, DType.I16, DType.U8][int(rng.integers(3))]
                f["dtype"] = DType.I32 if f["mem"] == Mem.IDX else spad_dt
                f["dram_addr"] = int(rng.integers(0, 1 << 14))
            words.append(isa.encode(op, **f))
        code = b"".join(words) + isa.encode(Opcode.END)
        img = np.zeros(1 << 15, np.uint8)
        img[:len(code)] = np.frombuffer(code, np.uint8)
        res = simulate(TINY, img, len(words) + 1, regs={int(rng.integers(1, 16)):
                                                       int(rng.integers(0, 40))}, check=False)
        assert isinstance(res, RunResult)
        assert (res.status == ErrorCode.OK) == (res.error_pc == -1)
        seen.add(res.status)
    assert ErrorCode.OK in seen and len(seen) >= 4
