"""Move the flip-flops around each ECP5 multiplier block into the block's own registers.

``synth_ecp5`` maps every product to ``MULT18X18D`` blocks with all their registers off
(``REG_INPUTA_CLK = REG_INPUTB_CLK = REG_OUTPUT_CLK = "NONE"``), and keeps the operand and
product registers of the gateware in the fabric. On a full LFE5U-85F the placer puts those
flip-flops where their other logic is and the blocks where free ones are, so a product
registered on both sides still pays a route to the block, the block's 3.9 ns and a route back
in one cycle: 13.7-14.7 ns for such paths in the e30bab3 build's routed timing, 1,271 of its
7,425 register inputs over 10 ns.

:func:`absorb_dsp_registers` rewrites the synthesised netlist (Yosys ``write_json``) before
nextpnr reads it, block by block:

* **inputs**: when every bit of ``A`` and of ``B`` comes from a flip-flop (or is a constant)
  whose own inputs arrive early (:data:`INPUT_LIMIT_NS`, pre-route estimate) and not from a
  block RAM's output, the block's input registers take the flip-flops' data inputs with the
  same clock enable, and a flip-flop that feeds nothing else is removed;
* **output**: when every used bit of ``P`` feeds one flip-flop and nothing else, the block's
  output register replaces those flip-flops (their outputs become ``P``'s nets).

Both are the same registers in another place: the cycle behaviour is unchanged. A flip-flop
qualifies when it is a plain register of the one clock: ``CLKMUX = "CLK"``, initial value 0
(``REGSET = "RESET"``, as the block's registers after configuration), no set/reset (``LSR`` the
constant 0) and an enable that is a net or the constant 1 (``CEMUX`` ``"CE"`` or ``"1"``); the
block takes the flip-flops' ``GSR`` mode (all of them must share it). Inputs
are registered only when both ``A`` and ``B`` qualify: nextpnr-ecp5 times a block with one
registered input as if it had none. The enables go to the block's ``CE0`` .. ``CE2``, the clock to
``CLK0`` (the only clock nextpnr-ecp5 times a block's registers against).
"""

from __future__ import annotations

from vitamin.sim.sta import connectivity

__all__ = ["absorb_dsp_registers"]

_CONST0 = "0"
_CONST1 = "1"


def _top(netlist):
    mods = netlist["modules"]
    return max(mods.values(), key=lambda m: len(m.get("cells", {})))


#: Inputs are registered in the block only when the operand registers' own inputs arrive by
#: this time (ns, :mod:`vitamin.sim.sta`'s estimate): the logic in front of an operand register
#: then drives the route to the block, which it must still make in the cycle.
INPUT_LIMIT_NS = 7.0


