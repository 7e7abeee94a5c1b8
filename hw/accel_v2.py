"""v2 control of the accelerator: decoupled LOAD / COMPUTE / STORE modules with dependency tokens.

Elaborated by :class:`vitamin.hw.accel.Accelerator` with ``issue="v2"`` (the default); the host
interface, the units, the memories, the counters and the error codes are those of v1 (see the
docstring of :mod:`vitamin.hw.accel`). What differs is the control:

Fetch
    reads instruction ``pc`` (one AXI4 burst), checks what can be checked without executing it
    (undefined opcode or enum value, a token towards a module that does not exist, a fetch beyond
    PROG_LEN or the window) and dispatches it with its pc into the queue of its module
    (``config.cmd_depth`` entries, LOAD / COMPUTE / STORE as in ``isa.UNIT_OF``); it waits while
    that queue is full, and stops after dispatching END.
Modules
    each executes its queue in order. The head instruction stays in the queue while it runs (so
    a queue of ``cmd_depth`` counts it, as ``golden.isasim.check_tokens`` does): it takes the
    tokens it pops (all at once, waiting while any of them is missing), checks its predicate,
    runs on its unit (MARK and END on the COMPUTE module itself), then puts the tokens it pushes
    (all at once, waiting while any of those queues holds ``config.token_depth``), and retires.
    END waits until fetch has stopped and the LOAD and STORE queues are empty; a token left in
    any queue then is a ``DEADLOCK`` fault at the END.
Tokens
    four up/down counters bounded by ``config.token_depth`` (LOAD->COMPUTE, COMPUTE->LOAD,
    COMPUTE->STORE, STORE->COMPUTE).
Memory ports
    the COMPUTE module's running unit owns its ports and always wins (MATMUL and the row units
    are fixed-latency pipelines without backpressure). LOAD writes the scratchpad / index memory
    and STORE reads them through the same ports in the cycles the COMPUTE unit leaves free
    (``spad_gnt``, ``idx_rd_gnt``, ``idx_wr_gnt`` of the DMA units); LOAD's span-list reads come
    before STORE's.
AXI4
    the read channel is shared by fetch (first) and LOAD: the address channel is arbitrated (a
    choice is held until its handshake), and a FIFO of the owners of accepted bursts routes the
    read data, in order (one ID). The write channel is STORE's.

Faults. A fault (of a unit, of fetch, of a predicate, of END) stops every module from starting
another instruction; the instructions already running finish (a unit cannot be aborted), and
the machine halts with the fault of the LOWEST instruction index among those reported by then
(``ERROR_PC``). In the sequential mode below this is golden's fault and state exactly; when the
modules overlap, instructions of other modules with a higher index may have completed and
queued ones with a lower index may not have run. The watchdog counts cycles in which nothing at
all progresses (no AXI handshake, memory access, token, dispatch or retirement) while a program
runs (each such cycle is counted one cycle later, a timing register) and then halts with
``WATCHDOG`` and ``ERROR_PC`` = the oldest instruction not retired
(a hung unit is left as it is: reset the accelerator).

Sequential mode. CTRL bit 2 (``CTRL_SEQUENTIAL``) with START runs the program in program order:
fetch dispatches an instruction only when every earlier one has retired, and tokens are ignored
(as v1 does; a program's token counts in program order may exceed ``token_depth``). It is the
mode of the per-instruction trace (``dbg_retire``), and of the tests that compare the state
after a fault with the golden model.
"""

from __future__ import annotations

import functools
import operator

from amaranth import Cat, Const, Module, Mux, ResetInserter, Signal, signed
from amaranth.lib import data, fifo

from vitamin import isa
from vitamin.isa import ErrorCode, Opcode, OutMode

from .dma import WINDOW_BITS, instr_view
from .mem import AccMemory, IdxMemory, RowStateMemory, Scratchpad
from .onehot import onehot_best, onehot_pick
from .ports import (
    N_REGS,
    AccPort,
    AxiRead,
    AxiWrite,
    IdxPort,
    QueuePort,
    RowStatePort,
    SpadPort,
    spad_lanes,
)

__all__ = ["elaborate_v2"]

_LOAD, _COMPUTE, _STORE = 0, 1, 2
#: token queue -> (producer module, consumer module)
_TOKQ = {"lc": (_LOAD, _COMPUTE), "cl": (_COMPUTE, _LOAD), "cs": (_COMPUTE, _STORE),
         "sc": (_STORE, _COMPUTE)}


def global_buffer(m, platform, sig, name):
    """``sig`` through the platform's global buffer, for a net with thousands of loads across
    the chip: ``platform.global_buffer(m, sig, name)`` where the platform has one (the ULX3S
    flow: an ECP5 DCCA, :mod:`vitamin.boards.flow`), else ``sig`` itself (simulation)."""
    fn = getattr(platform, "global_buffer", None)
    return sig if fn is None else fn(m, sig, name)


def record_faults(m, reports, start_pulse, f_valid, f_code, f_pc):
    """Record the oldest of the fault ``reports`` [(valid, code, pc), ...] in the registers
    ``f_valid``, ``f_code``, ``f_pc`` (kept when a report is younger than the recorded fault).
    Returns ``(any_report, rep_pending)``: a report this cycle (comb), and one registered but not
    recorded yet."""
    # The valid report with the lowest pc wins, the earlier report on a tie. All comparisons
    # run in parallel (one comparator deep, then one-hot selection): a chain of running minima
    # put five 32-bit compare-and-select stages in series, the slowest path of the whole
    # controller (26.7 MHz out of context on the LFE5U-85F).
    # The reports are registered first and selected in the next cycle (a report's condition
    # and the selection each took most of a cycle on the LFE5U-85F); ``halting`` is still set
    # in the cycle of the report, and the halt waits for the recording (``rep_pending``).
    # The reports' pcs are compared pairwise before that register too (they come from
    # registers: the fetch pc and the queue heads), so the selection after it starts from
    # registered flags (compared after it, the carry chains and the one-hot selection were
    # 10.2 ns into ``f_pc``, pre-route estimate).
    reg_reports = []
    for i, (v, c, p) in enumerate(reports):
        rv = Signal(name=f"rfault{i}")
        rc = Signal(ErrorCode, name=f"rfault{i}_code")
        rp = Signal(32, name=f"rfault{i}_pc")
        m.d.sync += [rv.eq(v & ~start_pulse), rc.eq(c), rp.eq(p)]
        reg_reports.append((rv, rc, rp))
    pc_lt = {}
    for i, (_v, _c, p_i) in enumerate(reports):
        for j, (_vj, _cj, p_j) in enumerate(reports):
            if i != j:
                pc_lt[i, j] = Signal(name=f"rfault_lt{i}_{j}")
                m.d.sync += pc_lt[i, j].eq(p_i < p_j)
    any_report = Cat(*[v for v, _c, _p in reports]).any() if reports else Const(0)
    reports = reg_reports
    rep_pending = Signal()
    m.d.comb += rep_pending.eq(Cat(*[v for v, _c, _p in reports]).any() if reports else 0)
    wins = onehot_best([(v, i) for i, (v, _c, _p) in enumerate(reports)],
                       better=lambda a, b: pc_lt[a, b])
    best_v = Signal(name="fbest_v")
    best_c = Signal(4, name="fbest_c")
    best_p = Signal(32, name="fbest_p")
    earlier = Signal(name="fbest_earlier")     # the winner is older than the recorded fault
    m.d.comb += [
        best_v.eq(Cat(*[v for v, _c, _p in reports]).any() if reports else 0),
        best_c.eq(onehot_pick(wins, [c.as_value() for _v, c, _p in reports], 4)),
        best_p.eq(onehot_pick(wins, [p for _v, _c, p in reports], 32)),
        earlier.eq(Cat(*[w & (p < f_pc) for w, (_v, _c, p) in zip(wins, reports,
                                                                   strict=True)]).any()),
    ]
    with m.If(best_v & (~f_valid | earlier)):
        m.d.sync += [f_valid.eq(1), f_code.eq(best_c), f_pc.eq(best_p)]
    return any_report, rep_pending


