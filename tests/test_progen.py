"""The random program generator: valid programs, deterministic, and correct dependency tokens."""

import itertools

import numpy as np
import pytest

from vitamin import get_config, isa
from vitamin.golden.isasim import Machine, simulate
from vitamin.golden.progen import GENERATED_OPCODES, random_program
from vitamin.isa import Opcode

TINY = get_config("tiny")


def _image(rp):
    img = rp.program.dram_image()
    for name, v in rp.inputs.items():
        rp.program.write_tensor(img, name, v)
    return img


def _decode(prog):
    return [isa.decode(prog.code[i * 64:(i + 1) * 64]) for i in range(prog.n_instr)]


def test_200_random_programs_run_ok_on_golden():
    seen = set()
    for seed in range(200):
        rp = random_program(TINY, seed, n_instr=25, opcodes=GENERATED_OPCODES)
        res = simulate(TINY, _image(rp), rp.program.n_instr, regs=rp.regs)
        assert res.ok, (seed, res.status, res.error_pc, res.message)
        assert res.counters["instructions"] == rp.program.n_instr
        seen.update(rp.ops)
    assert seen == {op.name for op in GENERATED_OPCODES}


def test_state_dump():
    rp = random_program(TINY, 3, n_instr=15, dump=True)
    instrs = _decode(rp.program)
    assert [op for op, _ in instrs[-3:]] == [Opcode.STORE, Opcode.STORE, Opcode.END]
    img = _image(rp)
    res = simulate(TINY, img, rp.program.n_instr, regs=rp.regs)
    assert res.ok
    m = Machine(TINY, np.array(img, copy=True), rp.regs)
    for pc, (op, f) in enumerate(instrs):
        m.pc = pc
        m.step(op, f)
    np.testing.assert_array_equal(rp.program.read_tensor(res.dram, "dump_spad"), m.spad)
    np.testing.assert_array_equal(rp.program.read_tensor(res.dram, "dump_idx"), m.idx)


def test_select_only_on_request():
    # the default programs (those of the cost model's tests) are drawn without SELECT
    ops = set()
    for seed in range(10):
        ops |= {op for op, _ in _decode(random_program(TINY, seed, n_instr=25).program)}
    assert Opcode.SELECT not in ops and Opcode.SPANS in ops
    rp = random_program(TINY, 0, n_instr=30, opcodes=[Opcode.LOAD, Opcode.SELECT])
    assert Opcode.SELECT in {op for op, _ in _decode(rp.program)}


def test_same_seed_same_program():
    a = random_program(TINY, 7, n_instr=20)
    b = random_program(TINY, np.random.default_rng(7), n_instr=20)
    assert a.program.to_bytes() == b.program.to_bytes()
    assert a.regs == b.regs
    assert all(np.array_equal(a.inputs[k], b.inputs[k]) for k in a.inputs)


def test_opcode_restriction():
    for seed in range(20):
        rp = random_program(TINY, seed, n_instr=20, opcodes=[Opcode.LOAD, Opcode.STORE])
        ops = {op for op, _ in _decode(rp.program)}
        # MARK only as the relay of a LOAD <-> STORE dependency
        assert ops <= {Opcode.LOAD, Opcode.STORE, Opcode.MARK, Opcode.END}
    with pytest.raises(ValueError):
        random_program(TINY, 0, opcodes=[30])        # not an opcode
    empty = random_program(TINY, 0, opcodes=[Opcode.END])
    assert [op for op, _ in _decode(empty.program)] == [Opcode.END]


def _decoupled_run(cfg, instrs, img, regs, priority):
    """Execute in an order that respects program order within each module and the dependency
    tokens (each instruction atomically), always running the ready module that comes first in
    ``priority``: a module runs as far ahead as its tokens allow, as in a decoupled machine."""
    mach = Machine(cfg, np.array(img, copy=True), regs)
    queues = {0: [], 1: [], 2: []}
    for pc, (op, f) in enumerate(instrs):
        queues[isa.UNIT_OF[op].value].append(pc)
    tok = {(0, 1): 0, (1, 0): 0, (1, 2): 0, (2, 1): 0}

    def pops(u, f):
        return ([(u - 1, u)] if f["pop_prev"] else []) + ([(u + 1, u)] if f["pop_next"] else [])

    def pushes(u, f):
        return ([(u, u - 1)] if f["push_prev"] else []) + ([(u, u + 1)] if f["push_next"] else [])

    while any(queues.values()):
        ready = []
        for u, q in queues.items():
            if not q:
                continue
            op, f = instrs[q[0]]
            if op == Opcode.END and any(queues[v] for v in queues if v != u):
                continue
            if all(tok[k] > 0 for k in pops(u, f)):
                ready.append(u)
        assert ready, "the tokens deadlock"
        u = min(ready, key=priority.index)
        pc = queues[u].pop(0)
        op, f = instrs[pc]
        for k in pops(u, f):
            tok[k] -= 1
        mach.pc = pc
        mach.step(op, f)
        for k in pushes(u, f):
            tok[k] += 1
    assert not any(tok.values())
    return mach


@pytest.mark.parametrize("seed", range(12))
def test_tokens_order_every_conflict(seed):
    """Any interleaving allowed by the tokens gives golden's sequential result."""
    rp = random_program(TINY, 1000 + seed, n_instr=30)
    img = _image(rp)
    want = simulate(TINY, img, rp.program.n_instr, regs=rp.regs)
    assert want.ok
    instrs = _decode(rp.program)
    seq = Machine(TINY, np.array(img, copy=True), rp.regs)
    for pc, (op, f) in enumerate(instrs):
        seq.pc = pc
        seq.step(op, f)
    np.testing.assert_array_equal(seq.dram, want.dram)
    for priority in itertools.permutations([0, 1, 2]):
        got = _decoupled_run(TINY, instrs, img, rp.regs, list(priority))
        for part in ("dram", "spad", "idx", "regs", "qoff", "qlen"):
            np.testing.assert_array_equal(getattr(got, part), getattr(seq, part), err_msg=part)
