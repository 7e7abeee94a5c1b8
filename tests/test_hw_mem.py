"""Banked scratchpad: unaligned reads and masked writes at every offset, against a list model."""

import random

import pytest
from amaranth.sim import Simulator

from vitamin import get_config
from vitamin.hw.mem import Scratchpad
from vitamin.hw.ports import SPAD_READ_LATENCY


@pytest.mark.parametrize("preset,words,part_rows", [("tiny", 2048, None), ("ecp5", 2048, None),
                                                     ("ecp5", 2048, 128), ("ecp5", 1536, 256),
                                                     ("tiny", 2048, 64)])
def test_scratchpad_random_unaligned(preset, words, part_rows):
    """part_rows splits each bank into blocks (as the ``ecp5`` preset's 24,576-row banks are, in
    three blocks of 8,192 rows): 384 rows in blocks of 256 leave a shorter last block."""
    cfg = get_config(preset).replace(spad_words=words)
    rng = random.Random(1)
    init = [rng.randrange(-32768, 32768) for _ in range(cfg.spad_words)]
    dut = Scratchpad(cfg, init=init, part_rows=part_rows)
    lanes = dut.lanes
    model = list(init)
    n_parts = -(-(cfg.spad_words // lanes) // dut.part_rows)
    assert n_parts == (1 if part_rows is None else -(-(cfg.spad_words // lanes) // part_rows))

    async def tb(ctx):
        p = dut.port
        for it in range(400):
            a = rng.randrange(0, cfg.spad_words - lanes + 1)
            w = rng.randrange(0, cfg.spad_words - lanes + 1)
            wd = [rng.randrange(-32768, 32768) for _ in range(lanes)]
            mask = rng.randrange(0, 1 << lanes)
            doit = rng.random() < 0.5
            ctx.set(p.rd_en, 1)
            ctx.set(p.rd_addr, a)
            ctx.set(p.wr_en, doit)
            ctx.set(p.wr_addr, w)
            ctx.set(p.wr_data, wd)
            ctx.set(p.wr_mask, mask)
            expect = model[a:a + lanes]          # a read sees the contents before the write
            await ctx.tick()
            if doit:
                for i in range(lanes):
                    if mask >> i & 1:
                        model[w + i] = wd[i]
            ctx.set(p.rd_en, 0)
            ctx.set(p.wr_en, 0)
            for _ in range(SPAD_READ_LATENCY - 1):
                await ctx.tick()
            got = [ctx.get(p.rd_data[i]) for i in range(lanes)]
            assert got == expect, (it, a, got, expect)
        # the simulator's view of every element (Scratchpad.word) matches the model too
        assert [ctx.get(dut.word(e)) for e in range(cfg.spad_words)] == model

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()


@pytest.mark.parametrize("preset,part_rows", [("tiny", None), ("ecp5", 128)])
def test_scratchpad_second_writer(preset, part_rows):
    """The second write port (LOAD's and the clear's in the v2 top): both ports write in random
    cycles, alone or together; together the first wins unless the second has ``wr_prio``. Reads
    issued in every cycle see exactly the writes requested before them, from either port."""
    cfg = get_config(preset).replace(spad_words=1024)
    rng = random.Random(2)
    init = [rng.randrange(-32768, 32768) for _ in range(cfg.spad_words)]
    dut = Scratchpad(cfg, init=init, part_rows=part_rows, second_writer=True)
    lanes = dut.lanes
    model = list(init)
    both = {"first": 0, "second": 0}

    def req():
        return (rng.randrange(0, cfg.spad_words - lanes + 1),
                [rng.randrange(-32768, 32768) for _ in range(lanes)],
                rng.randrange(1, 1 << lanes))

    async def tb(ctx):
        p, p2 = dut.port, dut.port2
        pending = []                             # (cycle due, address, expected words)
        for cyc in range(600):
            a = rng.randrange(0, cfg.spad_words - lanes + 1)
            ctx.set(p.rd_en, 1)
            ctx.set(p.rd_addr, a)
            pending.append((cyc + SPAD_READ_LATENCY, a, model[a:a + lanes]))
            e1, e2 = rng.random() < 0.5, rng.random() < 0.5
            prio = rng.random() < 0.3
            (w1, d1, m1), (w2, d2, m2) = req(), req()
            for port, en, w, d, mk in ((p, e1, w1, d1, m1), (p2, e2, w2, d2, m2)):
                ctx.set(port.wr_en, en)
                ctx.set(port.wr_addr, w)
                ctx.set(port.wr_data, d)
                ctx.set(port.wr_mask, mk)
            ctx.set(p2.wr_prio, prio)
            if e1 and e2:
                both["second" if prio else "first"] += 1
            win = (w2, d2, m2) if e2 and (prio or not e1) else (w1, d1, m1) if e1 else None
            if win is not None:
                w, d, mk = win
                for i in range(lanes):
                    if mk >> i & 1:
                        model[w + i] = d[i]
            await ctx.tick()
            for due, ra, want in [x for x in pending if x[0] == cyc + 1]:
                got = [ctx.get(p.rd_data[i]) for i in range(lanes)]
                assert got == want, (cyc, ra, got, want)
            pending = [x for x in pending if x[0] > cyc + 1]
        assert [ctx.get(dut.word(e)) for e in range(cfg.spad_words)] == model
        assert both["first"] > 50 and both["second"] > 20, both

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()


def test_cleared_memories_have_no_initialiser_in_verilog():
    """The on-chip memories are zeroed by CTRL.CLEAR, so their Verilog carries no per-word
    initialiser; a preloaded memory (tests) keeps its contents; ROM-like data is untouched."""
    from vitamin.hw.mem import BYPASSED_MEMORY, NOINIT_ATTR, IdxMemory
    from vitamin.sim import verilator

    assert verilator.NOINIT_ATTR == NOINIT_ATTR
    cfg = get_config("tiny").replace(spad_words=1024)
    plain = verilator.convert_verilog(Scratchpad(cfg), name="spad")
    assert "reg [15:0] bank0 [255:0];" in plain and "bank0[0] =" not in plain
    loaded = verilator.convert_verilog(Scratchpad(cfg, init=[7] * cfg.spad_words), name="spad")
    assert loaded.count("16'h0007;") == cfg.spad_words and "bank0[0] =" in loaded
    idx = verilator.convert_verilog(IdxMemory(cfg), name="idx")
    assert f"{BYPASSED_MEMORY}[0] =" not in idx and f"{BYPASSED_MEMORY} [" in idx
    # the RTLIL filter keeps every other cell, including initialisers of unmarked memories
    raw = verilator.strip_noinit("module \\m\n  memory width 4 size 2 \\a\n"
                                 "  attribute \\src \"x\"\n  cell $meminit_v2 $1\n"
                                 "    parameter \\MEMID \"\\\\a\"\n  end\nend\n")
    assert "$meminit_v2" in raw and "attribute \\src" in raw


@pytest.mark.parametrize("kind", ["idx", "rs"])
def test_registered_memories_random_collisions(kind):
    """Index and row state memory: a read returns the contents before the write of its own
    cycle and after every earlier one, with the reads and writes at one address in the same
    cycle, one cycle apart (the write still on its way to the RAM, bypassed) and two apart;
    ``word`` shows a write under way."""
    from vitamin.hw.mem import IdxMemory, RowStateMemory
    from vitamin.hw.ports import IDX_READ_LATENCY, RS_READ_LATENCY

    cfg = get_config("tiny")
    dut = IdxMemory(cfg) if kind == "idx" else RowStateMemory(cfg)
    lat = IDX_READ_LATENCY if kind == "idx" else RS_READ_LATENCY
    depth = cfg.idx_entries if kind == "idx" else cfg.rowstate_rows
    width = len(dut.port.wr_data.as_value())
    rng = random.Random(7)
    model = [0] * depth
    hot = [rng.randrange(depth) for _ in range(3)]   # few addresses: many collisions

    async def tb(ctx):
        p = dut.port
        pending = []                                  # (cycle the data is due, expected)
        for cyc in range(1500):
            rd = rng.random() < 0.7
            wr = rng.random() < 0.6
            ra = rng.choice(hot) if rng.random() < 0.8 else rng.randrange(depth)
            wa = rng.choice(hot) if rng.random() < 0.8 else rng.randrange(depth)
            wd = rng.getrandbits(width)
            ctx.set(p.rd_en, rd)
            ctx.set(p.rd_addr, ra)
            ctx.set(p.wr_en, wr)
            ctx.set(p.wr_addr, wa)
            ctx.set(p.wr_data.as_value(), wd)
            if rd:
                pending.append((cyc + lat, model[ra]))
            if wr:
                model[wa] = wd
            await ctx.tick()
            # cycle cyc + 1: the data of the reads issued lat cycles ago
            while pending and pending[0][0] == cyc + 1:
                _, want = pending.pop(0)
                got = ctx.get(p.rd_data.as_value())
                assert got == want, (cyc, got, want)
            assert [ctx.get(dut.word(i).as_value()) for i in hot] == [model[i] for i in hot]
        assert not pending[1:]

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()
