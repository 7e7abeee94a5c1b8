"""The cost model: cycles, DRAM bytes and MAC utilisation of a program, without running it.

Two machines are modelled (``estimate(program, machine=...)``); the default is the machine the
default hardware is (``hw.accel.DEFAULT_ISSUE``, v2):

``"v2"`` (the default): the decoupled RTL (``hw/accel_v2.py``)
    An instruction-level timeline of the v2 control, replayed from the RTL's state machines:

    * fetch: one instruction per ``5 + 64 / bus_bytes`` cycles (FETCH, FETCH_AR, read latency,
      the beats, DECODE, DISPATCH); DISPATCH waits while the module's queue holds
      ``cmd_depth`` instructions (the running head counts, hw/accel_v2.py);
    * the three modules (LOAD, COMPUTE, STORE) run their queues in order: IDLE (pops its tokens,
      all at once, when every one is there), CHECK, START, RUN (the unit's cycles), PUSH (waits
      while a token queue it pushes holds ``token_depth``), then the next; a queue entry can
      start 2 cycles after its dispatch, a token the cycle after its push; MARK and skipped
      instructions take CHECK and PUSH only; END waits for fetch to stop and the LOAD and
      STORE queues to drain, and the machine halts two cycles after its CHECK;
    * unit cycles: the exact figures of the v1 model below (:func:`v1_unit_cycles`: the units
      are the same; COMPUTE units are fixed pipelines that own the memory ports);
    * contention, by a fixed point over :data:`V2_PASSES` passes, each using the previous pass's
      timeline: a LOAD (STORE) progresses inside a COMPUTE run at ``min(1, free / need)`` of
      its own rate, where ``free`` is the fraction of the scratchpad's write (read) slots the
      COMPUTE unit leaves (:func:`_port_use`) and ``need`` the fraction of its own cycles in
      which the DMA uses the port; the AXI read channel: a fetch that wants the channel during
      a LOAD waits for the end of the LOAD's current burst (the RAM serves one burst at a time;
      the LOAD's bursts are spread over its run), and the LOAD is longer by that fetch's beats.

    Agreement with the Verilator model of the v2 RTL (tests/test_cost_rtl.py, ``make bench``)
    is stated there: exact on the control and the COMPUTE units, an estimate on the two
    contention effects.

``"v1"``: the sequential-issue RTL (``Accelerator(issue="v1")``, ``hw/accel.py``)
    The controller issues instructions SEQUENTIALLY: fetch one 64-byte instruction over the AXI
    read channel, decode it, start its unit, wait for ``done``, repeat. The total is therefore
    the sum over the instructions of (fetch + decode [+ dispatch + unit cycles]), with

    * fetch and decode (:func:`fetch_cycles`): the controller's FETCH, FETCH_AR, FETCH_R and
      DECODE states, ``64 / bus_bytes`` beats plus the read latency of the memory
      (:data:`DRAM_READ_LATENCY`, 2 cycles for the simulation RAM of ``sim/simtop.py``);
      a unit instruction adds the DISPATCH cycle; MARK, END and an instruction skipped by its
      predicate cost the fetch and decode only.
    * unit cycles, from the units' own figures where they exist:
      ``MatmulUnit.cycles`` (exact), ``RouteUnit.cycles`` (exact), the row units' ``row_cycles``
      plus a per-instruction overhead measured on the RTL (:data:`ROW_OVERHEAD`), the TOPK row
      pipeline, the key-span walk of SOFTMAX and the SPANS walk (replicated from
      ``hw/rowops.py`` and ``hw/idxops.py``), and LOAD/STORE from a model of ``hw/dma.py``
      against the simulation RAM (one burst at a time, one beat per cycle): the LOAD data path
      takes one run at a time (its bytes are packed before the next run's beats are accepted),
      the STORE runs through its FIFOs and the AW/W/B handshakes of every burst.

    Calibrated against the Verilator model (tests/test_cost_rtl.py): the cycles of every
    instruction agree exactly on compiled ViTs and on random programs (golden/progen.py), on
    the ``tiny``, ``ecp5`` and ``zcu102`` presets. It models the simulation RAM; a real
    memory's latency and stalls (``throttle``) add cycles to every fetch and DMA burst.

Data-dependent figures (expert queue lengths, skipped instructions, span lists, register
values) need a :class:`DynamicProfile` (:func:`profile_program`: one golden-model run); without
one, a gathered MATMUL processes its capacity ``m`` rows, predicated instructions execute, and
span lists are guessed (see :func:`v1_unit_cycles`).

Both give a timeline: per-instruction start and end cycles, per-layer (MARK to MARK) cycles and
the total, and the RTL counters it predicts (``counters``: ``cycles``, ``busy_<op>``,
``instructions``, ...). Each estimate also carries the other machine's total (``v1_cycles``,
``v2_cycles``).
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass, field

import numpy as np

from vitamin.isa import UNIT_OF, DmaMode, Mem, Opcode, OutMode, SmMode, Unit

__all__ = ["estimate", "Estimate", "MACHINES", "DEFAULT_MACHINE", "DynamicProfile",
           "profile_program", "fetch_cycles", "v1_unit_cycles", "DRAM_READ_LATENCY",
           "ROW_OVERHEAD", "QUEUE_LATENCY", "V2_PASSES"]

#: Machines :func:`estimate` models.
MACHINES = ("v1", "v2")
#: The machine of the default hardware (``hw.accel.DEFAULT_ISSUE``).
DEFAULT_MACHINE = "v2"

_ES = {0: 1, 1: 2, 2: 1, 3: 8}     # DType value -> DRAM bytes per element (I8, I16, U8, I32)


def _cdiv(a, b):
    return -(-a // b)


@dataclass
class Estimate:
    cycles: int
    macs: int
    dram_read_bytes: int
    dram_write_bytes: int
    busy: dict                      # opcode name -> busy (RUN) cycles, as the busy_<op> counters
    layers: list = field(default_factory=list)   # per MARK id: name, op, cycles, macs, ...
    starts: list = field(default_factory=list)
    ends: list = field(default_factory=list)
    machine: str = DEFAULT_MACHINE  # the machine this estimate models (MACHINES)
    v2_cycles: int | None = None    # total cycles on the v2 (decoupled) machine
    counters: dict = field(default_factory=dict)  # predicted RTL counters (hw/accel*.py)
    v1_cycles: int | None = None    # total cycles on the v1 (sequential) machine

    def utilisation(self, cfg) -> float:
        return self.macs / (cfg.macs * self.cycles) if self.cycles else 0.0


def estimate(program, sim_result=None, machine=DEFAULT_MACHINE, *, other=True) -> Estimate:
    """Timeline of ``program`` on ``machine`` (``"v2"``: the decoupled RTL, the default
    hardware; ``"v1"``: the sequential-issue RTL; see the module docstring).

    ``sim_result``: a :class:`DynamicProfile` (:func:`profile_program`) for the data-dependent
    quantities, or any object with a ``dyn_m`` dict {pc: rows of a gathered MATMUL}.
    ``other``: also fill in the other machine's total (``v1_cycles`` / ``v2_cycles``).
    """
    if machine == "v2":
        est = _estimate_v2(program, sim_result)
        if other:
            est.v1_cycles = _estimate_v1(program, sim_result, other=False).cycles
        return est
    if machine != "v1":
        raise ValueError(f"unknown machine {machine!r}; machines: {', '.join(MACHINES)}")
    return _estimate_v1(program, sim_result, other=other)


def _decode(program):
    from vitamin.golden.isasim import decode_program
    return decode_program(program.dram_image(), program.n_instr)


def _dyn_m(sim_result) -> dict:
    if sim_result is not None and getattr(sim_result, "dyn_m", None):
        return sim_result.dyn_m
    return {}


def _profile_of(sim_result):
    prof = sim_result if isinstance(sim_result, DynamicProfile) else None
    dyn = _dyn_m(sim_result)
    if prof is None and dyn:
        prof = DynamicProfile(dyn_m=dict(dyn))
    return prof, dyn


def _traffic(instrs, dyn, skipped=(), runs=None):
    """MACs, DRAM bytes read and written; ``runs`` {pc: run addresses} from a profile gives the
    exact bytes of SPANS-mode transfers."""
    macs = rd = wr = 0
    for pc, (op, f) in enumerate(instrs):
        if pc in skipped:
            continue
        if op == Opcode.MATMUL:
            macs += (dyn.get(pc, f["m"])) * f["k"] * f["n"]
        if op in (Opcode.LOAD, Opcode.STORE):
            es = _ES[f["dtype"].value]
            if runs is not None and pc in runs:
                b = len(runs[pc]) * f["run"] * es
            else:
                b = f["run"] * es * f["n0"] * f["n1"] * (f["n2"] if f["mode"] == DmaMode.STRIDED
                                                          else 1)
            if op == Opcode.LOAD:
                rd += b
            else:
                wr += b
    return macs, rd, wr


def _layers(program, instrs, start, end, dyn, last_end, sequential):
    """Per layer: from one MARK (id < len(meta layers)) to the next; ``sequential`` (v1) counts
    every instruction of the span, v2 the COMPUTE timeline."""
    cfg = program.config
    n = len(instrs)
    meta_layers = program.meta.get("layers", [])
    marks = [(pc, f["id"]) for pc, (op, f) in enumerate(instrs)
             if op == Opcode.MARK and f["id"] < len(meta_layers)]
    layers = []
    for i, (pc, lid) in enumerate(marks):
        nxt = marks[i + 1][0] if i + 1 < len(marks) else n - 1
        comp = [p for p in range(pc, nxt) if UNIT_OF[instrs[p][0]] == Unit.COMPUTE]
        t_a = start[pc]
        if i + 1 < len(marks):
            t_b = start[nxt]
        elif sequential:
            t_b = last_end
        else:
            t_b = max(end[p] for p in comp)
        lm = sum((dyn.get(p, instrs[p][1]["m"])) * instrs[p][1]["k"] * instrs[p][1]["n"]
                 for p in comp if instrs[p][0] == Opcode.MATMUL)
        lb = 0
        for p in range(pc, nxt):
            op, f = instrs[p]
            if op == Opcode.LOAD:
                es = _ES[f["dtype"].value]
                lb += f["run"] * es * f["n0"] * f["n1"] * f["n2"]
        info = dict(meta_layers[lid])
        cyc = max(t_b - t_a, 1)
        info.update(cycles=int(cyc), macs_executed=int(lm), dram_bytes=int(lb),
                    utilisation=float(lm / (cfg.macs * cyc)))
        layers.append(info)
    return layers


# ---- v2 (the decoupled RTL: hw/accel_v2.py) ----------------------------------------------------

#: Cycles from a DISPATCH (the queue write) to the IDLE cycle in which the module can take the
#: entry (``SyncFIFOBuffered``: an entry written in cycle t is readable in cycle t + 2).
QUEUE_LATENCY = 2
#: Passes of the contention fixed point (each uses the previous pass's timeline).
V2_PASSES = 4
#: Cycles a fetch burst costs a LOAD it interrupts beyond its beats (AR handshake, the RAM's
#: turn-around).
FETCH_STEAL = 2

_TOKQ = {(0, 1): 0, (1, 0): 1, (1, 2): 2, (2, 1): 3}     # (from, to) module -> token queue


def _port_use(op, f, cfg, dur, lanes):
    """(read, write) fractions of the scratchpad's slots a COMPUTE instruction of ``dur`` RUN
    cycles takes (a STORE reads, a LOAD writes only in the others; hw/accel_v2.py). MATMUL
    reads in every slot of its run; its output writes (one line per ``k / rows`` reduction
    steps) are few and spread out, and the LOAD's byte buffer rides over them: on the v2 RTL a
    LOAD runs as fast beside a MATMUL as alone (M3ViT-tiny, zcu102), so they count 0. The row
    units read one chunk of ``lanes`` words of each operand and write one chunk per row pass,
    so short rows leave more free slots."""
    if dur <= 0:
        return 0.0, 0.0
    if op == Opcode.MATMUL:
        return 1.0, 0.0
    chunks = _cdiv(f.get("n", 1), lanes) * f.get("m", 1)
    if op == Opcode.VEC:
        return min(1.0, 1.5 * chunks / dur), min(1.0, chunks / dur)
    if op in (Opcode.SOFTMAX, Opcode.LAYERNORM):
        return min(1.0, 2 * chunks / dur), min(1.0, 2 * chunks / dur)
    if op == Opcode.TOPK:
        return min(1.0, chunks / dur), 0.0
    return 0.0, 0.0


def _dma_runs(f, pc, prof):
    """DRAM byte address of each run of an executed LOAD/STORE (profiled, or guessed as
    :func:`v1_unit_cycles` does)."""
    runs = prof.runs.get(pc) if prof is not None else None
    if runs is None:
        runs = _strided_starts(f) if f["mode"] == DmaMode.STRIDED else _dma_guess(f)[1]
    return runs


def _dma_run(s, d, need, comp, comp_starts, side):
    """End of a DMA unit's run that starts in cycle ``s``, takes ``d`` cycles alone and uses the
    scratchpad port in ``need`` of them, against the COMPUTE runs ``comp`` (sorted, disjoint
    (start, end, read fraction, write fraction)); ``side`` 2 = reads (STORE), 3 = writes
    (LOAD)."""
    if d <= 0 or need <= 0 or not comp:
        return s + d
    u = min(1.0, need / d)
    t, left = float(s), float(d)
    i = max(bisect.bisect_right(comp_starts, s) - 1, 0)
    while i < len(comp):
        a, b = comp[i][0], comp[i][1]
        if t < a:
            if t + left <= a:
                break
            left -= a - t
            t = a
        if t < b:
            rate = min(1.0, (1.0 - comp[i][side]) / u)
            if rate > 0:
                span = (b - t) * rate
                if span >= left:
                    return int(round(t + left / rate))
                left -= span
            t = b
        i += 1
    return int(round(t + left))


def _estimate_v2(program, sim_result=None) -> Estimate:
    """Timeline of ``program`` on the v2 RTL (see the module docstring)."""
    cfg = program.config
    from vitamin.hw.ports import spad_lanes
    instrs = _decode(program)
    prof, dyn = _profile_of(sim_result)
    skipped = prof.skipped if prof is not None else set()
    lanes = spad_lanes(cfg)
    beats = max(1, 64 // cfg.bus_bytes)
    bb = cfg.bus_bytes
    n = next((pc + 1 for pc, (op, _) in enumerate(instrs) if op == Opcode.END), len(instrs))
    mod = [UNIT_OF[op].value for op, _ in instrs[:n]]
    dur = [None] * n              # RUN cycles (None: MARK, END, skipped)
    need = [0] * n                # DMA: scratchpad slots
    use = [(0.0, 0.0)] * n        # COMPUTE: (read, write) fractions of the port
    bursts = {}                   # LOAD pc -> cumulative channel cycles at each burst's end
    for pc in range(n):
        op, f = instrs[pc]
        if pc in skipped or op in (Opcode.MARK, Opcode.END):
            continue
        dur[pc] = v1_unit_cycles(op, f, cfg, pc, prof)
        if op in (Opcode.LOAD, Opcode.STORE):
            runs = _dma_runs(f, pc, prof)
            need[pc] = len(runs) * (f["run"] if f["mem"] == Mem.IDX else _cdiv(f["run"], lanes))
            if op == Opcode.LOAD:
                nbytes = f["run"] * _ES[f["dtype"].value]
                cum, c = [], 0
                for a in runs:
                    for b in _bursts(int(a), nbytes, bb):
                        c += b + 1
                        cum.append(c)
                bursts[pc] = cum
        else:
            use[pc] = _port_use(op, f, cfg, dur[pc], lanes)
    pops, pushes = [], []
    for pc in range(n):
        f, u = instrs[pc][1], mod[pc]
        pops.append([_TOKQ[(v, u)] for v, bit in ((u - 1, f["pop_prev"]), (u + 1, f["pop_next"]))
                     if bit and (v, u) in _TOKQ])
        pushes.append([_TOKQ[(u, v)] for v, bit in ((u - 1, f["push_prev"]),
                                                    (u + 1, f["push_next"]))
                       if bit and (u, v) in _TOKQ])
    order = [[pc for pc in range(n) if mod[pc] == u] for u in range(3)]
    kidx = [0] * n
    for u in range(3):
        for k, pc in enumerate(order[u]):
            kidx[pc] = k
    td, cd = cfg.token_depth, cfg.cmd_depth
    comp, comp_starts = [], []                   # previous pass: COMPUTE runs
    lpc, l_start, l_end, l_bounds = [], [], [], []   # previous pass: LOAD runs and bursts
    steals_prev = {}
    for it in range(V2_PASSES):
        D, S, R = [None] * n, [0] * n, [None] * n    # dispatch, RUN start, retire (PUSH)
        push, pop = [[], [], [], []], [[], [], [], []]
        steals = {}
        fi, fetch_at, mi, total = 0, 0, [0, 0, 0], None
        progress = True
        while progress:
            progress = False
            # fetch: FETCH at fetch_at, AR (waits for the LOAD burst the RAM serves), the beats,
            # DECODE, DISPATCH (waits for room in the queue)
            while fi < n:
                u, k = mod[fi], kidx[fi]
                room = 0
                if k >= cd:
                    r = R[order[u][k - cd]]
                    if r is None:
                        break
                    room = r + 1
                ar = fetch_at + 1
                j = bisect.bisect_right(l_start, ar) - 1
                if j >= 0 and ar < l_end[j]:
                    bd = l_bounds[j]
                    x = bisect.bisect_left(bd, ar)
                    if x < len(bd):
                        ar = int(np.ceil(bd[x]))
                    steals[lpc[j]] = steals.get(lpc[j], 0) + 1
                D[fi] = max(ar + 3 + beats, room)
                fetch_at = D[fi] + 1
                fi += 1
                progress = True
            for u in range(3):
                while mi[u] < len(order[u]):
                    pc = order[u][mi[u]]
                    if D[pc] is None:
                        break
                    g = D[pc] + QUEUE_LATENCY                 # IDLE, tokens popped
                    if mi[u]:
                        g = max(g, R[order[u][mi[u] - 1]] + 1)
                    ps = pops[pc]
                    if any(len(pop[q]) >= len(push[q]) for q in ps):
                        break
                    for q in ps:
                        g = max(g, push[q][len(pop[q])] + 1)
                    if instrs[pc][0] == Opcode.END:
                        if fi < n:
                            break
                        rest = [R[p] for p in order[0] + order[2]]
                        if any(x is None for x in rest):
                            break
                        g = max([g, D[pc] + 1] + [x + 1 for x in rest])
                        S[pc], R[pc], total = g + 1, g + 1, g + 3
                        mi[u] += 1
                        progress = True
                        continue
                    room = []
                    for q in pushes[pc]:
                        j = len(push[q]) - td
                        if j >= 0:
                            if j >= len(pop[q]):
                                room = None
                                break
                            room.append(pop[q][j] + 1)
                    if room is None:
                        break
                    for q in ps:
                        pop[q].append(g)
                    if dur[pc] is None:                       # CHECK, PUSH
                        S[pc] = g + 1
                        p = g + 2
                    else:                                     # CHECK, START, RUN, PUSH
                        s = S[pc] = g + 3
                        if u == 1 or it == 0:
                            p = s + dur[pc]
                        elif u == 0:
                            d = dur[pc] + steals_prev.get(pc, 0) * (beats + FETCH_STEAL)
                            p = _dma_run(s, d, need[pc], comp, comp_starts, 3)
                        else:
                            p = _dma_run(s, dur[pc], need[pc], comp, comp_starts, 2)
                    p = max([p] + room)
                    for q in pushes[pc]:
                        push[q].append(p)
                    R[pc] = p
                    mi[u] += 1
                    progress = True
        if total is None:
            stuck = [pc for pc in range(n) if R[pc] is None][:3]
            raise ValueError(f"cost model: dependency tokens never arrive for instructions "
                             f"{stuck}")
        comp = [(S[pc], S[pc] + dur[pc], *use[pc]) for pc in order[1] if dur[pc]]
        comp_starts = [c[0] for c in comp]
        lpc = [pc for pc in order[0] if dur[pc]]
        l_start = [S[pc] for pc in lpc]
        l_end = [R[pc] for pc in lpc]
        l_bounds = [[S[pc] + (R[pc] - S[pc]) * c / bursts[pc][-1] for c in bursts[pc]]
                    if bursts[pc] else [] for pc in lpc]
        steals_prev = steals
    start = S
    end = [R[pc] if dur[pc] is None or mod[pc] != 1 else S[pc] + dur[pc] for pc in range(n)]
    busy: dict = {}
    counters = {"cycles": int(total), "instructions": n, "skipped": 0, "marks": 0}
    for pc in range(n):
        op = instrs[pc][0]
        if pc in skipped:
            counters["skipped"] += 1
        elif op == Opcode.MARK:
            counters["marks"] += 1
        elif dur[pc] is not None:
            busy[op.name] = busy.get(op.name, 0) + (end[pc] - start[pc])
    for op in (Opcode.LOAD, Opcode.STORE, Opcode.MATMUL, Opcode.SOFTMAX, Opcode.LAYERNORM,
               Opcode.TOPK, Opcode.ROUTE, Opcode.SPANS, Opcode.VEC):
        counters[f"busy_{op.name.lower()}"] = int(busy.get(op.name, 0))
    macs, rd, wr = _traffic(instrs[:n], dyn, skipped, prof.runs if prof is not None else None)
    layers = _layers(program, instrs[:n], start, end, dyn, total, sequential=False)
    return Estimate(cycles=int(total), macs=int(macs), dram_read_bytes=int(rd),
                    dram_write_bytes=int(wr), busy={k: int(v) for k, v in busy.items()},
                    layers=layers, starts=start, ends=end, machine="v2",
                    v2_cycles=int(total), counters=counters)


# ---- data-dependent quantities: one golden-model run --------------------------------------------

@dataclass
class DynamicProfile:
    """What a program's data decides about its timing, recorded by :func:`profile_program`.

    ``dyn_m``: rows of each gathered / scattered MATMUL (its expert queue length), by pc;
    ``skipped``: pcs skipped by their predicate; ``runs``: DRAM byte address of every run of
    each executed LOAD/STORE (in the order the DMA issues them); ``spans``: the span list
    [(start, length)] read by a SPANS-mode LOAD/STORE or a SOFTMAX with ``kpos_spans``;
    ``blocks``: the block list read by SPANS; ``fault``: the golden model's fault, if any (the
    estimate then still covers the whole program).
    """
    dyn_m: dict = field(default_factory=dict)
    skipped: set = field(default_factory=set)
    runs: dict = field(default_factory=dict)
    spans: dict = field(default_factory=dict)
    blocks: dict = field(default_factory=dict)
    select: dict = field(default_factory=dict)     # SELECT: exact unit cycles, by pc
    fault: object = None


def profile_program(program, inputs=None, regs=None) -> DynamicProfile:
    """Run ``program`` on the golden model with integer ``inputs`` {name: array} and host
    ``regs`` and record its data-dependent quantities (:class:`DynamicProfile`)."""
    from vitamin.golden.isasim import Fault, Machine
    cfg = program.config
    img = program.dram_image()
    for name, v in (inputs or {}).items():
        program.write_tensor(img, name, v)
    instrs = _decode(program)
    mach = Machine(cfg, np.array(img, dtype=np.uint8, copy=True), regs)
    prof = DynamicProfile()
    seen = {}
    dma_addrs = mach._dma_addrs

    def spy(f, esize):
        d, s = dma_addrs(f, esize)
        seen["d"] = d
        return d, s

    mach._dma_addrs = spy
    try:
        for pc, (op, f) in enumerate(instrs):
            mach.pc = pc
            mach.writes = []
            if op == Opcode.MATMUL and (f["gather"] or f["scatter"]
                                        or f["out"] == OutMode.SPAD_ADD):
                if f["queue"] < cfg.max_experts:
                    prof.dyn_m[pc] = int(mach.qlen[f["queue"]])
            elif op in (Opcode.LOAD, Opcode.STORE) and f["mode"] == DmaMode.SPANS:
                cnt = int(mach.regs[f["count_reg"]]) if f["count_reg"] else f["n2"]
                prof.spans[pc] = mach.idx[f["idx_addr"]:f["idx_addr"] + max(cnt, 0)].copy()
            elif op == Opcode.SOFTMAX and f["kpos_spans"]:
                cnt = int(mach.regs[f["count_reg"]]) if f["count_reg"] else f["n_spans"]
                prof.spans[pc] = mach.idx[f["idx_addr"]:f["idx_addr"] + max(cnt, 0)].copy()
            elif op == Opcode.SPANS:
                prof.blocks[pc] = mach.idx[f["idx_addr"]:f["idx_addr"] + f["k"], 0].copy()
            elif op == Opcode.SELECT:
                prof.select[pc] = _select_profile(mach, f, cfg)
            seen.clear()
            if not mach.step(op, f):
                prof.skipped.add(pc)
                continue
            if "d" in seen:
                d = seen["d"]
                prof.runs[pc] = (d.reshape(-1, f["run"])[:, 0].copy() if d.size
                                 else np.zeros(0, dtype=np.int64))
            if op == Opcode.END:
                break
    except Fault as e:
        prof.fault = e
    return prof


def _select_profile(mach, f, cfg):
    """Exact cycles of the SELECT about to run on ``mach`` (None if it would fault)."""
    from vitamin.hw.select import select_cycles
    try:
        cnt = int(mach.regs[f["count_reg"]]) if f["count_reg"] else f["n_chunks"]
        starts = [int(a) for a in mach.idx[f["chunk_addr"]:f["chunk_addr"] + cnt, 0]]
        scores = mach.spad[f["in_addr"]:f["in_addr"] + f["limit"]]
        if len(scores) < f["limit"] or any(b <= a for a, b in zip(starts, starts[1:])):
            return None
        return int(select_cycles(cfg, f, starts, scores))
    except (IndexError, ValueError):
        return None


# ---- v1 (the RTL as built: sequential issue) ---------------------------------------------------

#: Cycles from an AR handshake to the first R beat of the simulation RAM (``sim/simtop.py``:
#: the read is issued in the cycle after the handshake, its data is valid one cycle later). The
#: DMA models below assume this RAM as well (one burst at a time, one beat per cycle).
DRAM_READ_LATENCY = 2

#: Per-instruction cycles of the row units beyond their ``row_cycles`` (check phase, FIFO and
#: pipeline fill, drain, the done cycle), measured on the RTL (tests/test_cost_v2.py,
#: tests/test_hw_rowops.py). SOFTMAX FULL adds the pipeline depth (``latency``) of
#: :class:`~vitamin.hw.softmax.SoftmaxUnit` and the buffer read of its last row's pass 2 (its
#: ``row_cycles`` already count every row's wait for ``1/s``, the last one's too), LAYERNORM
#: the pipeline depth (``latency``) of :class:`~vitamin.hw.layernorm.LayerNormUnit` (its
#: ``row_cycles`` already count every row's statistics, the last one's too). The figures
#: include the scratchpad's read latency (``hw.ports.SPAD_READ_LATENCY`` = 4; each step of it
#: adds one to VEC, TOPK and SOFTMAX FULL and two to LAYERNORM; SOFTMAX ONLINE's is in its
#: per-row figure) and the check phase of the row units' shared range-check multiplier
#: (``_shared_mul`` in hw/rowops.py).
ROW_OVERHEAD = {"VEC": 20, "SOFTMAX_FULL": 13, "SOFTMAX_ONLINE": 7, "LAYERNORM": 18, "TOPK": 12}


def fetch_cycles(cfg) -> int:
    """Cycles of the controller's FETCH_AR and FETCH_R states for one instruction (the
    ``fetch_cycles`` counter): the AR handshake, the read latency, 64 / bus_bytes beats."""
    return DRAM_READ_LATENCY + max(1, 64 // cfg.bus_bytes)


@functools.lru_cache(maxsize=8)
def _units(cfg):
    """The units of ``cfg`` whose cycle figures the v1 model uses (constructing a Component is
    cheap: nothing is elaborated)."""
    from vitamin.hw.idxops import RouteUnit
    from vitamin.hw.layernorm import LayerNormUnit
    from vitamin.hw.matmul import MatmulUnit
    from vitamin.hw.ports import spad_lanes
    from vitamin.hw.rowops import LayerNormRowUnit, SoftmaxRowUnit, TopKUnit, VecUnit
    from vitamin.hw.softmax import SoftmaxUnit
    units = {"matmul": MatmulUnit(cfg), "vec": VecUnit(cfg), "topk": TopKUnit(cfg),
             "softmax": SoftmaxRowUnit(cfg), "sm_core": SoftmaxUnit(cfg),
             "layernorm": LayerNormRowUnit(cfg), "ln_core": LayerNormUnit(cfg),
             "route": RouteUnit(cfg)}
    for u in units.values():
        _never_elaborated(u)
    return {**units, "lanes": spad_lanes(cfg)}


def _never_elaborated(obj, seen=None):
    """These components only answer cycle questions: say so to Amaranth, which otherwise warns
    (UnusedElaboratable) about each of them and their sub-components at exit."""
    from amaranth.hdl import Elaboratable
    seen = set() if seen is None else seen
    if id(obj) in seen or not isinstance(obj, Elaboratable):
        return
    seen.add(id(obj))
    obj._MustUse__silence = True
    for v in vars(obj).values():
        _never_elaborated(v, seen)


def _kpos_walk(spans, n, lanes) -> int:
    """Cycles of the key-span walk of ``SoftmaxRowUnit`` (hw/rowops.py, states WALK_RD,
    WALK_W, WALK_LD, WALK_EX): one span read, the read's second cycle and the load per span,
    one cycle per line piece it fills."""
    cyc = pos = lane = t = 0
    while True:
        cyc += 1                                    # WALK_RD
        if pos >= n or t == len(spans):
            return cyc
        cyc += 2                                    # WALK_W, WALK_LD
        rem = max(0, int(spans[t][1]))
        t += 1
        while True:
            cyc += 1                                # WALK_EX
            if rem == 0:
                break
            take = min(rem, lanes - lane, n - pos)
            full = lane + take == lanes or pos + take == n
            rem -= take
            pos += take
            lane = 0 if full else lane + take
            if rem == 0 or pos >= n:
                break


def _spans_cycles(f, blocks, idx_entries) -> int:
    """Cycles of ``SpansUnit`` (hw/idxops.py) for block list ``blocks``: CHECK, LOAD of the
    list, one or two walks (scans of the list, ``SPANS_STEP_CYCLES`` per step, FLUSH and
    WALKED), the register writes and done. Replicates the walk; ``SpansUnit.max_cycles``
    bounds it."""
    from vitamin.hw.idxops import SPANS_STEP_CYCLES
    lst = [int(b) for b in blocks if b >= 0]
    sink, dlo_f, dn = f["sink"], f["diag_lo"], f["diag_n"]
    block, limit = f["block"], f["limit"]
    dlo, dend = max(dlo_f, 0), dlo_f + dn

    def smallest(x):
        c = [b for b in lst if b >= x]
        return min(c) if c else None

    x, rescans, steps = 0, 0, 0
    lo = smallest(0)
    while True:
        steps += 1
        pieces = []
        if x < sink:
            pieces.append((x, sink))
        if x < dend and dlo < dend:
            pieces.append((max(x, dlo), dend))
        if lo is not None:
            pieces.append((lo, lo + 1))
        if not pieces:
            break
        s = min(p[0] for p in pieces)
        e = max(p[1] for p in pieces if p[0] == s)
        if s * block >= limit:
            break
        x = e
        if lo is not None and lo < e:
            rescans += 1
            lo = smallest(x)
    n_l = len(lst)
    walk = (1 + rescans) * (n_l + 2 if n_l else 1) + SPANS_STEP_CYCLES * steps + 2
    walks = 1 if f["out_addr"] + n_l + 2 <= idx_entries else 2
    k = f["k"]
    return 1 + (k + 3 if k else 1) + walks * walk + 3


# -- DMA (hw/dma.py against the simulation RAM of sim/simtop.py) --------------------------------

def _bursts(addr, nbytes, bb):
    """Beats of each INCR burst of a run (``hw/dma.py`` ``_burst_beats``: at most 256 beats,
    never across 4 KiB)."""
    out = []
    lim = min(256, 4096 // bb)
    a, end = addr, addr + nbytes
    while a < end:
        al = a & ~(bb - 1)
        beats = min(_cdiv(end - al, bb), (4096 - (al & 4095)) // bb, lim)
        out.append(beats)
        a = al + beats * bb
    return tuple(out)


@functools.lru_cache(maxsize=65536)
def _load_run(off, bursts, nbytes, n, es, lanes, bb, chunk, is_idx, lead=0):
    """One run through ``LoadUnit``'s data path, from the take of its first beat (cycle 0),
    whose read was issued in cycle ``-1 - lead``: R beats -> byte buffer (``cap = bb + chunk``
    bytes) -> one element chunk per cycle. The RAM issues the next read of a burst when the
    previous beat is taken (its output register is free), and accepts the next burst's AR the
    cycle after the previous burst's last read, so a burst boundary costs one idle beat slot
    unless the data path is slower. Returns the cycles in which the last beat is valid, is
    taken, the last element is written and the last burst's AR is accepted."""
    cap = bb + chunk
    cnt, rx, el, first = 0, nbytes, n, True
    total = sum(bursts)
    bi = bj = taken = 0
    rd = -1 - lead                  # read cycle of the next beat
    t = last_valid = last_take = last_emit = final_ar = 0
    while el > 0:
        k = 1 if is_idx else min(el, lanes)
        need = k * es
        emit = cnt >= need
        nb = 0
        if taken < total and t > rd and rx > 0 and cnt + bb <= cap:
            nb = min(rx, bb - (off if first else 0))
            first = False
            last_valid, last_take = rd + 1, t
            taken += 1
            bj += 1
            if bj == bursts[bi] and taken < total:
                final_ar = rd + 1
                bi, bj, rd = bi + 1, 0, max(rd + 2, t)
            else:
                rd = t
            rx -= nb
        if emit:
            cnt -= need
            el -= k
            last_emit = t
        cnt += nb
        t += 1
    return last_valid, last_take, last_emit, final_ar


