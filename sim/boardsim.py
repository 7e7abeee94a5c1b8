"""The simulated ULX3S board: UART bridge + accelerator + SDRAM controller + an SDRAM model, in
Verilator, driven by the host runtime over the bridge protocol (``open_device("sim:rtl")``).

The top (:class:`BoardSimTop`) is the ULX3S's :class:`~vitamin.boards.core.BoardCore` with the
UART serialiser replaced by a fast path: the bridge's byte streams are fed from a 512-byte
register that cocotb writes with one VPI call (one byte enters the bridge per cycle) and its
responses are shifted into another register read the same way. Everything behind the byte
stream — the frame parser, CRC checks, the AXI interconnect, the SDRAM controller and its
timing, the accelerator — is the board's gateware. The UART itself is tested in
tests/test_bridge.py. The SDRAM is :data:`SDRAM_VERILOG`, a behavioural x16 SDR SDRAM (mode
register, CAS latency, bursts of 2, per-bank open rows, byte masks) with no initialiser.

Process model: :class:`RtlBoard` (a :class:`vitamin.runtime.BridgeTransport`) listens on a
localhost TCP port and runs the simulator in a thread; the cocotb side (:func:`board_server`)
connects to it and moves bytes between the socket and the top while Verilator runs free in
between (500-cycle steps when the line is quiet).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import select
import socket
import tempfile
import threading
import time
from pathlib import Path

from amaranth import ClockSignal, Instance, Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from vitamin.config import get_config
from vitamin.hw.sdram import SdramGeometry, SdramTiming
from vitamin.runtime import BridgeTransport

__all__ = ["BoardSimTop", "SDRAM_VERILOG", "CHUNK", "RtlBoard", "build_board_sim",
           "SIM_GEOMETRY"]

#: Bytes per fast-path transfer (either direction).
CHUNK = 512
#: SDRAM of the simulated board: the ULX3S's 32 MB part.
SIM_GEOMETRY = SdramGeometry(13, 9)
REPO_ROOT = Path(__file__).resolve().parent.parent

SDRAM_VERILOG = """\
// Behavioural x16 SDR SDRAM for vitamin's board simulation (sim/boardsim.py). Commands are
// sampled at the rising edge; a READ at edge n drives its two words before edges n+CL and
// n+CL+1; a WRITE takes its words at edges n and n+1 (DQM masks bytes). No initialiser.
module vitamin_sdram_model #(parameter ROWB = 13, parameter COLB = 9) (
    input clk, input cs, input ras, input cas, input we, input [1:0] ba,
    input [12:0] a, input [15:0] dq_o, input dq_oe, input [1:0] dqm, output [15:0] dq_i);
  localparam AW = ROWB + 2 + COLB;
  reg [15:0] mem [0:(1<<AW)-1];
  reg [12:0] row [0:3];
  reg [2:0] cl = 3'd2;
  reg [2:0] now = 0;
  reg [15:0] slot [0:7];
  reg [15:0] dq_r = 0;
  reg wr2 = 0;
  reg [AW-1:0] wa2;
  wire [AW-1:0] base = {row[ba][ROWB-1:0], ba, a[COLB-1:0]};
  // explicit 3-bit indices: the ring wraps (an index expression may be evaluated wider)
  wire [2:0] i_next = now + 3'd1;
  wire [2:0] i_w0 = now + cl;
  wire [2:0] i_w1 = now + cl + 3'd1;
  assign dq_i = dq_r;
  always @(posedge clk) begin
    now <= now + 1;
    dq_r <= slot[i_next];
    wr2 <= 0;
    if (wr2) begin
      if (!dqm[0]) mem[wa2][7:0] <= dq_o[7:0];
      if (!dqm[1]) mem[wa2][15:8] <= dq_o[15:8];
    end
    if (cs) begin
      if (ras && !cas && !we) row[ba] <= a;
      if (!ras && cas && !we) begin
        slot[i_w0] <= mem[base];
        slot[i_w1] <= mem[base + 1];
      end
      if (!ras && cas && we) begin
        if (!dqm[0]) mem[base][7:0] <= dq_o[7:0];
        if (!dqm[1]) mem[base][15:8] <= dq_o[15:8];
        wr2 <= 1;
        wa2 <= base + 1;
      end
      if (ras && cas && we) cl <= a[6:4];
    end
  end
