"""ROUTE and SPANS units against the golden model's ``Machine.op_route`` / ``op_spans``.

Each test runs one simulation of a harness (the unit, an ``IdxMemory``, a register file and the
expert queue registers) through a sequence of instructions. Before each instruction the index
memory, the registers and the queue registers are loaded with the same contents in the simulator
and in a fresh golden ``Machine``; afterwards the error code, the whole index memory, the registers
and the queue registers must be equal (index words and registers modulo 2^32: the hardware keeps
32-bit words). Faulting instructions must leave all of them unchanged.
"""

import random

import numpy as np
import pytest
from amaranth.hdl import ClockDomain, Module, Signal, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In
from hwutil import run_sim

from vitamin import isa
from vitamin.config import PRESETS
from vitamin.golden.isasim import Fault, Machine
from vitamin.hw.idxops import RouteUnit, SpansUnit
from vitamin.hw.mem import IdxMemory
from vitamin.hw.ports import N_REGS, UnitControl
from vitamin.isa import ErrorCode, Opcode

TINY = PRESETS["tiny"]
# ZCU102's unit parameters (64 experts, max_dim 8192) with a smaller index memory for speed.
ZCU = PRESETS["zcu102"].replace(name="zcu102-small-idx", idx_entries=2048)
# The extremes of the Config ranges: 256 experts, top-64.
WIDE = TINY.replace(name="wide", max_experts=256, max_topk=64, idx_entries=1024)

I32_MIN, I32_MAX = -(1 << 31), (1 << 31) - 1