def _seq_strided(n_runs):
    """DmaSequencer, STRIDED: the first run is offered ``STRIDED_FIRST`` cycles after start
    (field and range checks), one run per cycle after that."""
    from vitamin.hw.dma import DmaSequencer
    return DmaSequencer.STRIDED_FIRST, ["e"] * n_runs, None


def _seq_spans(f, spans):
    """DmaSequencer, SPANS: (cycle of the first step after CMP, steps, None) where a step is
    'r' (G_RD: a span-list read), 'c' (one cycle) or 'e' (G_EMIT: one run, waits for
    ``ready``); or (None, None, cycles) when no run is generated."""
    from vitamin.hw.dma import DmaSequencer as Seq
    c = len(spans)
    total = int(sum(max(0, int(b)) for _, b in spans)) if c else 0
    scan = c + Seq.SCAN_TAIL if c else 1
    if c == 0:
        return None, None, Seq.SPANS_EMPTY
    if total == 0:
        return None, None, Seq.SPANS_NO_ROWS + scan
    steps = []
    for _ in range(f["n1"]):
        q = total
        for _, ln in spans:
            ln = int(ln)
            # G_RD, G_RD2, G_SPAN, G_MUL
            steps += ["r"] + ["c"] * (Seq.SPANS_READ_STEPS - 1) + ["c"]
            if ln > 0 and q > 0:
                rows = min(ln, q)
                steps += ["c"] * Seq.SPANS_ROW_WAIT + ["e"] * rows  # G_WAIT0..G_ROW, G_EMITs
                q -= rows
            steps.append("c")
    return Seq.SPANS_FIRST + scan, steps, None


