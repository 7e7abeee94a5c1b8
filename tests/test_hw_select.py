"""SelectUnit (hw/select.py) against the golden model's ``Machine.op_select``.

One simulation per test runs a sequence of SELECT instructions on a harness (the unit, a
scratchpad, an index memory, a register file). Before each instruction the index memory, the
score region of the scratchpad and the registers are loaded with the same contents in the
simulator and in a fresh golden ``Machine``; afterwards the error code, the whole index memory
and the registers must be equal (a faulting instruction must leave them unchanged), and the
cycles from ``start`` to ``done`` of every instruction that does not fault must be those of
:func:`vitamin.hw.select.select_cycles`.
"""

import numpy as np
import pytest
from amaranth.hdl import ClockDomain, Module, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In
from hwutil import run_sim

from vitamin import isa
from vitamin.config import PRESETS
from vitamin.golden.isasim import Fault, Machine
from vitamin.hw.mem import IdxMemory, Scratchpad
from vitamin.hw.ports import N_REGS, UnitControl
from vitamin.hw.select import SelectUnit, select_cycles
from vitamin.isa import ErrorCode, Opcode

TINY = PRESETS["tiny"]
# 16 scratchpad lanes (ZCU102's row units) with small memories for speed.
WIDE = PRESETS["zcu102"].replace(name="zcu102-small", idx_entries=256, spad_words=1 << 14)

I32_MIN, I32_MAX = -(1 << 31), (1 << 31) - 1


