"""The cost model: cycles, DRAM bytes and MAC utilisation of a program, without running it.

Each instruction gets a duration from the micro-architecture the ISA was designed for
(docs/ARCHITECTURE.md); the three modules (LOAD, COMPUTE, STORE) then run their instructions in
order, concurrently, each waiting for the dependency tokens it pops, exactly as the hardware's
token queues order them. The result is a timeline: per-instruction start and end cycles, per-layer
(MARK to MARK) cycles on the COMPUTE module, and the total.

Durations (cycles):

* MATMUL: ceil(k / rows) * ceil(n / cols) * m  +  ``MM_FILL`` (array and epilogue pipeline)
* SOFTMAX, LAYERNORM: 2 passes of ceil(n / row_lanes) per row  +  ``ROW_FILL``
* VEC, TOPK: ceil(n / row_lanes) per row (POOL reads m * group rows)  +  ``ROW_FILL``
* LOAD, STORE: ceil(bytes / bus_bytes) beats  +  ``DMA_LATENCY`` per burst of contiguous bytes
  (a run, bounded by ``BURST_BYTES``)
* MARK, END, ROUTE, SPANS: ``SMALL``

Dynamic quantities (expert queue lengths of gathered MATMULs) are taken from an optional ISA
simulator run; without one the instruction's ``m`` field (its capacity) is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vitamin.isa import UNIT_OF, DmaMode, Opcode, Unit

__all__ = ["estimate", "Estimate", "instr_cycles", "MM_FILL", "ROW_FILL", "DMA_LATENCY"]

MM_FILL = 24
ROW_FILL = 12
DMA_LATENCY = 30
BURST_BYTES = 4096
SMALL = 2
FETCH_CYCLES_PER_INSTR = None  # derived from the bus width: 64 bytes / bus_bytes


def _cdiv(a, b):
    return -(-a // b)


def instr_cycles(op, f, cfg, dyn_m=None) -> int:
    if op == Opcode.MATMUL:
        m = f["m"] if dyn_m is None else dyn_m
        if m == 0:
            return SMALL
        return _cdiv(f["k"], cfg.rows) * _cdiv(f["n"], cfg.cols) * m + MM_FILL
    if op in (Opcode.SOFTMAX, Opcode.LAYERNORM):
        return 2 * _cdiv(f["n"], cfg.row_lanes) * f["m"] + ROW_FILL
    if op == Opcode.VEC:
        rows = f["m"] * (max(f["group"], 1) if f["op"].value == 3 else 1)
        return _cdiv(f["n"], cfg.row_lanes) * rows + ROW_FILL
    if op == Opcode.TOPK:
        return _cdiv(f["n"], cfg.row_lanes) * f["m"] + ROW_FILL
    if op in (Opcode.LOAD, Opcode.STORE):
        es = {0: 1, 1: 2, 2: 1, 3: 8}[f["dtype"].value]
        run_bytes = f["run"] * es
        if f["mode"] == DmaMode.STRIDED:
            runs = f["n0"] * f["n1"] * f["n2"]
            contiguous = f["ds0"] == run_bytes
            bursts = (_cdiv(run_bytes * f["n0"], BURST_BYTES) * f["n1"] * f["n2"]
                      if contiguous else runs * _cdiv(run_bytes, BURST_BYTES))
            nbytes = runs * run_bytes
        else:
            runs = f["n1"] * max(f["n2"], 1)
            bursts = runs
            nbytes = runs * run_bytes
        return _cdiv(nbytes, cfg.bus_bytes) + DMA_LATENCY * bursts
    return SMALL


@dataclass
class Estimate:
    cycles: int
    macs: int
    dram_read_bytes: int
    dram_write_bytes: int
    busy: dict                      # unit name -> busy cycles
    layers: list = field(default_factory=list)   # per MARK id: name, op, cycles, macs, ...
    starts: list = field(default_factory=list)
    ends: list = field(default_factory=list)

    def utilisation(self, cfg) -> float:
        return self.macs / (cfg.macs * self.cycles) if self.cycles else 0.0


def estimate(program, sim_result=None) -> Estimate:
    """Timeline of ``program`` (see module docstring)."""
    from vitamin.golden.isasim import decode_program
    cfg = program.config
    instrs = decode_program(program.dram_image(), program.n_instr)
    dyn = {}
    if sim_result is not None and getattr(sim_result, "dyn_m", None):
        dyn = sim_result.dyn_m
    n = len(instrs)
    unit = [UNIT_OF[op].value for op, _ in instrs]
    dur = [instr_cycles(op, f, cfg, dyn.get(pc)) for pc, (op, f) in enumerate(instrs)]
    # fetch: one instruction word per 64/bus_bytes cycles, in program order
    fetch_cost = max(1, 64 // cfg.bus_bytes)
    start = [0] * n
    end = [0] * n
    unit_free = [0, 0, 0]
    # token queues as FIFOs of availability times
    toks = {(0, 1): [], (1, 0): [], (1, 2): [], (2, 1): []}
    heads = {(0, 1): 0, (1, 0): 0, (1, 2): 0, (2, 1): 0}
    fetched = 0
    # process in program order per unit; a simple list scheduling is exact for in-order units
    # because every pop refers to a push earlier in program order of another unit... except
    # when a unit waits on a later instruction of another unit; iterate to a fixed point.
    order = [[pc for pc in range(n) if unit[pc] == u] for u in range(3)]
    idx = [0, 0, 0]
    done = [False] * n
    progress = True
    while progress:
        progress = False
        for u in range(3):
            while idx[u] < len(order[u]):
                pc = order[u][idx[u]]
                op, f = instrs[pc]
                need = []
                if f["pop_prev"]:
                    need.append((u - 1, u))
                if f["pop_next"]:
                    need.append((u + 1, u))
                if any(heads[k] >= len(toks[k]) for k in need):
                    break
                t0 = max(unit_free[u], (pc + 1) * fetch_cost if fetched is not None else 0)
                for k in need:
                    t0 = max(t0, toks[k][heads[k]])
                    heads[k] += 1
                if op == Opcode.END:
                    t0 = max([t0] + unit_free)
                start[pc] = t0
                end[pc] = t0 + dur[pc]
                unit_free[u] = end[pc]
                if f["push_prev"]:
                    toks[(u, u - 1)].append(end[pc])
                if f["push_next"]:
                    toks[(u, u + 1)].append(end[pc])
                done[pc] = True
                idx[u] += 1
                progress = True
    if not all(done):
        stuck = [pc for pc in range(n) if not done[pc]][:3]
        raise ValueError(f"cost model: dependency tokens never arrive for instructions {stuck}")
    total = max(end) if end else 0
    busy = {Unit(u).name: int(sum(dur[pc] for pc in order[u])) for u in range(3)}
    macs = 0
    rd = wr = 0
    for pc, (op, f) in enumerate(instrs):
        if op == Opcode.MATMUL:
            macs += (dyn.get(pc, f["m"])) * f["k"] * f["n"]
        if op in (Opcode.LOAD, Opcode.STORE):
            es = {0: 1, 1: 2, 2: 1, 3: 8}[f["dtype"].value]
            b = f["run"] * es * f["n0"] * f["n1"] * (f["n2"] if f["mode"] == DmaMode.STRIDED
                                                      else 1)
            if op == Opcode.LOAD:
                rd += b
            else:
                wr += b
    # per layer: from one MARK (id < 0xFFF0) to the next on the COMPUTE timeline
    meta_layers = program.meta.get("layers", [])
    marks = [(pc, f["id"]) for pc, (op, f) in enumerate(instrs)
             if op == Opcode.MARK and f["id"] < len(meta_layers)]
    layers = []
    for i, (pc, lid) in enumerate(marks):
        nxt = marks[i + 1][0] if i + 1 < len(marks) else n - 1
        comp = [p for p in range(pc, nxt) if unit[p] == 1]
        t_a = start[pc]
        t_b = start[nxt] if i + 1 < len(marks) else max(end[p] for p in comp)
        lm = sum((dyn.get(p, instrs[p][1]["m"])) * instrs[p][1]["k"] * instrs[p][1]["n"]
                 for p in comp if instrs[p][0] == Opcode.MATMUL)
        lb = 0
        for p in range(pc, nxt):
            op, f = instrs[p]
            if op == Opcode.LOAD:
                es = {0: 1, 1: 2, 2: 1, 3: 8}[f["dtype"].value]
                lb += f["run"] * es * f["n0"] * f["n1"] * f["n2"]
        info = dict(meta_layers[lid])
        cyc = max(t_b - t_a, 1)
        info.update(cycles=int(cyc), macs_executed=int(lm), dram_bytes=int(lb),
                    utilisation=float(lm / (cfg.macs * cyc)))
        layers.append(info)
    return Estimate(cycles=int(total), macs=int(macs), dram_read_bytes=int(rd),
                    dram_write_bytes=int(wr), busy=busy, layers=layers, starts=start, ends=end)


_ = np