def _load_cycles(f, starts, cfg, lanes, seq):
    """LoadUnit: start -> done. The runs flow sequencer -> two-entry run queue -> AR issuer
    (one run in flight, a 4-deep run FIFO) -> RAM -> data path (one run at a time)."""
    first, steps, empty = seq
    if first is None or len(starts) == 0:
        return empty if empty is not None else 13
    bb = cfg.bus_bytes
    chunk = max(2 * lanes, 8)
    es = _ES[f["dtype"].value]
    is_idx = f["mem"] == Mem.IDX
    run = f["run"]
    nbytes = run * es
    # cycles of non-emit steps before each run, and after the last one
    gaps, pend = [], 0
    for s in steps:
        if s == "e":
            gaps.append(pend)
            pend = 0
        else:
            pend += 1
    tail = pend
    acc = gen = None
    ar_free = ram_idle = last_emit = last_take = -(1 << 40)
    pops, accs = [], []
    for i, a in enumerate(starts):
        a = int(a)
        # the sequencer hands run i to the two-entry run queue (``runslice``) in cycle gen,
        # once run i - 2 has left it; the AR issuer sees it the cycle after
        gen = first + gaps[0] if i == 0 else gen + 1 + gaps[i]
        if i >= 2:
            gen = max(gen, accs[i - 2] + 1)
        offer = gen + 1
        acc = max(offer, ar_free)                 # the AR issuer takes one run at a time
        if i >= 4:
            acc = max(acc, pops[i - 4] + 1)        # ... and the 4-deep run FIFO must have room
        ar_hs = max(acc + 1, ram_idle)
        # the first read: after the AR, once the previous run's last beat is taken
        rd = max(ar_hs + 1, last_take)
        have = max(acc + 3, last_emit + 2)          # the data path loads the run descriptor
        pops.append(have - 1)
        t0 = max(rd + 1, have)
        bursts = _bursts(a, nbytes, bb)
        # how long the first beat waited matters only when the first burst is one beat long
        lead = min(t0 - rd - 1, 2) if len(bursts) > 1 and bursts[0] == 1 else 0
        lv, lt, le, far = _load_run(a % bb, bursts, nbytes, run, es, lanes, bb, chunk, is_idx,
                                    lead)
        # the RAM takes the next AR the cycle after this run's last read (for a one-beat run
        # that read is the first one, which may have waited for the data path)
        ram_idle = rd + 1 if bursts == (1,) else t0 + lv
        last_take = t0 + lt
        last_emit = t0 + le
        ar_free = (t0 + far if len(bursts) > 1 else ar_hs) + 1
        accs.append(acc)
    return max(last_emit + 2, gen + 2 + tail)     # the write queue: +1 after the last emit