def _wrap32(v):
    v = np.asarray(v, dtype=np.int64)
    return ((v + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)


class _Harness(wiring.Component):
    def __init__(self, config):
        self.cfg = config
        self.unit = SelectUnit(config)
        self.idxmem = IdxMemory(config)
        self.spadmem = Scratchpad(config)
        self.regfile = Signal(data.ArrayLayout(signed(32), N_REGS))
        self.cd_sync = ClockDomain("sync")
        super().__init__({"ctl": In(UnitControl())})

    def elaborate(self, platform):
        m = Module()
        m.domains.sync = self.cd_sync
        m.submodules.unit = u = self.unit
        m.submodules.idxmem = self.idxmem
        m.submodules.spadmem = self.spadmem
        wiring.connect(m, wiring.flipped(self.ctl), u.ctl)
        wiring.connect(m, u.idx, self.idxmem.port)
        wiring.connect(m, u.spad, self.spadmem.port)
        m.d.comb += u.regs.regs.eq(self.regfile)
        with m.If(u.regs.wr_en & (u.regs.wr_addr != 0)):
            m.d.sync += self.regfile[u.regs.wr_addr].eq(u.regs.wr_data)
        return m


class _Case:
    def __init__(self, fields, idx, spad_at, regs, note=""):
        self.fields = fields
        self.word = isa.encode(Opcode.SELECT, **fields)
        self.idx = np.asarray(idx, dtype=np.int64)
        self.spad_at = spad_at            # (address, words) of the scores
        self.regs = np.asarray(regs, dtype=np.int64)
        self.note = note


def _golden(cfg, case, spad):
    mach = Machine(cfg, dram=np.zeros(4096, np.uint8))
    mach.idx[:] = case.idx
    mach.spad[:] = spad
    mach.regs[:] = case.regs
    _, f = isa.decode(case.word)
    try:
        mach.op_select(f)
        code = ErrorCode.OK
    except Fault as e:
        code = e.code
    return code, mach, f


def _run(cfg, cases):
    """Run ``cases`` in one simulation; returns [(error code, cycles)]."""
    h = _Harness(cfg)
    n_ent = cfg.idx_entries
    out = []

    async def tb(ctx):
        rows = [h.idxmem.mem.data[i].as_value() for i in range(n_ent)]
        seen = [h.idxmem.word(i).as_value() for i in range(n_ent)]   # + a write under way
        idx_now = np.zeros((n_ent, 2), np.int64)
        spad = np.zeros(cfg.spad_words, np.int64)
        for ci, case in enumerate(cases):
            if ctx.get(h.idxmem.write_pending):   # the last write lands before the preset
                await ctx.tick()
            for i in np.nonzero((case.idx != idx_now).any(axis=1))[0]:
                a, b = (int(v) & 0xFFFFFFFF for v in case.idx[i])
                ctx.set(rows[i], b << 32 | a)
            idx_now = case.idx.copy()
            addr, words = case.spad_at
            for j, v in enumerate(words[:max(0, cfg.spad_words - addr)]):
                e = addr + j
                if spad[e] != v:
                    ctx.set(h.spadmem.word(e), int(v))
                    spad[e] = v
            ctx.set(h.regfile, [int(v) for v in case.regs])
            ctx.set(h.ctl.instr, int.from_bytes(case.word, "little"))
            ctx.set(h.ctl.start, 1)
            await ctx.tick()
            ctx.set(h.ctl.start, 0)
            n = 1
            while not ctx.get(h.ctl.done):
                assert n < 20000, (ci, case.note, "no done")
                assert ctx.get(h.ctl.busy), (ci, case.note, "busy low before done")
                await ctx.tick()
                n += 1
            assert not ctx.get(h.ctl.busy)
            code = ErrorCode(ctx.get(h.ctl.error))
            raw = np.array([ctx.get(r) for r in seen], dtype=np.uint64)
            got = _wrap32(np.stack([raw & 0xFFFFFFFF, raw >> 32], axis=1).astype(np.int64))
            idx_now = got
            regs = np.array([ctx.get(h.regfile[i]) for i in range(N_REGS)], dtype=np.int64)
            gcode, mach, f = _golden(cfg, case, spad)
            ctxt = (ci, case.note, case.fields)
            assert code == gcode, (code, gcode, ctxt)
            np.testing.assert_array_equal(got, _wrap32(mach.idx), err_msg=str(ctxt))
            np.testing.assert_array_equal(regs, _wrap32(mach.regs), err_msg=str(ctxt))
            if gcode == ErrorCode.OK:
                cnt = int(case.regs[f["count_reg"]]) if f["count_reg"] else f["n_chunks"]
                starts = case.idx[f["chunk_addr"]:f["chunk_addr"] + cnt, 0]
                scores = spad[f["in_addr"]:f["in_addr"] + f["limit"]]
                want = select_cycles(cfg, f, starts, scores)
                assert n == want, (n, want, ctxt)
            else:
                np.testing.assert_array_equal(got, case.idx, err_msg=str(ctxt))
            out.append((code, n))

    run_sim(h, tb)
    return out


def _state(cfg, rng):
    idx = rng.integers(I32_MIN, I32_MAX + 1, size=(cfg.idx_entries, 2))
    regs = rng.integers(I32_MIN, I32_MAX + 1, size=N_REGS)
    regs[0] = 0
    return idx, regs


def _case(cfg, rng, *, starts=None, scores=None, note="", **over):
    """A SELECT with random fields (overridden by ``over``) and random data."""
    n_ent = cfg.idx_entries
    idx, regs = _state(cfg, rng)
    seq = over.pop("seq", None) or int(rng.choice([8, 40, 120, 300]))
    limit = over.get("limit", int(rng.integers(0, seq + 1)) if rng.random() < 0.7 else seq)
    if starts is None:
        n = int(rng.integers(0, min(seq, 24) + 1))
        starts = sorted(rng.choice(seq + 2, size=n, replace=False).tolist())
        if n and rng.random() < 0.6:
            starts[0] = 0
    cnt = len(starts)
    if scores is None:
        kind = rng.choice(["small", "wide", "ties", "extreme"])
        if kind == "ties":
            scores = rng.choice([-4, 0, 4], size=limit)
        elif kind == "extreme":
            scores = rng.choice([-32768, 32767], size=limit)
        else:
            hi = 32768 if kind == "wide" else 50
            scores = rng.integers(-hi, hi, size=limit)
    scores = np.asarray(scores, dtype=np.int64)
    in_addr = over.pop("in_addr") if "in_addr" in over else \
        int(rng.integers(0, cfg.spad_words - max(limit, 1) + 1))
    ca = over.pop("chunk_addr") if "chunk_addr" in over else int(rng.integers(0, n_ent - cnt + 1))
    place = rng.choice(["anywhere", "over list", "near end"])
    oa = {"anywhere": int(rng.integers(0, max(1, n_ent - cnt - 1))), "over list": ca,
          "near end": n_ent - int(rng.integers(0, cnt + 3))}[place]
    f = dict(n_chunks=cnt, count_reg=0, chunk_addr=ca, seq=seq, limit=limit, in_addr=in_addr,
             sink=int(rng.choice([0, 0, 1, 3, rng.integers(0, seq + 2)])),
             recent=int(rng.choice([0, 0, 2, 7, rng.integers(0, seq + 2)])),
             budget=int(rng.choice([1, 5, 32, rng.integers(1, seq + 10), (1 << 32) - 1])),
             out_addr=oa, dst_reg=int(rng.integers(0, N_REGS)),
             rows_reg=int(rng.integers(0, N_REGS)))
    if rng.random() < 0.3:
        r = int(rng.integers(1, N_REGS))
        regs[r] = cnt
        f["count_reg"] = r
        f["n_chunks"] = int(rng.integers(0, 1 << 16))
    f.update(over)
    if ca + cnt <= n_ent:
        idx[ca:ca + cnt, 0] = starts
    return _Case(f, idx, (in_addr, scores), regs, note=note or f"out {place}")


@pytest.mark.parametrize("cfg", [TINY, WIDE], ids=lambda c: c.name)
def test_select_random(cfg):
    rng = np.random.default_rng(21)
    cases = [_case(cfg, rng) for _ in range(40)]
    res = _run(cfg, cases)
    assert sum(code == ErrorCode.OK for code, _ in res) >= 25


def test_select_edges_and_faults():
    cfg = TINY
    n_ent = cfg.idx_entries
    rng = np.random.default_rng(8)
    s16 = np.arange(16) * 5 - 30

    def c(note, **kw):
        kw.setdefault("starts", [0, 4, 8, 12])
        kw.setdefault("scores", s16[:kw.get("limit", 16)])
        kw.setdefault("seq", 16)
        kw.setdefault("limit", 16)
        return _case(cfg, rng, note=note, **kw)

    cases = [
        c("ok", budget=6, sink=1, recent=2),
        c("budget 0", budget=0),
        c("limit > seq", limit=17, scores=s16),
        c("limit 2^31", limit=1 << 31, seq=(1 << 32) - 1, scores=s16, budget=3, in_addr=0),
        c("chunk list beyond memory", chunk_addr=n_ent - 3),
        c("empty list at the end", starts=[], chunk_addr=n_ent, sink=2, budget=3, out_addr=0),
        c("score region beyond scratchpad", in_addr=cfg.spad_words - 15),
        c("score region check before the starts", starts=[3, 3],
          in_addr=cfg.spad_words - 15),
        c("equal starts", starts=[0, 4, 4, 12]),
        c("descending starts beyond limit", starts=[0, 4, 20, 18], limit=6, scores=s16[:6]),
        c("negative first start", starts=[-1, 4]),
        c("start min int", starts=[I32_MIN]),
        c("output does not fit", budget=9, out_addr=n_ent - 1),
        c("output fits exactly", budget=9, out_addr=n_ent - 2),
        c("nothing selected at the end", limit=0, scores=s16[:0], out_addr=n_ent),
        c("limit 0 with a bad score address", limit=0, scores=s16[:0],
          in_addr=(1 << 22) - 1),
        c("sink and recent overlap", sink=10, recent=10, budget=3),
        c("F over budget", sink=3, recent=4, budget=2),
        c("budget 2^32 - 1", budget=(1 << 32) - 1, sink=1),
        c("ties", scores=np.zeros(16, np.int64), budget=5),
        c("one token chunks", starts=list(range(16)), budget=7, recent=1),
        c("first start after 0", starts=[5, 9], budget=100, sink=2),
        c("same register", budget=5, dst_reg=4, rows_reg=4),
        c("no registers", budget=5, dst_reg=0, rows_reg=0),
        c("long chunks", starts=[0, 100, 101, 250], seq=400, limit=390, budget=200,
          scores=rng.integers(-32768, 32768, size=390)),
        c("extreme sums", starts=[0, 300], seq=390, limit=390, budget=310,
          scores=np.full(390, -32768)),
    ]
    neg = c("negative count register", count_reg=2)
    neg.regs[2] = -1
    big = c("huge count register", count_reg=3)
    big.regs[3] = I32_MAX
    whole = _case(cfg, rng, starts=list(range(0, 2 * n_ent, 2)), seq=2 * n_ent + 1,
                  limit=2 * n_ent - 5, budget=60, chunk_addr=0, out_addr=0, sink=1, recent=1,
                  note="the whole index memory is the chunk list")
    cases += [neg, big, whole]
    res = _run(cfg, cases)
    codes = [code for code, _ in res]
    want = [ErrorCode.OK, ErrorCode.BAD_FIELD, ErrorCode.BAD_FIELD, ErrorCode.BAD_FIELD,
            ErrorCode.IDX_RANGE, ErrorCode.OK, ErrorCode.SPAD_RANGE, ErrorCode.SPAD_RANGE,
            ErrorCode.BAD_FIELD, ErrorCode.BAD_FIELD, ErrorCode.BAD_FIELD, ErrorCode.BAD_FIELD,
            ErrorCode.IDX_RANGE, ErrorCode.OK, ErrorCode.OK, ErrorCode.OK]
    assert codes[:len(want)] == want
    assert codes[-3:] == [ErrorCode.BAD_FIELD, ErrorCode.IDX_RANGE, ErrorCode.OK]


def test_select_raw_fields():
    """Fields drawn over their whole encodings (mostly small), index memory sorted or not:
    every check and every path must agree with golden."""
    cfg = TINY
    rng = np.random.default_rng(4)
    layout = [(name, fl.width) for name, fl in data.Layout.cast(isa.Select) if name != "hdr"]
    cases = []
    for _ in range(40):
        idx, regs = _state(cfg, rng)
        regs[int(rng.integers(1, N_REGS))] = int(rng.integers(-3, 40))
        if rng.random() < 0.7:      # ascending (negative at the start, sometimes)
            idx[:, 0] = np.sort(rng.choice(np.arange(-2, 4000), size=cfg.idx_entries,
                                           replace=False))
        else:
            idx[:, 0] = rng.integers(-5, 100, size=cfg.idx_entries)
        f = {name: int(rng.integers(0, min(1 << w, 300))) if rng.random() < 0.85 else
             int(rng.integers(0, 1 << w)) for name, w in layout}
        if rng.random() < 0.7:
            f["n_chunks"] = int(rng.integers(0, 40))
            f["chunk_addr"] = int(rng.integers(0, cfg.idx_entries - f["n_chunks"] + 1))
        if rng.random() < 0.8:
            f["seq"] = max(f["seq"], f["limit"])
        if rng.random() < 0.6:
            f["count_reg"] = 0
        n = max(0, min(f["limit"], cfg.spad_words - f["in_addr"], 400))
        cases.append(_Case(f, idx, (f["in_addr"], rng.integers(-32768, 32768, size=n)), regs,
                           note="raw"))
    res = _run(cfg, cases)
    assert len({code for code, _ in res}) >= 3
