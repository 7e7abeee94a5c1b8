"""Behavioural model of a x16 SDR SDRAM (4 banks) for the Amaranth simulator, with timing checks.

:class:`SdramModel` is driven once per clock edge with the pins the controller presents
(:meth:`edge`) and returns the value of ``dq`` for the next edge. It keeps the data, the state
of each bank and the mode register, and records every violation of the protocol in
:attr:`SdramModel.violations` (command before initialisation, ACTIVE to an open bank or before
tRP/tRC/tRFC, READ/WRITE to a closed bank or before tRCD, REFRESH with a bank open, more than
``max_postponed`` refreshes owed, bus contention, burst length or CAS latency not supported).
The refresh count starts at the first AUTO REFRESH after the mode register is loaded.
Reads return data exactly ``CAS latency`` edges after the READ (burst length 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["SdramModel", "ModelTiming"]


@dataclass(frozen=True)
class ModelTiming:
    """The part's limits in cycles (independent of the controller's settings)."""
    t_rp: int = 2
    t_rcd: int = 2
    t_rc: int = 6
    t_rfc: int = 6
    t_wr: int = 2
    t_mrd: int = 2
    refresh_interval: int = 400  # average cycles per AUTO REFRESH (tREFI)
    max_postponed: int = 8       # refreshes that may be owed at any time (JEDEC: 8)
    init_min: int = 10         # NOP cycles required after power-up


@dataclass
class _Bank:
    row: int | None = None
    act_at: int = -10**9
    ready_at: int = 0          # earliest ACTIVE


@dataclass
class SdramModel:
    row_bits: int
    col_bits: int
    timing: ModelTiming = field(default_factory=ModelTiming)

    def __post_init__(self):
        self.data = {}
        self.banks = [_Bank() for _ in range(4)]
        self.now = -1
        self.cl = None
        self.init_refreshes = 0
        self.precharged_all = False
        self.last_refresh = None
        self.refreshes = 0
        self.reads = self.writes = self.activates = 0
        self.violations = []
        self._late = False
        self.first_refresh = None
        self._out = {}             # edge -> word the SDRAM drives before it
        self._write = None         # (edge, bank, row, col, auto_pre) of the second word

    def _bad(self, msg):
        self.violations.append(f"cycle {self.now}: {msg}")

    def _addr(self, bank, row, col):
        return ((row << 2 | bank) << self.col_bits) | col

    def edge(self, *, cs, ras, cas, we, ba, a, dq_o, dq_oe, dqm, cke=1):
        """Process the pins sampled at one clock edge; returns dq for the next edge (or None
        when the SDRAM does not drive it)."""
        self.now += 1
        n, t = self.now, self.timing
        if dq_oe and n in self._out:
            self._bad("bus contention: controller drives dq while the SDRAM does")
        if self._write is not None and self._write[0] == n:
            _, bank, row, col, auto = self._write
            self._store(bank, row, col, dq_o, dqm, dq_oe)
            self._write = None
        if cs and cke:
            c = (ras, cas, we)
            if c == (1, 0, 0):
                self._activate(ba, a)
            elif c == (0, 1, 0):
                self._access(ba, a, read=True, dq_o=dq_o, dq_oe=dq_oe, dqm=dqm)
            elif c == (0, 1, 1):
                self._access(ba, a, read=False, dq_o=dq_o, dq_oe=dq_oe, dqm=dqm)
            elif c == (1, 0, 1):
                banks = range(4) if a >> 10 & 1 else [ba]
                for b in banks:
                    bk = self.banks[b]
                    if bk.row is not None:
                        bk.ready_at = max(bk.ready_at, n + t.t_rp, bk.act_at + t.t_rc)
                    bk.row = None
                if a >> 10 & 1 and self.cl is None:
                    self.precharged_all = True
            elif c == (1, 1, 0):
                self._refresh()
            elif c == (1, 1, 1):
                if any(b.row is not None for b in self.banks):
                    self._bad("LOAD MODE with a bank open")
                bl, cl = a & 7, a >> 4 & 7
                if bl != 1:
                    self._bad(f"burst length code {bl} (the model supports 2 only)")
                if cl not in (2, 3):
                    self._bad(f"CAS latency {cl}")
                if self.init_refreshes < 2 or not self.precharged_all:
                    self._bad("LOAD MODE before PRECHARGE ALL and two AUTO REFRESH")
                self.cl = cl
                self._mode_at = n
        elif self.cl is None and n < t.init_min and cs and (ras or cas or we):
            pass
        if self.last_refresh is not None:
            # owed refreshes: one per interval since the first, minus those issued
            owed = (n - self.first_refresh) / t.refresh_interval - self.refreshes
            if owed > t.max_postponed and not self._late:
                self._bad(f"refresh late: {owed:.1f} AUTO REFRESH owed (tREFI "
                          f"{t.refresh_interval} cycles, at most {t.max_postponed} postponed)")
                self._late = True
        return self._out.pop(n + 1, None)

    def _refresh(self):
        n, t = self.now, self.timing
        if n < t.init_min:
            self._bad(f"AUTO REFRESH {n} cycles after power-up (< {t.init_min})")
        if any(b.row is not None for b in self.banks):
            self._bad("AUTO REFRESH with a bank open")
        for b in self.banks:
            if n < b.ready_at:
                self._bad(f"AUTO REFRESH {b.ready_at - n} cycles early (tRP/tRC/tRFC)")
                break
        for b in self.banks:
            b.ready_at = n + t.t_rfc
        if self.cl is None:
            self.init_refreshes += 1
            return
        if self.last_refresh is None:
            self.first_refresh = n
        else:
            self.refreshes += 1
        self.last_refresh = n

    def _activate(self, bank, row):
        n = self.now
        bk = self.banks[bank]
        if self.cl is None:
            self._bad("ACTIVE before the mode register was loaded")
        if bk.row is not None:
            self._bad(f"ACTIVE to bank {bank} with row {bk.row} open")
        if n < bk.ready_at:
            self._bad(f"ACTIVE to bank {bank} {bk.ready_at - n} cycles early (tRP/tRC/tRFC)")
        if hasattr(self, "_mode_at") and n < self._mode_at + self.timing.t_mrd:
            self._bad("ACTIVE before tMRD")
        bk.row = row & ((1 << self.row_bits) - 1)
        bk.act_at = n
        self.activates += 1

    def _access(self, bank, a, *, read, dq_o, dq_oe, dqm):
        n, t = self.now, self.timing
        bk = self.banks[bank]
        col = a & ((1 << self.col_bits) - 1)
        auto = bool(a >> 10 & 1)
        what = "READ" if read else "WRITE"
        if bk.row is None:
            self._bad(f"{what} to closed bank {bank}")
            return
        if n < bk.act_at + t.t_rcd:
            self._bad(f"{what} {bk.act_at + t.t_rcd - n} cycles before tRCD")
        if col & 1:
            self._bad(f"{what} at odd column {col} (bursts of 2 are aligned here)")
        row = bk.row
        if read:
            if self.cl is None:
                return
            for k in range(2):
                self._out[n + self.cl + k] = self.data.get(self._addr(bank, row, col + k), 0)
            self.reads += 1
            if auto:
                bk.ready_at = max(n + 2 + t.t_rp, bk.act_at + t.t_rc)
                bk.row = None
        else:
            self._store(bank, row, col, dq_o, dqm, dq_oe)
            self._write = (n + 1, bank, row, col + 1, auto)
            self.writes += 1
            if auto:
                bk.ready_at = max(n + 1 + t.t_wr + t.t_rp, bk.act_at + t.t_rc)
                bk.row = None

    def _store(self, bank, row, col, dq_o, dqm, dq_oe):
        if not dq_oe:
            self._bad("WRITE data not driven")
            return
        addr = self._addr(bank, row, col)
        old = self.data.get(addr, 0)
        lo = old & 0xFF if dqm & 1 else dq_o & 0xFF
        hi = old & 0xFF00 if dqm & 2 else dq_o & 0xFF00
        self.data[addr] = lo | hi

    def read_bytes(self, byte_addr, n) -> bytes:
        """Contents as the controller maps them (half-word address = byte address >> 1)."""
        out = bytearray()
        for b in range(byte_addr, byte_addr + n):
            h = b >> 1
            col = h & ((1 << self.col_bits) - 1)
            bank = h >> self.col_bits & 3
            row = h >> (self.col_bits + 2)
            w = self.data.get(self._addr(bank, row, col), 0)
            out.append(w >> 8 * (b & 1) & 0xFF)
        return bytes(out)