class _SyncFifo:
    """amaranth ``SyncFIFO(depth)``: an entry written in cycle t can be read in cycle t + 1;
    ready and valid are functions of the level alone."""

    def __init__(self, depth):
        self.items, self.depth = [], depth

    def r_rdy(self):
        return bool(self.items)

    def w_rdy(self):
        return len(self.items) != self.depth

    def empty(self):
        return not self.items

    def tick(self, r_en, item):
        if r_en:
            self.items.pop(0)
        if item is not None:
            self.items.append(item)


class _Fifo:
    """amaranth ``SyncFIFOBuffered(depth)``: an output register and ``depth - 1`` entries; an
    entry written in cycle t can be read in cycle t + 2."""

    def __init__(self, depth):
        self.inner, self.out, self.depth = [], None, depth

    def r_rdy(self):
        return self.out is not None

    def w_rdy(self):
        return len(self.inner) != self.depth - 1

    def empty(self):
        return self.out is None and not self.inner

    def tick(self, r_en, item):
        rd = self.out is not None and r_en
        inner_rd = bool(self.inner) and (self.out is None or r_en)
        if rd:
            self.out = None
        if inner_rd:
            self.out = self.inner.pop(0)
        if item is not None:
            self.inner.append(item)


def _store_cycles(f, starts, cfg, lanes, seq):
    """StoreUnit: start -> done, cycle by cycle (hw/dma.py): two-entry run queue -> run
    FIFOs -> AW issuer (bursts; the RAM takes one AW, its W beats and the B response at a
    time) and chunk reader (``lanes`` words per read, 5 credits) -> chunk FIFO -> byte packer
    -> W beats."""
    from vitamin.hw.dma import StoreUnit
    from vitamin.hw.ports import SPAD_READ_LATENCY
    first, steps, empty = seq
    if first is None or len(starts) == 0:
        return empty if empty is not None else 13
    bb = cfg.bus_bytes
    chunk = max(2 * lanes, 8)
    cap = bb + chunk
    es = _ES[f["dtype"].value]
    is_idx = f["mem"] == Mem.IDX
    run = f["run"]
    nbytes = run * es
    lat = StoreUnit.IDX_DATA_LATENCY if is_idx else SPAD_READ_LATENCY
    depth = SPAD_READ_LATENCY + 3
    sl = _SyncFifo(2)                # the sequencer's two-entry run queue (``runslice``)
    awq, rdq, wq, bq, cq = _Fifo(4), _Fifo(4), _Fifo(4), _Fifo(8), _Fifo(depth)
    n_runs = len(starts)
    nxt = si = 0
    step_t = first
    gen_done_t = None
    aw_busy, aw_bursts = False, []
    r_have, r_left, credits, pipe = False, 0, depth, [None] * lat
    w_have = w_first = False
    w_off = tx_left = acc_left = cnt = beat_no = 0
    w_active = b_pend = False
    outstanding = 0
    t = 0
    while True:
        st = steps[si] if (si < len(steps) and t >= step_t) else None
        gen = st == "e" and sl.w_rdy()
        push = sl.r_rdy() and awq.w_rdy() and rdq.w_rdy()
        aw_pop = not aw_busy and awq.r_rdy() and wq.w_rdy()
        aw_go = aw_busy and bq.w_rdy() and not w_active and not b_pend
        b_go = b_pend
        rd_pop = not r_have and rdq.r_rdy()
        k = 1 if is_idx else min(r_left, lanes)
        issue = r_have and credits != 0 and st != "r"
        arr = pipe[-1]
        wq_pop = not w_have and wq.r_rdy()
        nb = min(tx_left, bb - (w_off if w_first else 0))
        w_go = w_have and tx_left != 0 and cnt >= nb and bq.r_rdy() and w_active
        wlast = w_go and beat_no + 1 == bq.out
        take = w_have and cq.r_rdy() and acc_left != 0 and cnt + cq.out <= cap
        if (gen_done_t is not None and t >= gen_done_t and sl.empty() and awq.empty()
                and rdq.empty()
                and not aw_busy and not r_have and cq.empty() and not w_have and wq.empty()
                and bq.empty() and outstanding == 0 and all(p is None for p in pipe)):
            return t
        g_item = q_item = wq_item = bq_item = cq_item = None
        if gen:
            g_item = int(starts[nxt])
            nxt += 1
        if push:
            q_item = sl.items[0]
        if st is not None and (st != "e" or gen):
            si += 1
            step_t = t + 1
            if si == len(steps):
                gen_done_t = t + 2
        if aw_pop:
            a = awq.out
            aw_busy, aw_bursts = True, list(_bursts(a, nbytes, bb))
            wq_item = (a % bb, nbytes)
        w_active_next = w_active
        if aw_go:
            bq_item = aw_bursts.pop(0)
            aw_busy = bool(aw_bursts)
            w_active_next = True
        if b_go:
            b_pend = False
        if wlast:
            w_active_next, b_pend = False, True
        outstanding += int(aw_go) - int(b_go)
        if rd_pop:
            r_have, r_left = True, run
        if issue:
            r_left -= k
            r_have = r_left != 0
        credits += int(take) - int(issue)
        if arr is not None:
            cq_item = arr
        pipe = [k * es if issue else None] + pipe[:-1]
        added = cq.out if take else 0
        if take:
            acc_left -= cq.out
        if w_go:
            tx_left -= nb
            w_first = False
            beat_no = 0 if wlast else beat_no + 1
            w_have = tx_left != 0
        cnt += added - (nb if w_go else 0)
        if wq_pop:
            w_have, w_first = True, True
            w_off, tx_left = wq.out
            acc_left = tx_left
        sl.tick(push, g_item)
        awq.tick(aw_pop, q_item)
        rdq.tick(rd_pop, q_item)
        wq.tick(wq_pop, wq_item)
        bq.tick(wlast, bq_item)
        cq.tick(take, cq_item)
        w_active = w_active_next
        t += 1
        if nxt > n_runs or t > 1 << 34:          # pragma: no cover - a modelling error
            raise RuntimeError("cost model: STORE model did not finish")