def absorb_dsp_registers(netlist: dict, ff_arrival=None, input_limit_ns=INPUT_LIMIT_NS) -> dict:
    """Rewrite ``netlist`` (a parsed Yosys JSON netlist after ``synth_ecp5``) in place; return
    counts: blocks with registered inputs, with a registered output, flip-flops removed.

    ``ff_arrival`` ({flip-flop cell: estimated arrival at its inputs, ns}) limits the input
    side to operand registers whose inputs arrive by ``input_limit_ns``; without it every
    qualifying operand register goes into its block."""
    top = _top(netlist)
    cells = top["cells"]
    port_bits = {b for p in top.get("ports", {}).values() for b in p["bits"] if isinstance(b, int)}
    # kept up to date as the blocks are rewritten
    driver, loads = connectivity(cells)

    def plain_ff(cn):
        """((clock bit, GSR mode), enable bit or "1") of a plain flip-flop, else None."""
        c = cells[cn]
        if c["type"] != "TRELLIS_FF":
            return None
        prm = c["parameters"]
        if prm.get("CLKMUX", "CLK").strip() != "CLK" or prm.get("REGSET", "RESET") != "RESET":
            return None
        gsr = prm.get("GSR", "ENABLED").strip()
        if gsr not in ("ENABLED", "DISABLED"):
            return None
        lsr = c["connections"].get("LSR", [_CONST0])[0]
        if lsr != _CONST0:
            return None
        cemux = prm.get("CEMUX", "1").strip()
        if cemux == "1":
            ce = _CONST1
        elif cemux == "CE":
            ce = c["connections"]["CE"][0]
        else:
            return None
        return (c["connections"]["CLK"][0], gsr), ce

    stats = {"blocks": 0, "inputs_registered": 0, "outputs_registered": 0, "ffs_removed": 0}
    operand_ffs = set()
    # the blocks' names first: product flip-flops are deleted from ``cells`` on the way
    for cn in sorted(n for n, c in cells.items() if c["type"] == "MULT18X18D"):
        c = cells[cn]
        stats["blocks"] += 1
        prm = c["parameters"]
        if any(prm.get(f"REG_{r}_CLK", "NONE") != "NONE"
               for r in ("INPUTA", "INPUTB", "INPUTC", "PIPELINE", "OUTPUT")):
            continue
        conn = c["connections"]
        clocks = set()
        # inputs: every bit from a plain flip-flop (or a constant), one enable per side
        new_in = {}
        for side in "AB":
            side_ce, bits_in = set(), []
            for i in range(18):
                b = conn.get(f"{side}{i}", [_CONST0])[0]
                if not isinstance(b, int):
                    bits_in.append(b)
                    continue
                d = driver.get(b)
                info = plain_ff(d[0]) if d and d[1] == "Q" else None
                if info is None or (ff_arrival is not None
                                    and ff_arrival.get(d[0], 0.0) > input_limit_ns):
                    break
                d_in = cells[d[0]]["connections"]["DI"][0]
                src = driver.get(d_in)
                if src and cells[src[0]]["type"] == "DP16KD":
                    # a block RAM's output: the RAM and the multiplier block are fixed sites,
                    # and the register in the block left 5.83 ns of clock-to-output plus the
                    # whole way between them in one cycle (12.1-12.7 ns into the exp2 tables'
                    # words, 90718e9 routed); in the fabric it sits between the two
                    break
                clocks.add(info[0])
                side_ce.add(info[1])
                bits_in.append(d_in)
            else:
                if len(side_ce) <= 1:
                    new_in[side] = (bits_in, next(iter(side_ce), _CONST1))
        # output: every used bit into exactly one plain flip-flop's data input
        out_ffs, out_ce = [], set()
        for i in range(36):
            b = conn.get(f"P{i}", [None])[0]
            if not isinstance(b, int) or (not loads[b] and b not in port_bits):
                continue
            ld = loads[b]
            info = (plain_ff(ld[0][0]) if len(ld) == 1 and ld[0][1] == "DI"
                    and b not in port_bits else None)
            if info is None:
                out_ffs = None
                break
            clocks.add(info[0])
            out_ce.add(info[1])
            out_ffs.append((i, ld[0][0]))
        reg_in = len(new_in) == 2
        reg_out = bool(out_ffs) and len(out_ce) == 1
        if not (reg_in or reg_out):
            continue
        if len(clocks) != 1:
            # inputs and output of different clocks or GSR modes: leave the block as it is
            continue
        clk, gsr = next(iter(clocks))
        prm["GSR"] = gsr
        ce_ports = {}                       # enable bit -> CEk

        def ce_port(ce_bit, ce_ports=ce_ports):
            if ce_bit not in ce_ports:
                ce_ports[ce_bit] = f"CE{len(ce_ports)}"
            return ce_ports[ce_bit]

        if reg_in:
            for side in "AB":
                bits_in, ce = new_in[side]
                for i, b in enumerate(bits_in):
                    old = conn.get(f"{side}{i}", [_CONST0])[0]
                    if isinstance(old, int):
                        loads[old].remove((cn, f"{side}{i}"))
                        operand_ffs.add(driver[old][0])
                    if isinstance(b, int):
                        loads[b].append((cn, f"{side}{i}"))
                    conn[f"{side}{i}"] = [b]
                prm[f"REG_INPUT{side}_CLK"] = "CLK0"
                prm[f"REG_INPUT{side}_CE"] = ce_port(ce)
                prm[f"REG_INPUT{side}_RST"] = "RST0"
            stats["inputs_registered"] += 1
        if reg_out:
            ce = next(iter(out_ce))
            for i, ff in out_ffs:
                q = cells[ff]["connections"]["Q"][0]
                loads[conn[f"P{i}"][0]].clear()
                d_in = cells[ff]["connections"]["DI"][0]
                for p_, bits in cells[ff]["connections"].items():
                    if p_ not in ("Q", "DI"):
                        for b in bits:
                            if isinstance(b, int) and (ff, p_) in loads[b]:
                                loads[b].remove((ff, p_))
                assert d_in == conn[f"P{i}"][0]
                conn[f"P{i}"] = [q]
                driver[q] = (cn, f"P{i}")
                del cells[ff]
                stats["ffs_removed"] += 1
            prm["REG_OUTPUT_CLK"] = "CLK0"
            prm["REG_OUTPUT_CE"] = ce_port(ce)
            prm["REG_OUTPUT_RST"] = "RST0"
            stats["outputs_registered"] += 1
        conn["CLK0"] = [clk]
        c["port_directions"]["CLK0"] = "input"
        for k in range(4):
            ce_bit = next((b for b, p in ce_ports.items() if p == f"CE{k}"), _CONST1)
            conn[f"CE{k}"] = [ce_bit]
            conn[f"RST{k}"] = [_CONST0]
            c["port_directions"][f"CE{k}"] = "input"
            c["port_directions"][f"RST{k}"] = "input"
        if isinstance(clk, int):
            loads[clk].append((cn, "CLK0"))
        for b in ce_ports:
            if isinstance(b, int):
                loads[b].append((cn, "CE"))
    # operand flip-flops that now feed nothing
    for cn in sorted(operand_ffs):
        if cn not in cells:
            continue
        q = cells[cn]["connections"]["Q"][0]
        if not loads.get(q) and q not in port_bits:
            del cells[cn]
            stats["ffs_removed"] += 1
    return stats
