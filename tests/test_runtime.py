"""Host runtime (vitamin/runtime.py): the run sequence, the bridge protocol's host side and its
robustness (corrupted / truncated frames, a silent device), against the Python board model."""

from pathlib import Path

import numpy as np
import pytest

import vitamin
from vitamin import runtime as rt
from vitamin.program import Program

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def digits_tiny():
    return vitamin.compile(REPO / "models" / "digits_vit.onnx", "tiny")


def _images(n=2):
    d = np.load(REPO / "models" / "digits_data.npz")
    key = [k for k in d.files if k.startswith("x")][0]
    return [d[key][i] for i in range(n)]


def test_crc16_known_value():
    # CRC-16/CCITT-FALSE check value of "123456789"
    assert rt.crc16(b"123456789") == 0x29B1


def test_golden_board_bit_exact(digits_tiny):
    prog = digits_tiny
    shape = prog.inputs[0].shape
    with rt.open_device("sim:golden", prog.config) as dev:
        for img in _images(2):
            x = {prog.inputs[0].name: img.reshape(shape)}
            got = dev.run(prog, x)
            ref = vitamin.run(prog, x)
            for name in ref.raw:
                np.testing.assert_array_equal(got.raw[name], ref.raw[name])
            assert got.counters["instructions"] == ref.counters["instructions"]
            assert got.counters["macs"] == ref.counters["macs"] > 0


def _bridge_device(config, corrupt=None, **kw):
    board = rt.GoldenBoard(config)
    model = rt.BridgeModel(board)
    port = rt.LoopbackPort(model, corrupt)
    return rt.Device(rt.BridgeTransport(port, timeout=0.2, **kw), config), board, model, port


def test_bridge_transport_runs_program(digits_tiny):
    prog = digits_tiny
    dev, board, model, port = _bridge_device(prog.config)
    assert dev.transport.ping() == rt.BRIDGE_ID
    x = {prog.inputs[0].name: _images(1)[0].reshape(prog.inputs[0].shape)}
    got = dev.run(prog, x)
    ref = vitamin.run(prog, x)
    for name in ref.raw:
        np.testing.assert_array_equal(got.raw[name], ref.raw[name])
    assert board.starts == 1
    assert dev.transport.stats["retries"] == 0


def test_unaligned_tail_write_keeps_following_bytes():
    dev, board, _, _ = _bridge_device("tiny")
    board.mem[0:16] = 0xEE
    dev.transport.write_mem(0, b"\x01\x02\x03\x04\x05\x06")
    assert board.mem[:8].tobytes() == b"\x01\x02\x03\x04\x05\x06\xee\xee"


def test_corrupted_request_is_nacked_and_retried():
    hits = {"n": 0}

    def flip_first_write(data):
        # corrupt the first WRITE_MEM frame's payload only: one bit
        if data[1] == rt.Cmd.WRITE_MEM and hits["n"] == 0:
            hits["n"] += 1
            b = bytearray(data)
            b[9] ^= 0x10
            return bytes(b)
        return data

    dev, board, model, _ = _bridge_device("tiny", flip_first_write)
    payload = bytes(range(64))
    dev.transport.write_mem(0x100, payload)
    assert hits["n"] == 1
    assert dev.transport.stats["retries"] == 1
    assert board.mem[0x100:0x140].tobytes() == payload


def test_corrupted_request_never_applied_without_retries():
    def flip(data):
        b = bytearray(data)
        b[-3] ^= 1
        return bytes(b)

    dev, board, model, _ = _bridge_device("tiny")
    dev.transport.port.corrupt = flip
    dev.transport.retries = 0
    before = model.applied
    with pytest.raises(rt.BridgeError, match="BAD_CRC"):
        dev.transport.write_mem(0x200, b"\xAA" * 8)
    assert not board.mem[0x200:0x208].any()
    assert model.applied == before


def test_truncated_request_times_out_on_the_device():
    dev, board, model, port = _bridge_device("tiny")
    dev.transport.retries = 0
    port.corrupt = lambda data: data[:-3]      # the frame stops arriving
    with pytest.raises(rt.BridgeError, match="TIMEOUT"):
        dev.transport.write_regs(rt.REGISTERS["REG0"] + 4, [5])
    assert board.regs[rt.REGISTERS["REG0"] + 4] == 0


def test_bad_command_and_length_are_reported():
    dev, _, _, port = _bridge_device("tiny")
    tr = dev.transport
    with pytest.raises(rt.BridgeError, match="BAD_LEN"):
        tr._exchange(rt.Cmd.READ_MEM, 0, 0)
    with pytest.raises(rt.BridgeError, match="BAD_LEN"):
        tr._exchange(rt.Cmd.READ_MEM, 0, rt.MAX_WORDS + 1)
    port.model.feed(rt.encode_request(0x7E, 0, 1))
    assert port.model.take() == rt.encode_response(rt.Status.BAD_CMD)
    with pytest.raises(rt.BridgeError, match="BAD_ALIGN"):
        tr._exchange(rt.Cmd.READ_MEM, 2, 1)


def test_silent_device_gives_timeout():
    dev, _, _, port = _bridge_device("tiny")
    port.mute = True
    with pytest.raises(rt.DeviceTimeout, match="did not answer"):
        dev.read_reg("STATUS")


def test_corrupted_response_is_detected():
    dev, board, model, port = _bridge_device("tiny", retries=0)
    orig = model.take

    def noisy():
        b = bytearray(orig())
        if len(b) > 3:
            b[2] ^= 0x40
        return bytes(b)

    model.take = noisy
    with pytest.raises(rt.DeviceError, match="corrupted response"):
        dev.read_reg("ID")


def test_program_that_never_halts_times_out(digits_tiny):
    prog = digits_tiny
    board = rt.GoldenBoard(prog.config, hang=True)
    dev = rt.Device(board, prog.config)
    x = {prog.inputs[0].name: _images(1)[0].reshape(prog.inputs[0].shape)}
    with pytest.raises(rt.DeviceTimeout, match="did not halt"):
        dev.run(prog, x, timeout=0.05)


def test_wrong_device_and_bad_specs():
    board = rt.GoldenBoard("tiny")
    board.regs[rt.REGISTERS["ID"]] = 0
    with pytest.raises(rt.DeviceError, match="ID register"):
        rt.Device(board, "tiny")
    with pytest.raises(rt.DeviceError, match="fingerprint"):
        rt.Device(rt.GoldenBoard("tiny"), "ecp5")
    with pytest.raises(ValueError, match="unknown device"):
        rt.open_device("usb", "tiny")
    # a ValueError too: the command line reports it on one line like other input errors
    with pytest.raises(ValueError, match="cannot open serial port"):
        rt.open_device("serial:/dev/does-not-exist", "tiny")
    with pytest.raises(ValueError, match="REG"):
        rt.Device(rt.GoldenBoard("tiny")).set_regs({16: 1})


def test_fault_is_reported(digits_tiny):
    prog = digits_tiny
    bad = Program(prog.config, b"\xff" * 64, dram_size=4096)
    dev = rt.Device(rt.GoldenBoard(prog.config), prog.config)
    dev.load(bad)
    dev.start()
    res = dev.wait(1.0)
    assert not res.ok and res.error_pc == 0