def _strided_starts(f, regs=None):
    """DRAM byte address of each run of a STRIDED LOAD/STORE, in issue order (i0 fastest)."""
    blk = 0
    if f["blk_reg"]:
        blk = int((regs or {}).get(f["blk_reg"], 0)) * f["blk_stride"]
    i2, i1, i0 = np.meshgrid(np.arange(f["n2"]), np.arange(f["n1"]), np.arange(f["n0"]),
                             indexing="ij")
    return (f["dram_addr"] + blk + i2 * f["ds2"] + i1 * f["ds1"] + i0 * f["ds0"]).reshape(-1)


def _dma_guess(f):
    """Span list and run addresses of a SPANS-mode LOAD/STORE without a profile: ``n2`` spans
    (1 with a count register) of one row each, rows 0, 1, ..."""
    cnt = 1 if f["count_reg"] else f["n2"]
    spans = np.array([(i, 1) for i in range(cnt)], dtype=np.int64).reshape(-1, 2)
    rows = np.arange(cnt)
    starts = (f["dram_addr"] + np.arange(f["n1"])[:, None] * f["ds1"]
              + rows[None, :] * f["ds0"]).reshape(-1)
    return spans, starts


def v1_unit_cycles(op, f, cfg, pc=None, prof=None) -> int:
    """Cycles from the unit's ``start`` to its ``done`` (the ``busy_<op>`` counter) of one
    executed instruction at ``pc`` on the v1 RTL; 0 for MARK and END (the controller runs them).

    ``prof`` (:class:`DynamicProfile`) supplies the data-dependent quantities. Without it: a
    gathered MATMUL processes ``m`` rows, a SOFTMAX key-span list is one span of ``n``
    positions, a SPANS block list is 0 .. k-1, a SPANS-mode LOAD/STORE has ``n2`` one-row spans
    (one with a count register), and a ``blk_reg`` register holds 0."""
    u = _units(cfg)
    C = _cdiv(f.get("n", 1), cfg.row_lanes)
    if op == Opcode.MATMUL:
        rows = prof.dyn_m.get(pc) if prof is not None else None
        return u["matmul"].cycles(f, rows)
    if op == Opcode.VEC:
        return (u["vec"].row_cycles(f["op"], f["n"], max(f["group"], 1)) * f["m"]
                + ROW_OVERHEAD["VEC"])
    if op == Opcode.TOPK:
        # a row's last chunk waits until the previous row's k entries are written; the last
        # row's entries follow its last chunk
        return ((f["m"] - 1) * u["topk"].row_cycles(f["n"], f["k"]) + C + f["k"]
                + ROW_OVERHEAD["TOPK"])
    if op == Opcode.SOFTMAX:
        cyc = u["softmax"].row_cycles(f["mode"], f["n"], f["last"]) * f["m"]
        if f["mode"] == SmMode.FULL:
            cyc += u["sm_core"].latency + 1 + ROW_OVERHEAD["SOFTMAX_FULL"]
        else:
            cyc += ROW_OVERHEAD["SOFTMAX_ONLINE"]
        if f["kpos_spans"]:
            spans = prof.spans.get(pc) if prof is not None else None
            if spans is None:
                spans = [(0, f["n"])]
            cyc += _kpos_walk(spans, f["n"], cfg.row_lanes)
        return cyc
    if op == Opcode.LAYERNORM:
        return (u["layernorm"].row_cycles(f["n"]) * f["m"] + C * u["layernorm"].param_reads
                + u["ln_core"].latency + ROW_OVERHEAD["LAYERNORM"])
    if op == Opcode.ROUTE:
        return u["route"].cycles(f["m"], f["k"], f["n_experts"])
    if op == Opcode.SELECT:
        cyc = prof.select.get(pc) if prof is not None else None
        if cyc is None:      # no profile: equal chunks, every candidate chunk taken
            from vitamin.hw.select import SelectUnit
            n = f["n_chunks"]
            lim = min(f["limit"], f["seq"])
            lens = [max(1, lim // max(n, 1))] * n if lim else []
            cyc = SelectUnit.cycles(cfg, n, lens, len(lens))
        return int(cyc)
    if op == Opcode.SPANS:
        blocks = prof.blocks.get(pc) if prof is not None else None
        if blocks is None:
            blocks = np.arange(f["k"])
        return _spans_cycles(f, blocks, cfg.idx_entries)
    if op in (Opcode.LOAD, Opcode.STORE):
        starts = prof.runs.get(pc) if prof is not None else None
        if f["mode"] == DmaMode.STRIDED:
            if starts is None:
                starts = _strided_starts(f)
            seq = _seq_strided(len(starts))
        else:
            spans = prof.spans.get(pc) if prof is not None else None
            if spans is None or starts is None:
                spans, starts = _dma_guess(f)
            seq = _seq_spans(f, spans)
        model = _load_cycles if op == Opcode.LOAD else _store_cycles
        return int(model(f, starts, cfg, u["lanes"], seq))
    return 0


def _estimate_v1(program, sim_result=None, other=True) -> Estimate:
    """Timeline of ``program`` on the v1 RTL (see the module docstring)."""
    cfg = program.config
    instrs = _decode(program)
    prof, dyn = _profile_of(sim_result)
    skipped = prof.skipped if prof is not None else set()
    fetch = fetch_cycles(cfg)
    n = len(instrs)
    start, end = [0] * n, [0] * n
    busy: dict = {}
    counters = {"fetch_cycles": 0, "instructions": 0, "skipped": 0, "marks": 0}
    t = 0
    for pc, (op, f) in enumerate(instrs):
        # FETCH, FETCH_AR + FETCH_R (the fetch_cycles counter), DECODE
        cyc = 1 + fetch + 1
        counters["fetch_cycles"] += fetch
        counters["instructions"] += 1
        if pc in skipped:
            counters["skipped"] += 1
        elif op == Opcode.MARK:
            counters["marks"] += 1
        elif op != Opcode.END:
            u = v1_unit_cycles(op, f, cfg, pc, prof)
            busy[op.name] = busy.get(op.name, 0) + u
            cyc += 1 + u                            # DISPATCH, then RUN until done
        start[pc], end[pc] = t, t + cyc
        t += cyc
        if op == Opcode.END:
            break
    total = t
    counters["cycles"] = total
    for op in (Opcode.LOAD, Opcode.STORE, Opcode.MATMUL, Opcode.SOFTMAX, Opcode.LAYERNORM,
               Opcode.TOPK, Opcode.ROUTE, Opcode.SPANS, Opcode.VEC):
        counters[f"busy_{op.name.lower()}"] = int(busy.get(op.name, 0))
    macs, rd, wr = _traffic(instrs, dyn, skipped, prof.runs if prof is not None else None)
    layers = _layers(program, instrs, start, end, dyn, total, sequential=True)
    v2 = _estimate_v2(program, sim_result).cycles if other else None
    return Estimate(cycles=int(total), macs=int(macs), dram_read_bytes=int(rd),
                    dram_write_bytes=int(wr), busy={k: int(v) for k, v in busy.items()},
                    layers=layers, starts=start, ends=end, machine="v1",
                    v2_cycles=v2, counters=counters, v1_cycles=int(total))