def _wrap32(v):
    v = np.asarray(v, dtype=np.int64)
    return ((v + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)


class _Harness(wiring.Component):
    """A unit with its index memory, a register file (REG[0] = 0) and queue registers."""

    def __init__(self, config, unit):
        self.cfg = config
        self.unit = unit
        self.idxmem = IdxMemory(config)
        self.regfile = Signal(data.ArrayLayout(signed(32), N_REGS))
        aw = max(1, (config.idx_entries - 1).bit_length()) + 1
        self.qregs = Signal(data.ArrayLayout(
            data.StructLayout({"off": unsigned(aw), "len": unsigned(aw)}), config.max_experts))
        self.cd_sync = ClockDomain("sync")
        super().__init__({"ctl": In(UnitControl())})

    def elaborate(self, platform):
        m = Module()
        m.domains.sync = self.cd_sync
        m.submodules.unit = u = self.unit
        m.submodules.idxmem = self.idxmem
        wiring.connect(m, wiring.flipped(self.ctl), u.ctl)
        wiring.connect(m, u.idx, self.idxmem.port)
        members = u.signature.members
        if "regs" in members:
            m.d.comb += u.regs.regs.eq(self.regfile)
            with m.If(u.regs.wr_en & (u.regs.wr_addr != 0)):
                m.d.sync += self.regfile[u.regs.wr_addr].eq(u.regs.wr_data)
        if "queues" in members:
            q = u.queues
            m.d.comb += q.q.eq(self.qregs)
            with m.If(q.wr_en):
                m.d.sync += [self.qregs[q.wr_addr].off.eq(q.wr_off),
                             self.qregs[q.wr_addr].len.eq(q.wr_len)]
        return m


class _Case:
    """One instruction with its initial state."""

    def __init__(self, opcode, fields, idx, regs, qoff, qlen, *, expect=None, note="",
                 reset_after=None):
        self.opcode = opcode
        self.fields = fields
        self.word = isa.encode(opcode, **fields)
        self.idx = np.asarray(idx, dtype=np.int64)
        self.regs = np.asarray(regs, dtype=np.int64)
        self.qoff = np.asarray(qoff, dtype=np.int64)
        self.qlen = np.asarray(qlen, dtype=np.int64)
        self.expect = expect     # an ErrorCode the hardware alone must report (golden: no check)
        self.note = note
        self.reset_after = reset_after   # reset the harness this many cycles after start


def _golden(cfg, case):
    mach = Machine(cfg, dram=np.zeros(4096, np.uint8))
    mach.idx[:] = case.idx
    mach.regs[:] = case.regs
    mach.qoff[:] = case.qoff
    mach.qlen[:] = case.qlen
    op, fields = isa.decode(case.word)
    assert op == case.opcode
    try:
        getattr(mach, "op_" + op.name.lower())(fields)
        code = ErrorCode.OK
    except Fault as e:
        code = e.code
    return code, mach


def _run(cfg, unit, cases, max_cycles, *, extra_starts=None):
    """Run ``cases`` on one simulation; returns the measured cycles of each case.

    ``max_cycles(case)`` bounds each instruction, so that a hung unit fails quickly.
    """
    h = _Harness(cfg, unit)
    cycles = []
    n_ent = cfg.idx_entries
    state = {"idx": np.zeros((n_ent, 2), np.int64)}   # what the simulated memory holds

    async def tb(ctx):
        # Raw 64-bit rows (b << 32 | a): struct views cost the simulator much more per access.
        rows = [h.idxmem.mem.data[i].as_value() for i in range(n_ent)]
        seen = [h.idxmem.word(i).as_value() for i in range(n_ent)]   # + a write under way
        for ci, case in enumerate(cases):
            if ctx.get(h.idxmem.write_pending):   # the last write lands before the preset
                await ctx.tick()
            for i in np.nonzero((case.idx != state["idx"]).any(axis=1))[0]:
                a, b = (int(v) & 0xFFFFFFFF for v in case.idx[i])
                ctx.set(rows[i], b << 32 | a)
            state["idx"] = case.idx.copy()
            ctx.set(h.regfile, [int(v) for v in case.regs])
            ctx.set(h.qregs, [{"off": int(o), "len": int(n)}
                              for o, n in zip(case.qoff, case.qlen, strict=True)])
            ctx.set(h.ctl.instr, int.from_bytes(case.word, "little"))
            ctx.set(h.ctl.start, 1)
            await ctx.tick()
            ctx.set(h.ctl.start, 0)
            n = 1
            # After a reset RouteUnit first clears its counts (max_experts cycles).
            after_reset = ci == 0 or cases[ci - 1].reset_after is not None
            bound = max_cycles(case) + (cfg.max_experts if after_reset else 0)
            while not ctx.get(h.ctl.done):
                assert n <= bound, (ci, case.note, case.fields, f"no done after {n} cycles")
                if n == case.reset_after:
                    break
                assert ctx.get(h.ctl.busy), (ci, case.note, "busy low before done")
                if extra_starts is not None and extra_starts.random() < 0.05:
                    # A start while busy is ignored (the controller never does it).
                    ctx.set(h.ctl.instr, extra_starts.getrandbits(isa.INSTR_BITS))
                    ctx.set(h.ctl.start, 1)
                await ctx.tick()
                ctx.set(h.ctl.start, 0)
                n += 1
            if n == case.reset_after:
                # Cut the instruction short; nothing to compare, the next case starts after
                # the reset (the unit must not depend on what the cut instruction left).
                ctx.set(h.cd_sync.rst, 1)
                await ctx.tick()
                ctx.set(h.cd_sync.rst, 0)
                state["idx"] = _wrap32(np.array([[ctx.get(r) & 0xFFFFFFFF, ctx.get(r) >> 32]
                                                 for r in rows], dtype=np.int64))
                cycles.append(None)
                continue
            assert not ctx.get(h.ctl.busy)
            cycles.append(n)
            code = ctx.get(h.ctl.error)
            raw = np.array([ctx.get(r) for r in seen], dtype=np.uint64)
            got = _wrap32(np.stack([raw & 0xFFFFFFFF, raw >> 32], axis=1).astype(np.int64))
            state["idx"] = got
            regs = np.array([ctx.get(h.regfile[i]) for i in range(N_REGS)], dtype=np.int64)
            qoff = np.array([ctx.get(h.qregs[i].off) for i in range(cfg.max_experts)])
            qlen = np.array([ctx.get(h.qregs[i].len) for i in range(cfg.max_experts)])

            gcode, mach = _golden(cfg, case)
            ctxt = (ci, case.note, case.fields)
            if case.expect is not None:
                # The queue/input overlap fault: golden and hardware agree, state untouched.
                assert gcode == case.expect, ctxt
                assert code == case.expect, (code, ctxt)
                np.testing.assert_array_equal(got, case.idx, err_msg=str(ctxt))
                np.testing.assert_array_equal(regs, case.regs, err_msg=str(ctxt))
                np.testing.assert_array_equal(qoff, case.qoff, err_msg=str(ctxt))
                np.testing.assert_array_equal(qlen, case.qlen, err_msg=str(ctxt))
                continue
            assert code == gcode, (code, gcode, ctxt)
            if gcode != ErrorCode.OK:
                # The golden model checks before it writes; so must the hardware.
                np.testing.assert_array_equal(mach.idx, case.idx, err_msg=str(ctxt))
            np.testing.assert_array_equal(got, _wrap32(mach.idx), err_msg=str(ctxt))
            np.testing.assert_array_equal(regs, _wrap32(mach.regs), err_msg=str(ctxt))
            np.testing.assert_array_equal(qoff, mach.qoff, err_msg=str(ctxt))
            np.testing.assert_array_equal(qlen, mach.qlen, err_msg=str(ctxt))

    run_sim(h, tb)
    return cycles


def _initial_state(cfg, rng):
    """Random index memory, registers and queue registers (the unit must not depend on them)."""
    n_ent = cfg.idx_entries
    idx = rng.integers(I32_MIN, I32_MAX + 1, size=(n_ent, 2))
    regs = rng.integers(I32_MIN, I32_MAX + 1, size=N_REGS)
    regs[0] = 0
    qoff = rng.integers(0, n_ent, size=cfg.max_experts)
    qlen = rng.integers(0, n_ent, size=cfg.max_experts)
    return idx, regs, qoff, qlen


# -- ROUTE ---------------------------------------------------------------------------------------

def _experts(rng, kind, m, k, ne):
    """[m, k] routing experts of one of several shapes."""
    if kind == "topk":       # distinct experts per token (TOPK output), sometimes missing ones
        e = np.array([rng.permutation(ne)[:k] if k <= ne else
                      np.concatenate([rng.permutation(ne), -np.ones(k - ne, int)])
                      for _ in range(m)]).reshape(m, k)
        miss = rng.random((m, k)) < 0.1
        return np.where(miss, -1, e)
    if kind == "uniform":    # duplicates allowed
        return rng.integers(-1, ne, size=(m, k))
    if kind == "one":        # every token to one expert
        return np.full((m, k), rng.integers(0, ne))
    if kind == "few":        # most experts empty
        pick = rng.choice(ne, size=min(ne, 2), replace=False)
        return rng.choice(np.concatenate([pick, [-1]]), size=(m, k))
    if kind == "none":       # all entries missing: every queue empty
        return np.full((m, k), -1)
    raise ValueError(kind)


def _route_case(cfg, rng, *, m=None, k=None, ne=None, kind=None, layout=None):
    n_ent = cfg.idx_entries
    idx, regs, qoff, qlen = _initial_state(cfg, rng)
    ne = ne or int(rng.integers(1, cfg.max_experts + 1))
    k = k or int(rng.integers(1, cfg.max_topk + 1))
    if m is None:
        m = int(rng.integers(1, max(1, min(cfg.max_dim, (n_ent - ne) // (2 * k), 40)) + 1))
    mk = m * k
    kind = kind or rng.choice(["topk", "uniform", "one", "few", "none"], p=[.4, .3, .1, .1, .1])
    ex = _experts(rng, kind, m, k, ne)
    layout = layout or rng.choice(["apart", "qtab_in_queue", "qtab_in_input", "packed"])
    # Regions: input [ia, ia + mk), queues [qa, qa + mk) at most, table [ta, ta + ne).
    if layout == "packed":          # input, queues, table back to back from a random base
        ia = int(rng.integers(0, n_ent - 2 * mk - ne + 1))
        order = rng.permutation(3)
        sizes = [mk, mk, ne]
        starts = np.concatenate([[0], np.cumsum([sizes[i] for i in order])])[:3]
        pos = {int(order[j]): ia + int(starts[j]) for j in range(3)}
        ia, qa, ta = pos[0], pos[1], pos[2]
    else:
        ia = int(rng.integers(0, n_ent - 2 * mk + 1))
        qa = int(rng.integers(ia + mk, n_ent - mk + 1))
        if rng.random() < 0.5:      # queues before the input
            qa, ia = ia, qa
        if layout == "qtab_in_queue":
            ta = int(rng.integers(qa, qa + max(1, mk) + 1))
        elif layout == "qtab_in_input":
            ta = int(rng.integers(ia, ia + mk + 1))
        else:
            ta = int(rng.integers(0, n_ent + 1))
        ta = min(ta, n_ent - ne)
    idx[ia:ia + mk, 0] = ex.reshape(-1)
    idx[ia:ia + mk, 1] = rng.integers(I32_MIN, I32_MAX + 1, size=mk)
    f = dict(k=k, n_experts=ne, m=m, idx_addr=ia, q_addr=qa, qtab_addr=ta)
    return _Case(Opcode.ROUTE, f, idx, regs, qoff, qlen, note=f"{kind}/{layout}")


def _route_error_cases(cfg, rng):
    n_ent = cfg.idx_entries
    cases = []

    def case(note, *, expect=None, patch=None, **over):
        c = _route_case(cfg, rng, m=over.pop("mm", None), k=over.pop("kk", None),
                        ne=over.pop("nn", None), kind=over.pop("kind", None),
                        layout="apart")
        f = dict(c.fields, **over)
        if patch:
            patch(c.idx, f)
        cases.append(_Case(Opcode.ROUTE, f, c.idx, c.regs, c.qoff, c.qlen, expect=expect,
                           note=note))

    case("m = 0", m=0)
    case("m > max_dim", m=cfg.max_dim + 1)
    case("m = max_dim, input beyond memory", m=cfg.max_dim)
    case("k = 0", k=0)
    case("k > max_topk", k=cfg.max_topk + 1)
    case("n_experts = 0", n_experts=0)
    case("n_experts > max_experts", n_experts=cfg.max_experts + 1)
    case("input beyond memory", mm=4, kk=2, idx_addr=n_ent - 7)

    def bad_expert(value, last=True):
        def patch(idx, f):
            mk = f["m"] * f["k"]
            v = f["n_experts"] if value is None else value
            idx[f["idx_addr"] + (mk - 1 if last else 0), 0] = v
        return patch

    case("expert = n_experts", kind="uniform", patch=bad_expert(None, last=False))
    case("expert -2", patch=bad_expert(-2))
    case("expert min int", patch=bad_expert(I32_MIN))
    case("expert max int", patch=bad_expert(I32_MAX))
    # low bits below n_experts, a higher bit set (the unit checks the low bits and the rest
    # apart); and the largest good expert beside it
    wide = 1 << cfg.max_experts.bit_length()
    case("expert 2^bits", kind="uniform", patch=bad_expert(wide))
    case("expert 2^30", kind="uniform", patch=bad_expert(1 << 30, last=False))
    case("expert 2^bits + 1", kind="uniform", patch=bad_expert(wide + 1, last=False))

    def move_input_to_0(idx, f):
        """Move the input to entry 0 (with at least one queue entry); returns nq."""
        mk = f["m"] * f["k"]
        ex = idx[f["idx_addr"]:f["idx_addr"] + mk].copy()
        ex[0, 0] = 0
        f["idx_addr"] = 0
        idx[0:mk] = ex
        f["qtab_addr"] = mk
        return int((ex[:, 0] >= 0).sum())

    def queues_at_end(idx, f):
        f["q_addr"] = n_ent - move_input_to_0(idx, f) + 1

    def queues_fit_exactly(idx, f):
        f["q_addr"] = n_ent - move_input_to_0(idx, f)

    case("queue entries beyond memory", kind="uniform", mm=5, kk=2, patch=queues_at_end)
    case("queue entries end at the last entry", kind="uniform", mm=5, kk=2,
         patch=queues_fit_exactly)
    case("no entries: empty queues at idx_entries", kind="none", mm=3, q_addr=n_ent)
    case("no entries: q_addr beyond idx_entries", kind="none", mm=3, q_addr=n_ent + 1)
    case("queue table beyond memory", qtab_addr=n_ent - 1, nn=2)
    case("queue table ends at the last entry", qtab_addr=n_ent - 2, nn=2, kk=1, mm=3)

    def both_bad(idx, f):
        idx[f["idx_addr"], 0] = f["n_experts"] + 3
        f["q_addr"] = n_ent
    case("bad expert before queue range", kind="uniform", patch=both_bad)

    # Queues overlapping the routing input: a fault the golden model does not have yet.
    def overlap(shift):
        def patch(idx, f):
            mk = f["m"] * f["k"]
            ex = idx[f["idx_addr"]:f["idx_addr"] + mk].copy()
            ex[0, 0] = 0                    # at least one queue entry
            f["idx_addr"] = 20
            idx[20:20 + mk] = ex
            nq = int((ex[:, 0] >= 0).sum())
            f["q_addr"] = 20 + shift(mk, nq)
            f["qtab_addr"] = 20 + mk + nq + 1
        return patch
    for name, sh in [("in place", lambda mk, nq: 0),
                     ("queues end in the input", lambda mk, nq: 1 - nq),
                     ("queues start in the input", lambda mk, nq: mk - 1)]:
        case(f"overlap {name}", expect=ErrorCode.BAD_FIELD, mm=6, kk=2, kind="uniform",
             patch=overlap(sh))
    return cases


def _route_bound(unit, cfg):
    """Cycles of a ROUTE that does not fault, the most a faulting one takes too."""
    def bound(case):
        f = case.fields
        return unit.cycles(min(f["m"], cfg.max_dim), min(f["k"], cfg.max_topk),
                           min(f["n_experts"], cfg.max_experts))
    return bound


@pytest.mark.parametrize("cfg", [TINY, ZCU, WIDE], ids=lambda c: c.name)
def test_route_random(cfg):
    rng = np.random.default_rng(7)
    cases = [_route_case(cfg, rng) for _ in range(24)]
    # Edges: k = 1, k = max_topk, one expert, all experts, a single token.
    cases += [_route_case(cfg, rng, k=1), _route_case(cfg, rng, k=cfg.max_topk, m=3),
              _route_case(cfg, rng, ne=1), _route_case(cfg, rng, ne=cfg.max_experts),
              _route_case(cfg, rng, m=1), _route_case(cfg, rng, kind="one", m=30, k=2),
              _route_case(cfg, rng, kind="none"), _route_case(cfg, rng, layout="packed")]
    unit = RouteUnit(cfg)
    cycles = _run(cfg, unit, cases, _route_bound(unit, cfg), extra_starts=random.Random(3))
    for case, n in zip(cases, cycles, strict=True):
        f = case.fields
        expect = unit.cycles(f["m"], f["k"], f["n_experts"])
        if case is cases[0]:    # started while the unit clears its counts after reset
            assert expect < n <= expect + cfg.max_experts, (n, f)
        else:
            assert n == expect, (n, f)


@pytest.mark.parametrize("cfg", [TINY, ZCU], ids=lambda c: c.name)
def test_route_errors(cfg):
    rng = np.random.default_rng(11)
    cases = _route_error_cases(cfg, rng)
    # An OK instruction after the faults: the counters were cleared by the faults.
    cases.append(_route_case(cfg, rng, kind="uniform"))
    unit = RouteUnit(cfg)
    _run(cfg, unit, cases, _route_bound(unit, cfg))


def test_route_reset_during_count():
    # A reset in the middle of COUNT leaves counts in the unit's memory; the next ROUTE (which
    # arrives while the unit clears them) must not see them.
    cfg = TINY
    rng = np.random.default_rng(13)
    cut = _route_case(cfg, rng, m=40, k=2, ne=4, kind="one")
    cut.reset_after = 60
    cases = [_route_case(cfg, rng, m=5, k=1, ne=4), cut,
             _route_case(cfg, rng, m=40, k=2, ne=4, kind="uniform")]
    unit = RouteUnit(cfg)
    _run(cfg, unit, cases, _route_bound(unit, cfg))


def test_route_large_input():
    # The whole index memory in use: input of 2 * 240 entries, queues and table behind it.
    cfg = TINY
    rng = np.random.default_rng(5)
    cases = [_route_case(cfg, rng, m=120, k=2, ne=16, kind=kind, layout="packed")
             for kind in ("topk", "one")]
    unit = RouteUnit(cfg)
    _run(cfg, unit, cases, _route_bound(unit, cfg))


# -- SPANS ---------------------------------------------------------------------------------------

def _spans_case(cfg, rng, *, blocks=None, **fields):
    """A SPANS instruction: random fields, overridden by ``fields``; ``blocks`` sets k too."""
    n_ent = cfg.idx_entries
    idx, regs, qoff, qlen = _initial_state(cfg, rng)
    if blocks is not None:
        fields["k"] = len(blocks)
    k = fields.get("k", int(rng.choice([0, 1, 2, 4, 8, 16, rng.integers(0, 24)])))
    block = int(rng.choice([1, 2, 3, 16, 64, 65535, rng.integers(1, 200)]))
    nblk = int(rng.choice([8, 40, 300]))          # block indices of interest
    if blocks is None:
        blocks = rng.integers(-2, nblk, size=k)
        if rng.random() < 0.3 and k:               # duplicates
            blocks = rng.choice(blocks, size=k)
        if rng.random() < 0.1 and k:
            blocks[rng.integers(0, k)] = rng.choice([I32_MAX, I32_MIN, I32_MAX - 1])
    sink = int(rng.choice([0, 0, 1, 2, rng.integers(0, 10), 65535]))
    diag_lo = int(rng.choice([0, rng.integers(-10, nblk + 5), -5, I32_MIN, I32_MAX,
                              nblk // 2]))
    diag_n = int(rng.choice([0, 1, 2, rng.integers(0, 12), 65535]))
    lim_choice = rng.choice(["blocks", "zero", "max", "any"])
    limit = {"blocks": int(rng.integers(0, (nblk + 3) * block)), "zero": 0,
             "max": (1 << 32) - 1, "any": int(rng.integers(0, 1 << 32))}[lim_choice]
    ia = int(rng.integers(0, n_ent - k + 1))
    place = rng.choice(["anywhere", "in place", "near end"])
    oa = {"anywhere": int(rng.integers(0, n_ent - k - 1)), "in place": ia,
          "near end": n_ent - int(rng.integers(0, k + 3))}[place]
    f = dict(k=k, idx_addr=ia, block=block, sink=sink, diag_lo=diag_lo, diag_n=diag_n,
             limit=limit, out_addr=oa, dst_reg=int(rng.integers(0, N_REGS)),
             rows_reg=int(rng.integers(0, N_REGS)))
    f.update(fields)
    if f["idx_addr"] + k <= n_ent:
        idx[f["idx_addr"]:f["idx_addr"] + k, 0] = blocks
    return _Case(Opcode.SPANS, f, idx, regs, qoff, qlen,
                 note=f"limit {lim_choice}, out {place}")


def _spans_bound(case):
    return SpansUnit.max_cycles(case.fields["k"])


@pytest.mark.parametrize("cfg", [TINY, ZCU], ids=lambda c: c.name)
def test_spans_random(cfg):
    rng = np.random.default_rng(3)
    cases = [_spans_case(cfg, rng) for _ in range(60)]
    cycles = _run(cfg, SpansUnit(cfg), cases, _spans_bound, extra_starts=random.Random(4))
    for case, n in zip(cases, cycles, strict=True):
        assert n <= SpansUnit.max_cycles(case.fields["k"]), (n, case.fields)


def test_spans_edges():
    cfg = TINY
    n_ent = cfg.idx_entries
    rng = np.random.default_rng(9)
    base = dict(idx_addr=10, out_addr=100, block=4, sink=0, diag_lo=0, diag_n=0,
                limit=1000, dst_reg=1, rows_reg=2)

    def c(**kw):
        return _spans_case(cfg, rng, **dict(base, **kw))
    cases = [
        c(blocks=[]),                                         # nothing: 0 spans, 0 rows
        c(blocks=[], sink=3),                                 # sink only
        c(blocks=[5, 3, 4, 9, -1, 4, 10], sink=2),            # merging, duplicates, none
        c(blocks=[-1, 5, -2, I32_MIN], block=1, limit=(1 << 32) - 1),  # negatives: none
        c(blocks=[2], sink=2),                                # list adjacent to the sink
        c(blocks=[7], diag_lo=-3, diag_n=5),                  # diagonal partly negative
        c(blocks=[1, 3], diag_lo=2, diag_n=1, sink=1),        # everything merges into one
        c(blocks=[249, 250, 251], limit=1000),                # clipped (250*4 = limit)
        c(blocks=[249], limit=999),                           # clipped inside a block
        c(blocks=[0, 1], limit=0),                            # limit 0: no spans
        c(blocks=[40000, 3], block=65535, limit=(1 << 32) - 1),   # rows beyond 2^31
        c(blocks=[40000, 3], block=65535, limit=40000 * 65535 + 7),  # ... clipped
        c(blocks=[I32_MAX], block=65535, limit=(1 << 32) - 1),
        c(blocks=[], sink=65535, block=65535, limit=(1 << 32) - 1),
        c(blocks=[], diag_lo=I32_MAX, diag_n=65535, block=1, limit=(1 << 32) - 1),
        c(blocks=list(range(127, 0, -1)), limit=(1 << 32) - 1, idx_addr=200,
          out_addr=200),                                      # k = 127, in place: one span
        c(blocks=list(range(0, 254, 2)), limit=(1 << 32) - 1, idx_addr=300,
          out_addr=300 - 60),                                 # 127 spans over the input
        c(blocks=[], dst_reg=3, rows_reg=3, sink=2),          # same register: rows win
        c(blocks=[1], dst_reg=0, rows_reg=0),                 # no register written
        # Output near the end: the unit counts first (two walks), then writes or faults.
        c(blocks=[5, 6, 7], out_addr=n_ent - 1),              # 1 span fits
        c(blocks=[5, 7, 9], out_addr=n_ent - 2),              # 3 spans do not
        c(blocks=[5, 7, 9], out_addr=n_ent - 3),              # 3 spans fit exactly
        c(blocks=[], out_addr=n_ent),                         # 0 spans at the end: fine
        c(blocks=[1], limit=0, out_addr=n_ent),               # nothing selected below limit
        c(blocks=[1], out_addr=n_ent),                        # 1 span at the end: IDX_RANGE
        # Field and input checks.
        c(blocks=[1], block=0),                               # BAD_FIELD
        c(blocks=[1], block=0, idx_addr=n_ent),               # BAD_FIELD before IDX_RANGE
        c(k=3, idx_addr=n_ent - 2),                           # input beyond memory
        c(k=0, idx_addr=n_ent),                               # no input at the end: fine
    ]
    cycles = _run(cfg, SpansUnit(cfg), cases, _spans_bound)
    for case, n in zip(cases, cycles, strict=True):
        assert n <= SpansUnit.max_cycles(case.fields["k"]), (n, case.fields)