def elaborate_v2(accel, platform):
    from .accel import _UNIT_OPS, COUNTERS, REGISTERS, _enum_checks, host_read_map

    cfg = accel.config
    m = Module()
    start_pulse = Signal()        # the cycle a program starts (after the clear)
    start_seq = Signal()          # CTRL.SEQUENTIAL of the START write
    started = Signal()            # a program is running (until the halt)
    seq_mode = Signal()
    # ---- units ------------------------------------------------------------------------
    instances = []          # unit components, in order of first appearance
    by_factory = {}
    unit_of = {}            # opcode -> instance index
    for op in sorted(accel._units_map, key=lambda o: o.value):
        fac = accel._units_map[op]
        if fac not in by_factory:
            unit = fac(cfg)
            if "ctl" not in unit.signature.members:
                raise ValueError(f"unit {type(unit).__qualname__} has no 'ctl' port")
            by_factory[fac] = len(instances)
            instances.append(unit)
            m.submodules[f"u{len(instances) - 1}_{type(unit).__name__.lower()}"] = unit
        unit_of[op] = by_factory[fac]
    n_units = len(instances)

    def has(u, name):
        return name in u.signature.members

    # ---- state ------------------------------------------------------------------------
    regfile = Signal(data.ArrayLayout(signed(32), N_REGS))
    qsig = QueuePort(cfg)
    # the program state that START clears is reset-less: `start_clr` clears it (and is 1
    # while the domain is in reset), so its registers take one set/reset net, not an OR with
    # the reset
    qstate = Signal(qsig.members["q"].shape, reset_less=True)
    # one "queue is empty" flag per entry, written with it: the predicate selects one bit
    # from the instruction's queue field instead of comparing a selected length
    q_empty = Signal(cfg.max_experts, init=(1 << cfg.max_experts) - 1)

    prog_base = Signal(32)
    prog_len = Signal(32)
    window_reg = Signal(32)
    watchdog_lim = Signal(32, init=min(cfg.watchdog_cycles, (1 << 32) - 1))
    window = Signal(WINDOW_BITS)
    # registered: the host writes WINDOW cycles before it can write START
    m.d.sync += window.eq(Mux((window_reg == 0) | (window_reg > cfg.dram_bytes),
                              cfg.dram_bytes, window_reg))

    busy = Signal()
    done = Signal()
    clearing = Signal()
    error = Signal(ErrorCode)
    error_pc = Signal(32)
    pc = Signal(32, reset_less=True)
    last_mark = Signal(16, reset_less=True)
    marks = Signal(32, reset_less=True)
    m.d.comb += accel.irq.eq(done)
    # START's clear, registered (1 in the START cycle, and during the reset: its init value),
    # behind the platform's global buffer where it has one: about 2,100 registers, all over
    # the chip (the program state above and the performance counters)
    going_start = Signal()
    start_clr_r = Signal(init=1)
    m.d.sync += start_clr_r.eq(going_start)
    start_clr = global_buffer(m, platform, start_clr_r, "start_clr")

    load_i = unit_of.get(Opcode.LOAD)
    store_i = unit_of.get(Opcode.STORE)

    # ---- memories and their port multiplexers -----------------------------------------
    mem_kinds = [("spad", SpadPort, Scratchpad), ("acc", AccPort, AccMemory),
                 ("idx", IdxPort, IdxMemory), ("rs", RowStatePort, RowStateMemory)]
    depths = {"spad": cfg.spad_words // spad_lanes(cfg), "acc": cfg.acc_lines,
              "idx": cfg.idx_entries, "rs": cfg.rowstate_rows}
    clear_ports = {}
    mems = {}
    port_sigs = {}
    for kind, sig_cls, mem_cls in mem_kinds:
        users = [i for i, u in enumerate(instances) if has(u, kind)]
        if not users:
            continue
        # LOAD's scratchpad writes take the scratchpad's second write port (see below)
        two = kind == "spad" and load_i is not None and has(instances[load_i], kind)
        mem = mem_cls(cfg, second_writer=True) if two else mem_cls(cfg)
        m.submodules[f"mem_{kind}"] = mem
        sig = sig_cls(cfg)
        clr = sig.create(path=(f"clear_{kind}",))
        clear_ports[kind] = clr
        mems[kind] = mem
        port_sigs[kind] = sig

    # clear engine: one address per cycle in every memory, all zero data, full masks
    clr_len = max([depths[k] for k in clear_ports], default=1)
    clr_addr = Signal(range(clr_len + 1))
    for kind, clr in clear_ports.items():
        in_range = clr_addr < depths[kind]
        m.d.comb += clr.wr_en.eq(clearing & in_range)
        if kind == "spad":
            m.d.comb += [clr.wr_addr.eq(clr_addr * spad_lanes(cfg)),
                         clr.wr_mask.eq((1 << spad_lanes(cfg)) - 1)]
        else:
            m.d.comb += clr.wr_addr.eq(clr_addr)

    # register file and queues
    reg_users = [i for i, u in enumerate(instances) if has(u, "regs")]
    for i in reg_users:
        m.d.comb += instances[i].regs.regs.eq(regfile)
    q_users = [i for i, u in enumerate(instances) if has(u, "queues")]
    for i in q_users:
        m.d.comb += instances[i].queues.q.eq(qstate)

    # window, instruction word
    for u in instances:
        if has(u, "window"):
            m.d.comb += u.window.eq(window)

    # ---- counters ---------------------------------------------------------------------
    cnt = {name: Signal(64, name=f"cnt_{name}", reset_less=True) for name in COUNTERS}
    # each unit's saturation count is registered before the sum (it comes from the unit's
    # data path: a popcount of saturating lanes), so sat_events lags by two cycles
    sat_u = [Signal.like(u.ctl.sat_inc, name=f"sat_u{i}") for i, u in enumerate(instances)]
    m.d.sync += [r.eq(u.ctl.sat_inc) for r, u in zip(sat_u, instances)]
    sat_sum = sum(sat_u, Const(0, 1))
    rd_sum = sum((u.dram_rd_inc for u in instances if has(u, "dram_rd_inc")), Const(0, 1))
    wr_sum = sum((u.dram_wr_inc for u in instances if has(u, "dram_wr_inc")), Const(0, 1))
    macs_units = [u for u in instances if has(u, "macs_inc")]
    macs_sum = sum((u.macs_inc for u in macs_units), Const(0, 1))
    macs_done = Signal(48)     # controller-computed MATMUL MACs (units without macs_inc)
    # the increments are registered first (they come late in the cycle, from the DMA units'
    # grants, the units' saturation flags and MATMUL's k x n product): these counters lag
    # their events by one cycle (sat_events by two); the program ends several cycles after
    # its last unit reports done (the END instruction's fetch), so the values are complete
    incs = [Signal.like(v, name=f"inc_{k}") for k, v in
            (("sat", sat_sum), ("rd", rd_sum), ("wr", wr_sum), ("macs", macs_sum))]
    m.d.sync += [r.eq(v) for r, v in zip(incs, (sat_sum, rd_sum, wr_sum, macs_sum))]
    m.d.sync += [cnt["sat_events"].eq(cnt["sat_events"] + incs[0]),
                 cnt["dram_read_bytes"].eq(cnt["dram_read_bytes"] + incs[1]),
                 cnt["dram_write_bytes"].eq(cnt["dram_write_bytes"] + incs[2])]
    with m.If(busy):
        m.d.sync += cnt["cycles"].eq(cnt["cycles"] + 1)


    compute_ops = {op: i for op, i in unit_of.items() if op not in (Opcode.LOAD, Opcode.STORE)}
    compute_units = sorted(set(compute_ops.values()))
    if load_i is not None and load_i in compute_units or \
            store_i is not None and store_i in compute_units or \
            load_i is not None and load_i == store_i:
        raise ValueError("v2 issue needs separate LOAD, STORE and compute units")

    # The compute unit holding the compute ports, one-hot: one register per unit, so that each
    # unit's port selection starts from a register of its own that the placer can put beside
    # it (one encoded owner register, decoded beside the controller, fanned out across the chip
    # into every port multiplexer: 16-18 ns on the LFE5U-85F). At most one bit is set.
    own = {i: Signal(name=f"own_{i}") for i in compute_units}

    def set_owner(i):
        return [b.eq(j == i) for j, b in own.items()]

    clear_on = Signal()
    m.d.comb += clear_on.eq(clearing)

    # ---- memory ports: clear > compute > LOAD (writes, span reads) > STORE (reads) ---------
    for kind, mem in mems.items():
        mp = mem.port
        sig = port_sigs[kind]
        cb = sig.create(path=(f"compute_{kind}",))      # the compute module's port
        c_users = [i for i in compute_units if has(instances[i], kind)]
        for name, member in sig.members.items():
            if member.flow.name == "Out":
                # an AND-OR multiplexer: nothing when no unit holds the ports
                terms = [Mux(own[i], getattr(getattr(instances[i], kind), name), 0)
                         for i in c_users]
                if terms:
                    m.d.comb += getattr(cb, name).eq(
                        functools.reduce(operator.or_, terms))
            else:
                for i in c_users:
                    m.d.comb += getattr(getattr(instances[i], kind), name).eq(getattr(mp, name))
        clr = clear_ports[kind]
        ld = getattr(instances[load_i], kind) if (
            load_i is not None and has(instances[load_i], kind)) else None
        st = getattr(instances[store_i], kind) if (
            store_i is not None and has(instances[store_i], kind)) else None
        for port in (ld, st):
            if port is not None:
                for name, member in sig.members.items():
                    if member.flow.name == "In":
                        m.d.comb += getattr(port, name).eq(getattr(mp, name))
        # write side
        wr_names = [n for n in sig.members if n.startswith("wr_")]
        rd_names = [n for n in sig.members if n.startswith("rd_") and n != "rd_data"]
        ld_wr = ld is not None and kind in ("spad", "idx")
        ld_rd = ld is not None and kind == "idx"
        st_rd = st is not None and kind in ("spad", "idx")
        if kind == "spad" and ld_wr:
            # The COMPUTE unit's write on the first port; the clear's (with priority) or
            # LOAD's on the second. The scratchpad registers them apart and picks one after
            # its registers: clear > COMPUTE > LOAD, as for the other memories below. LOAD's
            # request is its write enable (its grant, ~cb.wr_en, only moves its queue).
            p2 = mem.port2
            for n in wr_names:
                m.d.comb += getattr(mp, n).eq(getattr(cb, n))
            m.d.comb += [p2.wr_en.eq(Mux(clear_on, clr.wr_en, instances[load_i].spad_wr_req)),
                         p2.wr_prio.eq(clear_on)]
            for n in ("wr_addr", "wr_data", "wr_mask"):
                m.d.comb += getattr(p2, n).eq(Mux(clear_on, getattr(clr, n), getattr(ld, n)))
        else:
            with m.If(clear_on):
                for n in wr_names:
                    m.d.comb += getattr(mp, n).eq(getattr(clr, n))
            with m.Elif(cb.wr_en | (not ld_wr)):
                for n in wr_names:
                    m.d.comb += getattr(mp, n).eq(getattr(cb, n))
            if ld_wr:
                with m.Else():
                    for n in wr_names:
                        m.d.comb += getattr(mp, n).eq(getattr(ld, n))
                # the same enable as the selection above (LOAD's wr_en is its request and its
                # grant, ~cb.wr_en), without LOAD's grant logic between the COMPUTE unit's
                # enable and the memory's
                m.d.comb += mp.wr_en.eq(Mux(clear_on, clr.wr_en,
                                            cb.wr_en | getattr(instances[load_i],
                                                               f"{kind}_wr_req")))
        # read side
        with m.If(cb.rd_en | (not (ld_rd or st_rd))):
            for n in rd_names:
                m.d.comb += getattr(mp, n).eq(getattr(cb, n))
        if ld_rd:
            # LOAD's request selects (its rd_en is the request and ~cb.rd_en, the first branch)
            with m.Elif(instances[load_i].idx_rd_req):
                for n in rd_names:
                    m.d.comb += getattr(mp, n).eq(getattr(ld, n))
        if st_rd:
            with m.Else():
                for n in rd_names:
                    m.d.comb += getattr(mp, n).eq(getattr(st, n))
        # grants
        if kind == "spad":
            if ld is not None:
                m.d.comb += instances[load_i].spad_gnt.eq(~cb.wr_en & ~clear_on)
            if st is not None:
                m.d.comb += instances[store_i].spad_gnt.eq(~cb.rd_en & ~clear_on)
        if kind == "idx":
            if ld is not None:
                m.d.comb += [instances[load_i].idx_wr_gnt.eq(~cb.wr_en & ~clear_on),
                             instances[load_i].idx_rd_gnt.eq(~cb.rd_en & ~clear_on)]
            if st is not None:
                m.d.comb += instances[store_i].idx_rd_gnt.eq(
                    ~cb.rd_en & ~clear_on & ~(instances[load_i].idx_rd_req if ld_rd else 0))

    # register file and queue writes: only compute units write them
    q_wr = Signal()
    q_wr_addr = Signal(qsig.members["wr_addr"].shape)
    q_wr_off = Signal(qsig.members["wr_off"].shape)
    q_wr_len = Signal(qsig.members["wr_len"].shape)
    m.d.sync += q_wr.eq(0)
    for i in reg_users:
        if i in compute_units:
            rp = instances[i].regs
            with m.If(own[i] & rp.wr_en & (rp.wr_addr != 0)):
                m.d.sync += regfile[rp.wr_addr].eq(rp.wr_data)
    # queue-state writes land one cycle later (a register between the writing unit and the
    # max_experts entries); ROUTE writes them before its TABLE state, and nothing reads them
    # while it runs
    for i in q_users:
        if i in compute_units:
            qp = instances[i].queues
            with m.If(own[i]):
                m.d.sync += [q_wr.eq(qp.wr_en), q_wr_addr.eq(qp.wr_addr),
                             q_wr_off.eq(qp.wr_off), q_wr_len.eq(qp.wr_len)]
    with m.If(q_wr):
        m.d.sync += [qstate[q_wr_addr].off.eq(q_wr_off), qstate[q_wr_addr].len.eq(q_wr_len),
                     q_empty.bit_select(q_wr_addr, 1).eq(q_wr_len == 0)]

    # ---- module queues ----------------------------------------------------------------------
    ent_layout = data.StructLayout({"instr": isa.INSTR_BITS, "pc": 32})
    queues = []
    for u in range(3):
        q = fifo.SyncFIFOBuffered(width=ent_layout.size, depth=cfg.cmd_depth)
        m.submodules[f"cmdq{u}"] = ResetInserter(start_pulse)(q)
        queues.append(q)
    heads = [data.View(ent_layout, q.r_data) for q in queues]
    head_hdr = [instr_view(isa.Header, h.instr) for h in heads]

    # unit instruction words: LOAD / STORE from their queue heads, compute units from COMPUTE's
    for i, u in enumerate(instances):
        src = _LOAD if i == load_i else _STORE if i == store_i else _COMPUTE
        m.d.comb += u.ctl.instr.eq(heads[src].instr)

    # ---- tokens -------------------------------------------------------------------------------
    tdepth = cfg.token_depth
    tok = {k: Signal(range(tdepth + 1), name=f"tok_{k}") for k in _TOKQ}
    tok_pop = {k: Signal(name=f"tok_pop_{k}") for k in _TOKQ}
    tok_push = {k: Signal(name=f"tok_push_{k}") for k in _TOKQ}
    for k in _TOKQ:
        m.d.sync += tok[k].eq(tok[k] + tok_push[k] - tok_pop[k])

    def pops_of(u, hdr):
        """[(queue, bit)] popped by the head of module ``u``."""
        out = []
        for k, (src, dst) in _TOKQ.items():
            if dst == u:
                out.append((k, hdr.pop_prev if src == u - 1 else hdr.pop_next))
        return out

    def pushes_of(u, hdr):
        out = []
        for k, (src, dst) in _TOKQ.items():
            if src == u:
                out.append((k, hdr.push_prev if dst == u - 1 else hdr.push_next))
        return out

    # ---- faults -------------------------------------------------------------------------------
    halting = Signal()            # a fault was reported: start nothing new
    f_valid = Signal()
    f_code = Signal(ErrorCode)
    f_pc = Signal(32)
    reports = []                  # (valid, code, pc), comb, collected below

    def report(valid, code, pc_):
        v = Signal(name=f"fault{len(reports)}")
        c = Signal(ErrorCode, name=f"fault{len(reports)}_code")
        p = Signal(32, name=f"fault{len(reports)}_pc")
        m.d.comb += [v.eq(valid), c.eq(code), p.eq(pc_)]
        reports.append((v, c, p))

    # ---- fetch ----------------------------------------------------------------------------------
    beats = max(1, isa.INSTR_BITS // cfg.bus_bits)
    beat_no = Signal(range(beats + 1))
    bb_log = cfg.bus_bytes.bit_length() - 1
    fetch = AxiRead(cfg.bus_bits).create(path=("fetch",))
    m.d.comb += [fetch.araddr.eq(pc << 6), fetch.arlen.eq(beats - 1), fetch.arsize.eq(bb_log),
                 fetch.arburst.eq(1), fetch.arid.eq(0)]
    finstr = Signal(isa.INSTR_BITS)
    fhdr = instr_view(isa.Header, finstr)
    enum_bad = _enum_checks(finstr)
    fetch_busy = Signal()         # a fetch burst is in flight
    fetch_stopped = Signal()      # END dispatched (or a fault): fetch is finished
    dispatched = Signal()
    fetch_fault = Signal()
    fetch_code = Signal(ErrorCode)
    report(fetch_fault, fetch_code, pc)
    modules_idle = Signal()       # every queue empty (all dispatched instructions retired)

    m.d.comb += accel.dbg_cycle.eq(cnt["cycles"][:32])

    # ---- module state machines ------------------------------------------------------------------
    mod_running = [Signal(name=f"mod{u}_running") for u in range(3)]   # a unit is started/running
    mod_busy = [Signal(name=f"mod{u}_busy") for u in range(3)]         # cycles counted busy
    retire = [Signal(name=f"mod{u}_retire") for u in range(3)]
    instr_inc = [Signal(name=f"mod{u}_count") for u in range(3)]
    skip_inc = [Signal(name=f"mod{u}_skip") for u in range(3)]
    qbits = max(1, (cfg.max_experts - 1).bit_length())

    end_ok = Signal()             # END may complete: fetch stopped, LOAD and STORE queues empty
    m.d.comb += end_ok.eq(fetch_stopped & ~queues[_LOAD].r_rdy & ~queues[_STORE].r_rdy)

    # each unit's start is a register, set by its module's CHECK (the module is in START in
    # the next cycle): the unit latches its instruction on it, and a start decoded from the
    # module's state and ``active`` reached every instruction register's enable
    start_sig = [Signal(name=f"start_{i}") for i in range(n_units)]
    for i, u in enumerate(instances):
        m.d.comb += u.ctl.start.eq(start_sig[i])
        m.d.sync += start_sig[i].eq(0)

    mark_set = Signal()
    mark_id = Signal(16)
    # END completes one cycle after its CHECK (a register between the END decode, the token
    # counts and the halt logic)
    end_fire = Signal()
    m.d.sync += end_fire.eq(0)
    wd_fire = Signal()

    # MATMUL MACs computed by the top when the unit does not count them (as v1)
    mm_unit = unit_of.get(Opcode.MATMUL)
    count_mm = mm_unit is not None and not has(instances[mm_unit], "macs_inc")
    if count_mm:
        mmf = instr_view(isa.Matmul, heads[_COMPUTE].instr)
        uses_q = mmf.gather | mmf.scatter | (mmf.out == OutMode.SPAD_ADD)
        qlen_mm = qstate[mmf.queue[:qbits]].len
        rows_mm = Mux(uses_q & (mmf.queue < cfg.max_experts), qlen_mm, mmf.m)
        mm_rows_k = Signal(33)
        m.d.sync += [mm_rows_k.eq(rows_mm * mmf.k), macs_done.eq(mm_rows_k * mmf.n)]

    m.d.sync += cnt["macs"].eq(cnt["macs"] + incs[3])
    for u in range(3):
        q, h, hdr = queues[u], heads[u], head_hdr[u]
        op = hdr.opcode.as_value()
        pops = pops_of(u, hdr)
        pushes = pushes_of(u, hdr)
        can_pop = Cat(*[~bit | (tok[k] != 0) for k, bit in pops]).all() if pops else Const(1)
        can_push = Cat(*[~bit | (tok[k] < tdepth) for k, bit in pushes]).all() if pushes \
            else Const(1)
        # the unit(s) this module starts
        if u == _LOAD:
            mine = {Opcode.LOAD: load_i} if load_i is not None else {}
        elif u == _STORE:
            mine = {Opcode.STORE: store_i} if store_i is not None else {}
        else:
            mine = compute_ops
        active = Signal(range(n_units + 1), name=f"mod{u}_unit", init=n_units)
        u_done = Signal(name=f"mod{u}_done")
        u_err = Signal(ErrorCode, name=f"mod{u}_err")
        # Only the unit this module started raises `done` (for one cycle), so the module's done
        # and error are ORs over its units, each error gated by its own unit's done: no
        # selection by `active`, whose register sits beside the controller (a path from
        # `active` out to the units and back into `halting` crossed the chip twice).
        done_or, err_or = Const(0), Const(0, len(u_err.as_value()))
        for i in sorted(set(mine.values())):
            ctl_i = instances[i].ctl
            done_or = done_or | ctl_i.done
            err_or = err_or | Mux(ctl_i.done, ctl_i.error.as_value(), 0)
        m.d.comb += [u_done.eq(done_or), u_err.eq(err_or)]
        fault = Signal(name=f"mod{u}_fault")
        fcode = Signal(ErrorCode, name=f"mod{u}_fcode")
        report(fault, fcode, h.pc)
        is_end = op == Opcode.END.value
        # the predicate, evaluated in every cycle and used in CHECK: the head does not change
        # between IDLE and CHECK, and no queue state is written then (ROUTE writes it before
        # its last state, and an instruction that depends on it waits for its token). The
        # queue-state lookup ends here in a register, not in ``own`` and ``active``.
        pred_bad = Signal(name=f"mod{u}_pred_bad")
        pred_skip = Signal(name=f"mod{u}_pred_skip")
        m.d.sync += [pred_bad.eq(hdr.pred_en & (hdr.pred_q >= cfg.max_experts)),
                     pred_skip.eq(hdr.pred_en & q_empty.bit_select(hdr.pred_q[:qbits], 1))]

        def restart():
            # a START leaves any state (after a fault a module may be anywhere); no state
            # changes on its own in the START cycle (IDLE waits for it to pass)
            with m.If(start_pulse):
                m.next = "IDLE"

        with m.FSM(name=f"mod{u}"):
            with m.State("IDLE"):
                restart()
                go = q.r_rdy & ~halting & started & ~start_pulse
                if u == _COMPUTE:
                    go = go & (~is_end | end_ok)
                with m.If(go & (seq_mode | can_pop)):
                    with m.If(~seq_mode):
                        for k, bit in pops:
                            m.d.comb += tok_pop[k].eq(bit)
                    m.next = "CHECK"
            with m.State("CHECK"):
                restart()
                m.d.comb += instr_inc[u].eq(1)
                with m.If(pred_bad):
                    m.d.comb += [fault.eq(1), fcode.eq(ErrorCode.BAD_FIELD)]
                    m.next = "STOP"
                with m.Elif(pred_skip):
                    m.d.comb += skip_inc[u].eq(1)
                    m.next = "PUSH"
                if u == _COMPUTE:
                    with m.Elif(op == Opcode.MARK.value):
                        mark = instr_view(isa.Mark, h.instr)
                        m.d.comb += [mark_set.eq(1), mark_id.eq(mark.id)]
                        m.next = "PUSH"
                    with m.Elif(is_end):
                        left = Cat(*[tok[k] != 0 for k in _TOKQ]).any() | \
                            Cat(*[bit for _, bit in pushes]).any()
                        with m.If(~seq_mode & left):
                            m.d.comb += [fault.eq(1), fcode.eq(ErrorCode.DEADLOCK)]
                        with m.Else():
                            m.d.sync += end_fire.eq(1)
                        m.next = "STOP"
                with m.Else():
                    with m.Switch(hdr.opcode):
                        for uop, i in mine.items():
                            with m.Case(uop):
                                # (a START in this cycle clears ``active``: no unit start)
                                m.d.sync += [active.eq(i), start_sig[i].eq(~start_pulse)]
                                if u == _COMPUTE:
                                    m.d.sync += set_owner(i)
                    m.next = "START"
            with m.State("START"):
                restart()
                m.d.comb += mod_running[u].eq(1)
                m.next = "RUN"
            with m.State("RUN"):
                restart()
                m.d.comb += [mod_running[u].eq(1), mod_busy[u].eq(1)]
                with m.If(u_done):
                    m.d.sync += active.eq(n_units)
                    if u == _COMPUTE:
                        # (the owner bit clears on its own unit's done: below)
                        if count_mm:
                            with m.If((op == Opcode.MATMUL.value) & (u_err == ErrorCode.OK)):
                                m.d.sync += cnt["macs"].eq(cnt["macs"] + incs[3] +
                                                           macs_done)
                    with m.If(u_err != ErrorCode.OK):
                        m.d.comb += [fault.eq(1), fcode.eq(u_err)]
                        m.next = "STOP"
                    with m.Else():
                        m.next = "PUSH"
            with m.State("PUSH"):
                restart()
                with m.If(seq_mode | can_push):
                    with m.If(~seq_mode):
                        for k, bit in pushes:
                            m.d.comb += tok_push[k].eq(bit)
                    m.d.comb += [retire[u].eq(1), q.r_en.eq(1)]
                    m.next = "IDLE"
            with m.State("STOP"):
                restart()        # halted on a fault or END
        with m.If(start_pulse):
            m.d.sync += active.eq(n_units)
        if u == _COMPUTE:
            # Each owner bit clears on its own unit's done (only the owner runs, and it raises
            # done in the module's RUN state): through the module's done, an OR over every
            # compute unit, the path from TOPK's state register into ``own_2`` crossed the chip
            # (15.8 ns, routed model of the dc9338d build).
            for i in sorted(set(mine.values())):
                with m.If(instances[i].ctl.done):
                    m.d.sync += own[i].eq(0)

    # ---- per-module busy counters ----------------------------------------------------------
    for op_ in _UNIT_OPS:
        if op_ not in unit_of:
            continue
        name = f"busy_{op_.name.lower()}"
        if op_ == Opcode.LOAD:
            cond = mod_busy[_LOAD]
        elif op_ == Opcode.STORE:
            cond = mod_busy[_STORE]
        else:
            cond = mod_busy[_COMPUTE] & (head_hdr[_COMPUTE].opcode == op_)
        with m.If(cond):
            m.d.sync += cnt[name].eq(cnt[name] + 1)
    m.d.sync += [cnt["instructions"].eq(cnt["instructions"] + sum(instr_inc)),
                 cnt["skipped"].eq(cnt["skipped"] + sum(skip_inc))]
    with m.If(mark_set):
        m.d.sync += [last_mark.eq(mark_id), marks.eq(marks + 1)]

    # retire trace: one pc per cycle (COMPUTE first); only the sequential mode is exact
    with m.If(retire[_COMPUTE]):
        m.d.comb += [accel.dbg_retire.eq(1), accel.dbg_pc.eq(heads[_COMPUTE].pc)]
    with m.Elif(retire[_LOAD]):
        m.d.comb += [accel.dbg_retire.eq(1), accel.dbg_pc.eq(heads[_LOAD].pc)]
    with m.Elif(retire[_STORE]):
        m.d.comb += [accel.dbg_retire.eq(1), accel.dbg_pc.eq(heads[_STORE].pc)]
    with m.Else():
        m.d.comb += accel.dbg_pc.eq(pc)

    # ---- AXI read: fetch and LOAD --------------------------------------------------------------
    mr = accel.m_axi_r
    base = Cat(Const(0, 12), prog_base[12:])
    ld_ax = instances[load_i].axi_r if load_i is not None and has(instances[load_i], "axi_r") \
        else None
    tagq = fifo.SyncFIFOBuffered(width=1, depth=8)        # owner of each accepted burst
    m.submodules.rtagq = ResetInserter(start_pulse)(tagq)
    ar_lock = Signal()
    ar_lsel = Signal()            # 0 fetch, 1 LOAD
    sel = Signal()
    m.d.comb += sel.eq(Mux(ar_lock, ar_lsel, ~fetch.arvalid if ld_ax is not None else 0))
    src_ar = {0: fetch, 1: ld_ax} if ld_ax is not None else {0: fetch}
    for name in ("araddr", "arlen", "arsize", "arburst", "arid", "arvalid"):
        with m.Switch(sel):
            for key, port in src_ar.items():
                with m.Case(key):
                    val = getattr(port, name)
                    if name == "araddr":
                        val = val + base
                    if name == "arvalid":
                        val = val & tagq.w_rdy
                    m.d.comb += getattr(mr, name).eq(val)
    ar_go = mr.arvalid & mr.arready
    for key, port in src_ar.items():
        m.d.comb += port.arready.eq(mr.arready & tagq.w_rdy & (sel == key))
    with m.If(mr.arvalid & ~mr.arready):
        m.d.sync += [ar_lock.eq(1), ar_lsel.eq(sel)]
    with m.If(ar_go):
        m.d.sync += ar_lock.eq(0)
    m.d.comb += [tagq.w_en.eq(ar_go), tagq.w_data.eq(sel)]
    rtag = tagq.r_data[0]
    for key, port in src_ar.items():
        for name in ("rdata", "rresp", "rlast", "rid"):
            m.d.comb += getattr(port, name).eq(getattr(mr, name))
        m.d.comb += port.rvalid.eq(mr.rvalid & tagq.r_rdy & (rtag == key))
    with m.Switch(rtag):
        for key, port in src_ar.items():
            with m.Case(key):
                m.d.comb += mr.rready.eq(port.rready & tagq.r_rdy)
    m.d.comb += tagq.r_en.eq(mr.rvalid & mr.rready & mr.rlast)
    # AXI write: STORE's
    mw = accel.m_axi_w
    if store_i is not None and has(instances[store_i], "axi_w"):
        sw = instances[store_i].axi_w
        for name, member in AxiWrite(cfg.bus_bits).members.items():
            if member.flow.name == "Out":
                val = getattr(sw, name)
                if name == "awaddr":
                    val = val + base
                m.d.comb += getattr(mw, name).eq(val)
            else:
                m.d.comb += getattr(sw, name).eq(getattr(mw, name))

    # ---- fetch FSM -----------------------------------------------------------------------------
    fu = Signal(range(3))             # module of the fetched instruction
    # DECODE registers the module as one-hot, and END: from the instruction word through the
    # opcode decode to the queue's write enable and level was the slowest path of the f892a67
    # build's routed model (20.0 ns; the queues sit away from the fetch logic)
    fsel = Signal(3)
    fend = Signal()
    fop = fhdr.opcode.as_value()
    m.d.comb += fu.eq(Mux(fop == Opcode.LOAD.value, _LOAD,
                          Mux(fop == Opcode.STORE.value, _STORE, _COMPUTE)))
    all_empty = Cat(*[~q.r_rdy for q in queues]).all()
    m.d.comb += modules_idle.eq(all_empty)
    ent = Signal(ent_layout)
    m.d.comb += [ent.instr.eq(finstr), ent.pc.eq(pc)]
    for u, q in enumerate(queues):
        m.d.comb += q.w_data.eq(ent)
    with m.FSM(name="fetch"):
        with m.State("IDLE"):
            with m.If(start_pulse):
                m.next = "FETCH"
        with m.State("FETCH"):
            with m.If(halting):
                m.next = "STOPPED"
            with m.Elif(pc >= prog_len):
                m.d.comb += [fetch_fault.eq(1), fetch_code.eq(ErrorCode.NO_END)]
                m.next = "STOPPED"
            with m.Elif(pc >= window[6:]):          # (pc + 1) * 64 > window
                m.d.comb += [fetch_fault.eq(1), fetch_code.eq(ErrorCode.DRAM_RANGE)]
                m.next = "STOPPED"
            with m.Else():
                m.d.sync += beat_no.eq(0)
                m.next = "FETCH_AR"
        with m.State("FETCH_AR"):
            m.d.comb += [fetch.arvalid.eq(1), fetch_busy.eq(1)]
            m.d.sync += cnt["fetch_cycles"].eq(cnt["fetch_cycles"] + 1)
            with m.If(fetch.arready):
                m.next = "FETCH_R"
        with m.State("FETCH_R"):
            m.d.comb += [fetch.rready.eq(1), fetch_busy.eq(1)]
            m.d.sync += cnt["fetch_cycles"].eq(cnt["fetch_cycles"] + 1)
            with m.If(fetch.rvalid):
                if beats == 1:
                    m.d.sync += finstr.eq(fetch.rdata)
                else:
                    with m.Switch(beat_no):
                        for b in range(beats):
                            with m.Case(b):
                                m.d.sync += finstr.word_select(b, cfg.bus_bits).eq(fetch.rdata)
                m.d.sync += beat_no.eq(beat_no + 1)
                with m.If(beat_no == beats - 1):
                    m.next = "DECODE"
        with m.State("DECODE"):
            known = [o for o in Opcode if o in unit_of or o in (Opcode.MARK, Opcode.END)]
            legal = Cat(*[fop == o.value for o in known]).any()
            bad_enum = Const(0, 1)
            for eop, bad in enum_bad:
                bad_enum = bad_enum | ((fop == eop.value) & bad)
            is_load, is_store = fop == Opcode.LOAD.value, fop == Opcode.STORE.value
            bad_tok = ((is_load & (fhdr.pop_prev | fhdr.push_prev)) |
                       (is_store & (fhdr.pop_next | fhdr.push_next)))
            m.d.sync += [fsel.eq(Cat(fu == u for u in range(3))),
                         fend.eq(fop == Opcode.END.value)]
            with m.If(halting):
                m.next = "STOPPED"
            with m.Elif(~legal):
                m.d.comb += [fetch_fault.eq(1), fetch_code.eq(ErrorCode.ILLEGAL_OPCODE)]
                m.next = "STOPPED"
            with m.Elif(bad_enum | bad_tok):
                m.d.comb += [fetch_fault.eq(1), fetch_code.eq(ErrorCode.BAD_FIELD)]
                m.next = "STOPPED"
            with m.Else():
                m.next = "DISPATCH"
        with m.State("DISPATCH"):
            room = Signal()
            m.d.comb += room.eq(Cat(fsel[u] & q.w_rdy for u, q in enumerate(queues)).any())
            # sequential mode: only when everything dispatched before has retired. Every queue
            # empty is enough: a module retires only its queue's head, so no retirement is in
            # progress when all queues are empty (checking the retirements here put the head's
            # token bits, the token counts and the retire decode in front of the queues' write
            # enables: 18.9 ns in the c399bc6 build's routed model)
            ok = room & (~seq_mode | modules_idle)
            with m.If(halting):
                m.next = "STOPPED"
            with m.Elif(ok):
                m.d.comb += dispatched.eq(1)
                m.d.comb += [q.w_en.eq(fsel[u]) for u, q in enumerate(queues)]
                with m.If(fend):
                    m.next = "STOPPED"
                with m.Else():
                    m.d.sync += pc.eq(pc + 1)
                    m.next = "FETCH"
        with m.State("STOPPED"):
            m.d.comb += fetch_stopped.eq(1)
            with m.If(start_pulse):
                m.next = "FETCH"

    # ---- fault collection and halt --------------------------------------------------------------
    any_report, rep_pending = record_faults(m, reports, start_pulse, f_valid, f_code, f_pc)
    with m.If(any_report):
        m.d.sync += halting.eq(1)

    # ---- watchdog ------------------------------------------------------------------------------
    progress = Signal()
    hs = [mr.arvalid & mr.arready, mr.rvalid & mr.rready, mw.awvalid & mw.awready,
          mw.wvalid & mw.wready, mw.bvalid & mw.bready, dispatched, *retire,
          *[tok_pop[k] | tok_push[k] for k in _TOKQ], *start_sig]
    # memory traffic: each compute unit's own enables and the DMA sequencers' span-list
    # reads (LOAD's and STORE's other accesses follow their AXI beats), not the memories'
    # port enables: those gather every unit's enable through the owner multiplexers
    # (prog_ev23, 12.3 ns routed, e000a2e seed 4)
    for kind in mems:
        for i in compute_units:
            if has(instances[i], kind):
                port = getattr(instances[i], kind)
                hs += [getattr(port, n) for n in ("rd_en", "wr_en") if hasattr(port, n)]
    hs += [instances[i].idx_rd_req for i in (load_i, store_i)
           if i is not None and has(instances[i], "idx_rd_req")]
    hs.append(clear_on)
    stall = Signal(32)
    running_prog = Signal()
    m.d.comb += running_prog.eq(started)
    # a cycle without progress is counted two cycles later: the enables come from every unit
    # and memory port across the chip, so each is registered where it is made, and their OR
    # is registered again
    hs_r = [Signal(name=f"prog_ev{i}") for i in range(len(hs))]
    m.d.sync += [r.eq(v) for r, v in zip(hs_r, hs, strict=True)]
    m.d.comb += progress.eq(Cat(*hs_r).any())
    running_d = Signal()
    m.d.sync += running_d.eq(running_prog)
    stall_ev = Signal()
    m.d.sync += stall_ev.eq(running_d & ~progress)
    with m.If(start_pulse):
        m.d.sync += stall.eq(0)
    with m.Elif(stall_ev):
        m.d.sync += [stall.eq(stall + 1), cnt["stall_cycles"].eq(cnt["stall_cycles"] + 1)]
    with m.Else():
        m.d.sync += stall.eq(0)
    # the limit's compare is registered (the watchdog fires a cycle later): the 32-bit compare
    # in front of the halt's multiplexers was 10.1 ns into error_pc (pre-route estimate, 635ca2e)
    wd_hit = Signal()
    m.d.sync += wd_hit.eq((watchdog_lim != 0) & (stall >= watchdog_lim))
    m.d.comb += wd_fire.eq(running_prog & wd_hit)
    # oldest instruction not retired (the watchdog's error pc). Registered, and the four
    # candidates compared in parallel: as a chain of running minima it was the controller's
    # slowest path (three 32-bit compares in series). The watchdog fires only after at least
    # 1024 cycles without progress, when nothing it looks at has changed for a long time.
    oldest = Signal(32)
    cands = [(Const(1, 1), pc)] + [(queues[u].r_rdy, heads[u].pc)
                                   for u in (_STORE, _LOAD, _COMPUTE)]
    m.d.sync += oldest.eq(onehot_pick(onehot_best(cands), [p for _v, p in cands], 32))

    # ---- halt ----------------------------------------------------------------------------------
    units_quiet = ~Cat(*mod_running).any() & ~fetch_busy

    def finish(code, epc):
        m.d.sync += [error.eq(code), error_pc.eq(epc), busy.eq(0), done.eq(1),
                     started.eq(0), *set_owner(None)]

    with m.If(running_prog):
        with m.If(wd_fire):
            finish(Mux(f_valid, f_code, ErrorCode.WATCHDOG), Mux(f_valid, f_pc, oldest))
        with m.Elif(halting & units_quiet & ~rep_pending):
            finish(f_code, f_pc)
        with m.Elif(end_fire):
            finish(ErrorCode.OK, 0)

    # ---- start / clear ---------------------------------------------------------------------------
    with m.If(start_pulse):
        m.d.sync += [halting.eq(0), f_valid.eq(0), seq_mode.eq(start_seq), ar_lock.eq(0)]
        m.d.sync += [tok[k].eq(0) for k in _TOKQ]

    # ---- AXI4-Lite slave --------------------------------------------------------------
    sl = accel.s_axil
    start_after_clear = Signal()
    b_pend = Signal()
    m.d.comb += [sl.awready.eq(sl.awvalid & sl.wvalid & ~b_pend),
                 sl.wready.eq(sl.awvalid & sl.wvalid & ~b_pend),
                 sl.bvalid.eq(b_pend), sl.bresp.eq(0)]
    wr = sl.awvalid & sl.wvalid & ~b_pend
    with m.If(wr):
        m.d.sync += b_pend.eq(1)
    with m.If(b_pend & sl.bready):
        m.d.sync += b_pend.eq(0)
    waddr = sl.awaddr[2:]
    with m.If(wr & ~busy):
        with m.Switch(waddr):
            with m.Case(REGISTERS["PROG_BASE"] >> 2):
                m.d.sync += prog_base.eq(sl.wdata)
            with m.Case(REGISTERS["PROG_LEN"] >> 2):
                m.d.sync += prog_len.eq(sl.wdata)
            with m.Case(REGISTERS["WINDOW"] >> 2):
                m.d.sync += window_reg.eq(sl.wdata)
            with m.Case(REGISTERS["WATCHDOG"] >> 2):
                m.d.sync += watchdog_lim.eq(sl.wdata)
            for r in range(1, N_REGS):
                with m.Case((REGISTERS["REG0"] >> 2) + r):
                    m.d.sync += regfile[r].eq(sl.wdata)

    # Reads take two cycles: the cycle that accepts the address registers the word of each
    # group of eight registers (an 8-way selection by the address's low bits), the next one
    # the group's word (by the registered high bits), then rvalid. In one cycle the 70-word
    # selection from araddr was eight LUTs deep (11.1 ns, the slowest path of 635ca2e's
    # pre-route estimate). The values are sampled in the accepting cycle, as before.
    r_pend = Signal()                 # a read accepted, not answered yet
    r_val = Signal()                  # rdata holds its answer (rvalid)
    rdata = Signal(32)
    m.d.comb += [sl.arready.eq(~r_pend), sl.rvalid.eq(r_val), sl.rdata.eq(rdata),
                 sl.rresp.eq(0)]
    with m.If(r_val & sl.rready):
        m.d.sync += [r_pend.eq(0), r_val.eq(0)]
    units_mask = sum(1 << op.value for op in accel.opcodes)
    read_map = host_read_map(
        cfg, units_mask, regfile, cnt, status=Cat(busy, done, clearing, Const(0, 1), error),
        error_pc=error_pc, pc=pc, prog_base=prog_base, prog_len=prog_len, window=window_reg,
        watchdog=watchdog_lim, last_mark=last_mark, marks=marks)
    word_a = sl.araddr[2:]
    groups = {}
    for off, val in read_map.items():
        groups.setdefault((off >> 2) >> 3, {})[(off >> 2) & 7] = val
    g_word = {g: Signal(32, name=f"rd_group{g}") for g in groups}
    g_sel = Signal(len(word_a) - 3, name="rd_group_sel")
    with m.If(sl.arvalid & ~r_pend):
        m.d.sync += [r_pend.eq(1), g_sel.eq(word_a[3:])]
        for g, members in groups.items():
            m.d.sync += g_word[g].eq(0)
            with m.Switch(word_a[:3]):
                for lo, val in members.items():
                    with m.Case(lo):
                        m.d.sync += g_word[g].eq(val)
    with m.If(r_pend & ~r_val):
        m.d.sync += [r_val.eq(1), rdata.eq(0)]
        with m.Switch(g_sel):
            for g in groups:
                with m.Case(g):
                    m.d.sync += rdata.eq(g_word[g])

    # ---- host control: CLEAR, START; the modules run while `started` ------------------------
    ctrl_wr = wr & (waddr == REGISTERS["CTRL"] >> 2)
    with m.FSM(name="host"):
        with m.State("IDLE"):
            with m.If(ctrl_wr & (sl.wdata[0] | sl.wdata[1])):
                m.d.sync += [done.eq(0), error.eq(ErrorCode.OK), error_pc.eq(0), busy.eq(1),
                             start_seq.eq(sl.wdata[2])]
                with m.If(sl.wdata[1]):
                    m.d.sync += [clearing.eq(1), clr_addr.eq(0),
                                 start_after_clear.eq(sl.wdata[0])]
                    m.next = "CLEAR"
                with m.Else():
                    m.d.comb += going_start.eq(1)
                    m.next = "START"
        with m.State("CLEAR"):
            m.d.sync += clr_addr.eq(clr_addr + 1)
            with m.If(clr_addr == clr_len - 1):
                m.d.sync += clearing.eq(0)
                with m.If(start_after_clear):
                    m.d.comb += going_start.eq(1)
                    m.next = "START"
                with m.Else():
                    m.d.sync += busy.eq(0)
                    m.next = "IDLE"
        with m.State("START"):
            m.d.comb += start_pulse.eq(1)
            m.d.sync += [q_empty.eq(q_empty.init), started.eq(1), seq_mode.eq(start_seq)]
            m.next = "RUN"
        with m.State("RUN"):
            with m.If(~busy):
                m.next = "IDLE"
    # last: the clear wins over every other write of these registers
    with m.If(start_clr):
        m.d.sync += [pc.eq(0), last_mark.eq(0), marks.eq(0), qstate.eq(0)]
        m.d.sync += [c.eq(0) for c in cnt.values()]
    return m
