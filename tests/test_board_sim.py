"""End to end: the host runtime drives the simulated ULX3S top (UART bridge byte stream +
accelerator + SDRAM controller + SDRAM model, Verilator) and runs the demo model bit-exactly
like the golden backend."""

import time
from pathlib import Path

import numpy as np
import pytest

import vitamin
from vitamin import runtime as rt

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def digits_tiny():
    return vitamin.compile(REPO / "models" / "digits_vit.onnx", "tiny")


def _images(n):
    return np.load(REPO / "models" / "digits_data.npz")["x_test"][:n]


def _run_images(prog, n):
    from vitamin.sim.boardsim import RtlBoard
    t0 = time.monotonic()
    board = RtlBoard(prog.config)
    t_open = time.monotonic() - t0
    with rt.Device(board, prog.config) as dev:
        assert board.ping() == rt.BRIDGE_ID
        # memory round trip through bridge, interconnect and SDRAM (two rows, two banks)
        pattern = bytes((i * 37 + 11) & 0xFF for i in range(3000))
        board.write_mem(0x3FF000, pattern)
        assert board.read_mem(0x3FF000, len(pattern)) == pattern
        # a bad frame is answered, not applied
        board.port.write(rt.encode_request(rt.Cmd.WRITE_REG, 0x44, 1, b"\1\0\0\0")[:-1] +
                         b"\0")
        t_end = time.monotonic() + 10
        raw = b""
        while len(raw) < 4 and time.monotonic() < t_end:
            raw += board.port.read(4 - len(raw))
        assert raw == rt.encode_response(rt.Status.BAD_CRC)
        assert dev.read_reg(0x44) == 0
        results = []
        for img in _images(n):
            x = {prog.inputs[0].name: img.reshape(prog.inputs[0].shape)}
            t1 = time.monotonic()
            got = dev.run(prog, x, timeout=120)
            results.append((x, got, time.monotonic() - t1))
    return results, t_open, board.stats


def _check(prog, results):
    for x, got, _ in results:
        ref = vitamin.run(prog, x)
        for name in ref.raw:
            np.testing.assert_array_equal(got.raw[name], ref.raw[name])
        assert got.counters["instructions"] == ref.counters["instructions"]
        assert got.counters["macs"] == ref.counters["macs"] > 0
        assert got.counters["cycles"] > 0


# Slow: the first run builds the board's Verilator model (a second whole-accelerator build,
# 5 to 25 minutes on 2 shared cores, again after every change under hw/ or boards/). The host
# code and the protocol are tested quickly in test_runtime.py, the gateware in test_bridge.py,
# test_sdram.py and test_board_arbiter.py.
@pytest.mark.slow
def test_board_sim_runs_demo_bit_exact(digits_tiny):
    results, t_open, stats = _run_images(digits_tiny, 1)
    _check(digits_tiny, results)
    print(f"open {t_open:.1f} s, run {results[0][2]:.1f} s, bridge {stats}")


@pytest.mark.slow
def test_board_sim_two_images_bit_exact(digits_tiny):
    results, _, _ = _run_images(digits_tiny, 2)
    _check(digits_tiny, results)
