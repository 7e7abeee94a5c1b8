"""cocotb bench of :class:`vitamin.hw.mac_array.MacArray` (run by tests/test_hw_mac_array.py).

The bench is built from small parts: :class:`StreamSource` drives a stream with random idle
cycles, :class:`StreamSink` accepts with random stalls, the reference model is a NumPy integer
matmul, and the checker compares the received lines with it. Payloads are packed and unpacked
with the gateware's own layouts (``layout.const(...).as_bits()`` / ``layout.from_bits``), so bit
positions exist only once.

Environment: ``VITAMIN_CONFIG`` (JSON of ``Config.to_dict()``), ``VITAMIN_TILES``,
``VITAMIN_SEED``.
"""

import json
import os
import random

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge, ReadOnly, RisingEdge

from vitamin.config import Config
from vitamin.hw.mac_array import a_line_layout, psum_line_layout, weight_line_layout


def _config():
    return Config(**json.loads(os.environ["VITAMIN_CONFIG"]))


class StreamSource:
    """Drives ``<prefix>__valid``/``__payload`` from a list of packed payloads.

    Changes inputs on the falling edge and samples the handshake in the ReadOnly phase of the same
    time step: nothing changes between then and the next rising edge, so what it sees is what the
    DUT sees at the edge. Once ``valid`` is asserted it is held until the transfer.
    """

    def __init__(self, dut, prefix, rng, p_idle):
        self._valid = getattr(dut, f"{prefix}__valid")
        self._ready = getattr(dut, f"{prefix}__ready")
        self._payload = getattr(dut, f"{prefix}__payload")
        self._clk = dut.clk
        self._rng = rng
        self._p_idle = p_idle
        self._valid.value = 0

    async def send(self, items):
        i = 0
        offering = False
        while i < len(items):
            await FallingEdge(self._clk)
            if not offering and self._rng.random() >= self._p_idle:
                offering = True
                self._payload.value = items[i]
            self._valid.value = int(offering)
            await ReadOnly()
            if offering and int(self._ready.value):
                i += 1
                offering = False
        await FallingEdge(self._clk)
        self._valid.value = 0


class StreamSink:
    """Accepts from ``<prefix>__valid``/``__payload`` with random stalls; collects packed ints."""

    def __init__(self, dut, prefix, rng, p_stall):
        self._valid = getattr(dut, f"{prefix}__valid")
        self._ready = getattr(dut, f"{prefix}__ready")
        self._payload = getattr(dut, f"{prefix}__payload")
        self._clk = dut.clk
        self._rng = rng
        self._p_stall = p_stall
        self._ready.value = 0
        self.received = []

    async def receive(self, count):
        while len(self.received) < count:
            await FallingEdge(self._clk)
            ready = self._rng.random() >= self._p_stall
            self._ready.value = int(ready)
            await ReadOnly()
            if ready and int(self._valid.value):
                self.received.append(self._payload.value.to_unsigned())
        await FallingEdge(self._clk)
        self._ready.value = 0


def reference(tiles):
    """Expected output lines: ``(A @ W, first, last)`` per A line, tile after tile."""
    expected = []
    for w, a in tiles:
        out = a.astype(np.int64) @ w.astype(np.int64)
        for i in range(len(a)):
            expected.append((out[i], i == 0, i == len(a) - 1))
    return expected


def random_tiles(config, rng, n_tiles):
    """Random weight tiles and A blocks, with whole tiles/lines of edge values mixed in."""
    np_rng = np.random.default_rng(rng.getrandbits(32))
    edges = np.array([-32768, 32767, 0, -1, 1], dtype=np.int64)
    tiles = []
    for t in range(n_tiles):
        m = rng.randint(1, 8)
        w = np_rng.integers(-32768, 32768, size=(config.rows, config.cols))
        a = np_rng.integers(-32768, 32768, size=(m, config.rows))
        if t % 3 == 1:
            w = np_rng.choice(edges, size=w.shape)
            a = np_rng.choice(edges, size=a.shape)
        elif t % 3 == 2:
            w = np.full(w.shape, -32768)
            a[0] = -32768  # the largest product sum: rows * 2**30
        tiles.append((w, a))
    return tiles


@cocotb.test()
async def mac_array_random_backpressure(dut):
    """Random tiles back to back, random idle cycles on both inputs, random output stalls."""
    config = _config()
    rng = random.Random(int(os.environ.get("VITAMIN_SEED", "1")))
    tiles = random_tiles(config, rng, int(os.environ.get("VITAMIN_TILES", "12")))

    w_layout = weight_line_layout(config)
    a_layout = a_line_layout(config)
    o_layout = psum_line_layout(config)
    w_items = [w_layout.const([int(x) for x in row]).as_bits() for w, _ in tiles for row in w]
    a_items = [a_layout.const({"data": [int(x) for x in line], "first": i == 0,
                               "last": i == len(a) - 1}).as_bits()
               for _, a in tiles for i, line in enumerate(a)]
    expected = reference(tiles)

    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    w_src = StreamSource(dut, "w_stream", random.Random(rng.getrandbits(32)), p_idle=0.3)
    a_src = StreamSource(dut, "a_stream", random.Random(rng.getrandbits(32)), p_idle=0.3)
    sink = StreamSink(dut, "o_stream", random.Random(rng.getrandbits(32)), p_stall=0.3)
    dut.rst.value = 1
    for _ in range(2):
        await RisingEdge(dut.clk)
    dut.rst.value = 0

    cocotb.start_soon(w_src.send(w_items))
    cocotb.start_soon(a_src.send(a_items))
    await sink.receive(len(expected))

    for k, (bits, (want, first, last)) in enumerate(zip(sink.received, expected, strict=True)):
        got = o_layout.from_bits(bits)
        got_data = np.array([got.data[c] for c in range(config.cols)], dtype=np.int64)
        np.testing.assert_array_equal(got_data, want, err_msg=f"output line {k}")
        assert (got.first, got.last) == (first, last), f"flags of output line {k}"
    dut._log.info("checked %d output lines of %d tiles", len(expected), len(tiles))