endmodule
"""


class BoardSimTop(wiring.Component):
    """BoardCore(uart=False) + SDRAM model + the byte fast path (see the module docstring).

    Ports: ``in_data`` (CHUNK bytes, little-endian), ``in_len``, ``in_we`` (load a chunk),
    ``in_left`` (bytes not yet taken by the bridge), ``out_data`` (the last ``out_len`` response
    bytes at its top), ``out_len``, ``out_clr``, ``bridge_busy``, ``init_done``, ``irq``.
    """

    def __init__(self, config, clk_hz=25e6):
        from vitamin.boards.core import BoardCore
        self.core = BoardCore(config, memory="sdram", clk_hz=clk_hz, uart=False,
                              sdram_geometry=SIM_GEOMETRY,
                              sdram_timing=SdramTiming.from_clock(clk_hz, init_cycles=200),
                              bridge_timeout_cycles=200_000)
        super().__init__({
            "in_data": In(8 * CHUNK), "in_len": In(range(CHUNK + 1)), "in_we": In(1),
            "in_left": Out(range(CHUNK + 1)), "out_data": Out(8 * CHUNK),
            "out_len": Out(range(CHUNK + 1)), "out_clr": In(1), "bridge_busy": Out(1),
            "init_done": Out(1), "irq": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        core = m.submodules.core = self.core
        buf = Signal(8 * CHUNK)
        with m.If(self.in_we):
            m.d.sync += [buf.eq(self.in_data), self.in_left.eq(self.in_len)]
        with m.Elif(self.in_left != 0):
            m.d.comb += [core.i.valid.eq(1), core.i.payload.eq(buf[:8])]
            with m.If(core.i.ready):
                m.d.sync += [buf.eq(buf >> 8), self.in_left.eq(self.in_left - 1)]
        m.d.comb += core.o.ready.eq(1)
        with m.If(self.out_clr):
            m.d.sync += self.out_len.eq(0)
        with m.Elif(core.o.valid):
            m.d.sync += [self.out_data.eq((self.out_data >> 8) |
                                          (core.o.payload << (8 * CHUNK - 8))),
                         self.out_len.eq(self.out_len + 1)]
        p = core.sdram
        m.submodules.sdram_model = Instance(
            "vitamin_sdram_model", p_ROWB=SIM_GEOMETRY.row_bits, p_COLB=SIM_GEOMETRY.col_bits,
            i_clk=ClockSignal(), i_cs=p.cs, i_ras=p.ras, i_cas=p.cas, i_we=p.we, i_ba=p.ba,
            i_a=p.a, i_dq_o=p.dq_o, i_dq_oe=p.dq_oe, i_dqm=p.dqm, o_dq_i=p.dq_i)
        m.d.comb += [self.bridge_busy.eq(core.bridge_busy), self.init_done.eq(core.init_done),
                     self.irq.eq(core.irq)]
        return m


def _source_hash():
    # what the Verilog depends on: the gateware, the board core, this top and the SDRAM model
    h = hashlib.sha256()
    for f in sorted((REPO_ROOT / "hw").glob("*.py")) + [REPO_ROOT / "boards" / "core.py"]:
        h.update(f.read_bytes())
    h.update((inspect.getsource(BoardSimTop) + SDRAM_VERILOG).encode())
    return h.hexdigest()


def build_board_sim(config, *, build_root=None):
    """Build (or reuse) the Verilator model of :class:`BoardSimTop`; returns its directory.

    Cached under ``build/boardsim/<config>-<key>`` keyed by the configuration and the sources
    of hw/, boards/ and this file; the Verilator invocation is sim/simtop.py's (the top module
    is named ``simtop`` for that reason).
    """
    from vitamin.sim import simtop

    from .verilator import convert_verilog, ensure_verilator_on_path
    cfg = get_config(config)
    key = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    root = Path(build_root) if build_root else REPO_ROOT / "build" / "boardsim"
    bdir = root / f"{cfg.name}-{key}"
    stamp = bdir / "built.json"
    src_hash = _source_hash()
    with simtop._locked(root / f".{cfg.name}-{key}.lock"):
        meta = json.loads(stamp.read_text()) if stamp.exists() else {}
        if meta.get("src_hash") == src_hash and (bdir / "simtop").exists():
            return bdir
        ensure_verilator_on_path()
        t0 = time.monotonic()
        text = convert_verilog(BoardSimTop(cfg), name="simtop") + "\n" + SDRAM_VERILOG
        v_hash = hashlib.sha256(text.encode() +
                                inspect.getsource(simtop._verilate).encode()).hexdigest()
        if meta.get("verilog_hash") != v_hash or not (bdir / "simtop").exists():
            bdir.mkdir(parents=True, exist_ok=True)
            stamp.unlink(missing_ok=True)
            (bdir / "simtop.v").write_text(text)
            simtop._verilate(bdir / "simtop.v", bdir, False)
        stamp.write_text(json.dumps({"src_hash": src_hash, "verilog_hash": v_hash,
                                     "seconds": time.monotonic() - t0}))
    return bdir


class _SocketPort:
    """pyserial-like ``read``/``write`` over a connected socket."""

    def __init__(self, sock):
        self.sock = sock
        sock.settimeout(0.05)

    def write(self, data):
        self.sock.sendall(bytes(data))
        return len(data)

    def read(self, n):
        try:
            return self.sock.recv(n)
        except (TimeoutError, socket.timeout):
            return b""

    def reset_input_buffer(self):
        self.sock.setblocking(False)
        try:
            while self.sock.recv(65536):
                pass
        except (BlockingIOError, OSError):
            pass
        self.sock.settimeout(0.05)

    def close(self):
        self.sock.close()


class RtlBoard(BridgeTransport):
    """The simulated ULX3S board as a :class:`~vitamin.runtime.BridgeTransport`.

    Builds the model (cached), starts the simulator in a thread and connects to it. ``close``
    ends the simulation. ``stats`` (frames, bytes) are the bridge's; :attr:`sim_error` holds
    the simulator's failure, if any.
    """

    def __init__(self, config, *, timeout: float = 60.0, connect_timeout: float = 300.0,
                 build_root=None):
        self.config = get_config(config)
        self.build_dir = build_board_sim(self.config, build_root=build_root)
        self.sim_error = None
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        srv.settimeout(connect_timeout)
        port = srv.getsockname()[1]
        self._tmp = tempfile.TemporaryDirectory(prefix="vitamin-board-")
        self._thread = threading.Thread(target=self._simulate, args=(port,), daemon=True)
        self._thread.start()
        try:
            conn, _ = srv.accept()
        except (TimeoutError, socket.timeout):
            raise TimeoutError(f"the board simulation did not connect within "
                               f"{connect_timeout} s: {self.sim_error}") from None
        finally:
            srv.close()
        super().__init__(_SocketPort(conn), timeout=timeout, retries=1,
                         mem_size=SIM_GEOMETRY.bytes)

    def _simulate(self, port):
        from cocotb_tools.runner import get_runner

        from .verilator import ensure_verilator_on_path
        ensure_verilator_on_path()
        tmp = Path(self._tmp.name)
        try:
            get_runner("verilator").test(
                hdl_toplevel="simtop", hdl_toplevel_lang="verilog",
                test_module="vitamin.sim.boardsim", build_dir=self.build_dir, test_dir=tmp,
                extra_env={"VITAMIN_BOARD_PORT": str(port)},
                results_xml=str(tmp / "results.xml"), log_file=tmp / "sim.log")
        except (SystemExit, Exception) as exc:  # noqa: BLE001 - reported by the host side
            log = tmp / "sim.log"
            self.sim_error = f"{exc!r}: " + (log.read_text(errors="replace")[-2000:]
                                             if log.exists() else "")

    def close(self):
        super().close()
        self._thread.join(timeout=60)
        self._tmp.cleanup()


# ---- cocotb side -----------------------------------------------------------------------------

try:
    import cocotb
except ImportError:  # pragma: no cover - cocotb is a dependency; keep the module importable
    cocotb = None


async def board_server(dut):
    """cocotb: serve the bridge byte stream of ``$VITAMIN_BOARD_PORT`` until the host closes."""
    from cocotb.clock import Clock
    from cocotb.triggers import RisingEdge, Timer

    period = 40                                     # 25 MHz

    def cycles_of(n):
        # one timer, not ClockCycles: that costs a Python callback per cycle
        return Timer(n * period, unit="ns")
    cocotb.start_soon(Clock(dut.clk, period, unit="ns").start())
    dut.in_we.value = 0
    dut.out_clr.value = 0
    dut.rst.value = 1
    await cycles_of(4)
    dut.rst.value = 0
    while not dut.init_done.value:
        await cycles_of(50)
    sock = socket.create_connection(("127.0.0.1", int(os.environ["VITAMIN_BOARD_PORT"])),
                                    timeout=30)
    sock.setblocking(False)
    pending = bytearray()
    cycles = 0
    try:
        while True:
            ready, _, _ = select.select([sock], [], [], 0)
            if ready:
                try:
                    data = sock.recv(1 << 16)
                except BlockingIOError:
                    data = None
                if data == b"":
                    break                          # the host closed the connection
                if data:
                    pending += data
            # signals are written right after a rising edge (never at an edge's timestep,
            # where the order against the clock is undefined) and held for one edge
            await RisingEdge(dut.clk)
            if pending and not int(dut.in_left.value):
                chunk, pending = pending[:CHUNK], pending[CHUNK:]
                dut.in_data.value = int.from_bytes(chunk, "little")
                dut.in_len.value = len(chunk)
                dut.in_we.value = 1
                await RisingEdge(dut.clk)
                dut.in_we.value = 0
                await cycles_of(len(chunk) + 1)
                cycles += len(chunk) + 2
                continue
            n_out = int(dut.out_len.value)
            if n_out and not int(dut.bridge_busy.value):
                raw = int(dut.out_data.value).to_bytes(CHUNK, "little")
                dut.out_clr.value = 1
                await RisingEdge(dut.clk)
                dut.out_clr.value = 0
                sock.setblocking(True)
                sock.sendall(raw[CHUNK - n_out:])
                sock.setblocking(False)
                continue
            step = 64 if int(dut.bridge_busy.value) else 500
            await cycles_of(step - 1)
            cycles += step
    finally:
        sock.close()


if cocotb is not None:
    board_server_test = cocotb.test()(board_server)
