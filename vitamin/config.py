"""The one hardware configuration.

Every part of vitamin (gateware, compiler, golden model, cost model) reads a :class:`Config`.
Derived constants are computed here and nowhere else, so that the simulator and the hardware
cannot drift.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

__all__ = ["Config", "ConfigError", "PRESETS", "get_config"]


class ConfigError(ValueError):
    """An invalid configuration; the message names the field and the limit."""


@dataclass(frozen=True)
class Config:
    """A vitamin accelerator configuration.

    Parameters
    ----------
    name : str
        Preset name, for reports only (not part of the fingerprint).
    rows, cols : int
        MAC array shape. Each cycle the array consumes ``rows`` elements of the reduction dimension
        (K) of one A row and produces a partial output line of ``cols`` elements (N).
    act_bits : int
        Activation format: signed integers saturated to ``act_bits`` bits, stored in 16-bit words
        on chip, and in ``ceil(act_bits / 8)`` bytes in DRAM.
    weight_bits : int
        Weight format in DRAM (signed); sign-extended into 16-bit scratchpad words on load.
    acc_bits : int
        Accumulator width (signed, saturating when partial sums from different instructions are
        combined). Must hold ``max_k`` products of two 16-bit words without overflow.
    spad_words : int
        Scratchpad size in 16-bit words. Holds activations, weights, channel parameter tables.
    acc_lines : int
        Accumulator memory depth in lines of ``cols`` accumulators.
    idx_entries : int
        Index memory entries (pairs of 32-bit words): top-k results, expert queues, spans.
    rowstate_rows : int
        Row-state memory depth (running max/sum of the online softmax, one entry per query row).
    max_experts : int
        Number of expert queues (MoE routing).
    max_topk : int
        Largest k of TOPK.
    row_lanes : int
        Elements per cycle of the row units (softmax, LayerNorm, top-k, vector ops). The golden
        model processes rows in chunks of this many elements, in the same order as the hardware.
    max_k : int
        Largest reduction length of one MATMUL instruction (bounds the accumulator growth).
    max_dim : int
        Largest M, N, and row length of any instruction.
    bus_bits : int
        Data width of the AXI4 master port to DRAM.
    dram_bytes : int
        Size of the accelerator's DRAM address window. Every address an instruction produces must
        lie inside it, or the accelerator halts with an address error.
    clock_mhz : float
        Nominal clock, for predicted latencies and peak GOPS.
    exp_index_bits, recip_index_bits, rsqrt_index_bits : int
        Index bits of the interpolated 2^-f, 1/x and 1/sqrt(x) tables (2^b + 1 entries each).
    gelu_step_log2 : int
        The GELU correction table has a step of 2^-gelu_step_log2.
    gelu_range : int
        The GELU correction table covers |x| in [0, gelu_range); beyond, gelu(x) = relu(x).
    watchdog_cycles : int
        A handshake stalled this long is reported as a watchdog error instead of hanging.
    cmd_depth : int
        Depth of each module's instruction queue. Fetch dispatches in program order and stalls
        when the target queue is full; the golden model checks that no program deadlocks on it.
    token_depth : int
        Depth of each dependency-token queue between two modules (a push stalls when full).
    epi_lanes : int
        Columns the MATMUL epilogue (requantisation, GELU, residual, online-softmax and MoE
        scaling: about 12 multipliers per column) computes per cycle; 0 means ``cols``. With
        fewer lanes the epilogue takes ``cols / epi_lanes`` cycles per output line and the
        MATMUL sequencer spaces the rows of an epilogue's last K slice that far apart. It changes
        cycle counts and multipliers, never results, so it is not part of the fingerprint.
    """

    name: str
    rows: int
    cols: int
    act_bits: int = 16
    weight_bits: int = 8
    acc_bits: int = 48
    spad_words: int = 32 * 1024
    acc_lines: int = 1024
    idx_entries: int = 2048
    rowstate_rows: int = 512
    max_experts: int = 32
    max_topk: int = 8
    row_lanes: int = 4
    max_k: int = 4096
    max_dim: int = 4096
    bus_bits: int = 64
    dram_bytes: int = 1 << 26
    clock_mhz: float = 100.0
    exp_index_bits: int = 8
    recip_index_bits: int = 8
    rsqrt_index_bits: int = 8
    gelu_step_log2: int = 6
    gelu_range: int = 8
    watchdog_cycles: int = 1 << 20
    cmd_depth: int = 16
    token_depth: int = 16
    epi_lanes: int = 0

    def __post_init__(self):
        def need(cond, field, msg):
            if not cond:
                raise ConfigError(f"{self.name}: field '{field}' {msg}, not "
                                  f"{getattr(self, field)!r}")

        def pow2(field):
            v = getattr(self, field)
            need(isinstance(v, int) and v > 0 and v & (v - 1) == 0, field,
                 "must be a positive power of two")

        for f in ("rows", "cols"):
            v = getattr(self, f)
            need(isinstance(v, int) and 1 <= v <= 64, f, "must be an integer in 1..64")
            pow2(f)
        need(self.act_bits in (8, 16), "act_bits", "must be 8 or 16 (16-bit scratchpad words)")
        need(self.weight_bits in (4, 8, 16), "weight_bits", "must be 4, 8 or 16")
        need(self.weight_bits <= 16, "weight_bits", "must fit a 16-bit scratchpad word")
        need(isinstance(self.acc_bits, int) and 32 <= self.acc_bits <= 48, "acc_bits",
             "must be in 32..48 (the requantiser multiplies it by 16 bits in a 64-bit product)")
        pow2("max_k")
        need(self.max_k >= self.rows, "max_k", f"must be at least rows={self.rows}")
        # Products of two 16-bit words are at most 2^30 in magnitude (-32768 * -32768);
        # max_k of them need 31 + log2(max_k) bits plus sign.
        need_acc = 31 + int(math.log2(self.max_k)) + 1
        if self.acc_bits < need_acc:
            raise ConfigError(f"{self.name}: field 'acc_bits' must be >= {need_acc} to hold "
                              f"max_k={self.max_k} products of 16-bit words, not {self.acc_bits}")
        pow2("max_dim")
        need(self.max_dim <= 32768, "max_dim", "must be <= 32768 (16-bit count fields)")
        need(self.max_k <= 32768, "max_k", "must be <= 32768 (16-bit count fields)")
        need(isinstance(self.spad_words, int) and 1024 <= self.spad_words <= (1 << 22),
             "spad_words", "must be in 1024..4194304 (22-bit element addresses)")
        need(self.spad_words % (self.rows * self.cols) == 0
             and self.spad_words % self.row_lanes == 0,
             "spad_words", "must be a multiple of rows*cols and of row_lanes")
        need(isinstance(self.acc_lines, int) and 16 <= self.acc_lines <= (1 << 16), "acc_lines",
             "must be in 16..65536")
        need(isinstance(self.idx_entries, int) and 64 <= self.idx_entries <= (1 << 20),
             "idx_entries", "must be in 64..1048576")
        need(isinstance(self.rowstate_rows, int) and 1 <= self.rowstate_rows <= (1 << 16),
             "rowstate_rows", "must be in 1..65536")
        need(isinstance(self.max_experts, int) and 1 <= self.max_experts <= 256, "max_experts",
             "must be in 1..256")
        need(isinstance(self.max_topk, int) and 1 <= self.max_topk <= 64, "max_topk",
             "must be in 1..64")
        pow2("row_lanes")
        need(self.row_lanes <= 64, "row_lanes", "must be <= 64")
        need(self.bus_bits in (16, 32, 64, 128, 256, 512), "bus_bits",
             "must be one of 16, 32, 64, 128, 256, 512")
        pow2("dram_bytes")
        need(self.dram_bytes <= (1 << 32), "dram_bytes", "must be <= 4 GiB (32-bit addresses)")
        need(self.clock_mhz > 0, "clock_mhz", "must be positive")
        for f in ("exp_index_bits", "recip_index_bits", "rsqrt_index_bits"):
            need(isinstance(getattr(self, f), int) and 4 <= getattr(self, f) <= 12, f,
                 "must be in 4..12")
        need(isinstance(self.gelu_step_log2, int) and 3 <= self.gelu_step_log2 <= 8,
             "gelu_step_log2", "must be in 3..8")
        need(self.gelu_range in (4, 8, 16), "gelu_range", "must be 4, 8 or 16")
        need(isinstance(self.watchdog_cycles, int) and self.watchdog_cycles >= 1024,
             "watchdog_cycles", "must be >= 1024")
        need(isinstance(self.cmd_depth, int) and 2 <= self.cmd_depth <= 1024, "cmd_depth",
             "must be in 2..1024")
        need(isinstance(self.token_depth, int) and 1 <= self.token_depth <= 255, "token_depth",
             "must be in 1..255")
        need(isinstance(self.epi_lanes, int) and (self.epi_lanes == 0 or (
            self.epi_lanes > 0 and self.epi_lanes & (self.epi_lanes - 1) == 0
            and self.cols % self.epi_lanes == 0)), "epi_lanes",
             f"must be 0 (= cols) or a power of two dividing cols={self.cols}")

    # -- derived figures (computed here only) ---------------------------------------------------

    @property
    def macs(self) -> int:
        """MACs per cycle of the array."""
        return self.rows * self.cols

    @property
    def epi_ratio(self) -> int:
        """Cycles the MATMUL epilogue takes per output line (``cols / epi_lanes``)."""
        return self.cols // self.epi_lanes if self.epi_lanes else 1

    @property
    def act_min(self) -> int:
        return -(1 << (self.act_bits - 1))

    @property
    def act_max(self) -> int:
        return (1 << (self.act_bits - 1)) - 1

    @property
    def act_bytes(self) -> int:
        """Bytes per activation element in DRAM."""
        return (self.act_bits + 7) // 8

    @property
    def weight_bytes(self) -> int:
        """Bytes per weight element in DRAM (4-bit weights are stored one per byte)."""
        return (self.weight_bits + 7) // 8

    @property
    def acc_min(self) -> int:
        return -(1 << (self.acc_bits - 1))

    @property
    def acc_max(self) -> int:
        return (1 << (self.acc_bits - 1)) - 1

    @property
    def bus_bytes(self) -> int:
        return self.bus_bits // 8

    @property
    def spad_bytes(self) -> int:
        return self.spad_words * 2

    @property
    def acc_bytes(self) -> int:
        return self.acc_lines * self.cols * ((self.acc_bits + 7) // 8)

    @property
    def onchip_bytes(self) -> int:
        """On-chip memory: scratchpad + accumulators + index memory + row state."""
        return (self.spad_bytes + self.acc_bytes + self.idx_entries * 8
                + self.rowstate_rows * 16)

    @property
    def peak_gops(self) -> float:
        """Peak throughput in GOPS (1 MAC = 2 ops) at the nominal clock."""
        return 2 * self.macs * self.clock_mhz / 1000.0

    def fingerprint(self) -> bytes:
        """8-byte fingerprint of everything that changes the bits a program computes or encodes.

        The name, the nominal clock, the watchdog limit and ``epi_lanes`` are left out: they do
        not change the meaning of a program.
        """
        d = dataclasses.asdict(self)
        d.pop("name")
        d.pop("clock_mhz")
        d.pop("watchdog_cycles")
        d.pop("epi_lanes")
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).digest()[:8]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> dict:
        """Derived figures for ``vitamin configs``."""
        return {
            "name": self.name,
            "array": f"{self.rows}x{self.cols}",
            "macs_per_cycle": self.macs,
            "act_bits": self.act_bits,
            "weight_bits": self.weight_bits,
            "acc_bits": self.acc_bits,
            "spad_kib": self.spad_bytes / 1024,
            "acc_kib": self.acc_bytes / 1024,
            "onchip_kib": self.onchip_bytes / 1024,
            "row_lanes": self.row_lanes,
            "bus_bits": self.bus_bits,
            "clock_mhz": self.clock_mhz,
            "peak_gops": self.peak_gops,
            "fingerprint": self.fingerprint().hex(),
        }

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, Config] = {
    # Tests and the smallest boards (iCE40UP5K has 8 DSPs; 2x4 = 8 MACs).
    "tiny": Config(name="tiny", rows=2, cols=4, spad_words=16 * 1024, acc_lines=256,
                   idx_entries=512, rowstate_rows=128, max_experts=16, row_lanes=2,
                   max_k=1024, max_dim=1024, bus_bits=32, dram_bytes=1 << 24, clock_mhz=24.0),
    # ULX3S LFE5U-85F (156 MULT18X18D, 83.6k LUT slots, 208 x 18 kbit BRAM): 4x4 = 16 MACs, a
    # one-column epilogue (epi_lanes=1: 12 instead of 48 multipliers) and 2 row lanes, so that
    # the whole ISA fits beside the array: logic, not multipliers, is what runs out (an 8x16
    # array needed 565 multipliers and 111k LUT4; 8x4 fitted the multipliers but filled 109 %
    # of the LUT slots). 192 KiB scratchpad; 16-bit SDRAM behind a 32-bit AXI port.
    "ecp5": Config(name="ecp5", rows=4, cols=4, spad_words=96 * 1024, acc_lines=512,
                   idx_entries=2048, rowstate_rows=256, max_experts=32, row_lanes=2,
                   max_k=4096, max_dim=4096, bus_bits=32, dram_bytes=1 << 25, clock_mhz=100.0,
                   epi_lanes=1),
    # ZCU102 like-for-like with Edge-MoE: 16x16 = 256 MACs at 300 MHz, 128-bit HP port to DDR4.
    "zcu102": Config(name="zcu102", rows=16, cols=16, spad_words=1024 * 1024, acc_lines=4096,
                     idx_entries=16384, rowstate_rows=4096, max_experts=64, row_lanes=16,
                     max_k=4096, max_dim=8192, bus_bits=128, dram_bytes=1 << 31,
                     clock_mhz=300.0),
}


def get_config(name_or_config) -> Config:
    """Return a preset by name, or the given :class:`Config` unchanged."""
    if isinstance(name_or_config, Config):
        return name_or_config
    try:
        return PRESETS[name_or_config]
    except KeyError:
        raise ConfigError(f"unknown configuration preset {name_or_config!r}; "
                          f"presets: {', '.join(PRESETS)}") from None
