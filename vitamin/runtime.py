"""Host runtime: drive a vitamin accelerator on a board (or a simulated one) from Python.

>>> from vitamin.runtime import open_device
>>> with open_device("serial:/dev/ttyUSB0", config="ecp5") as dev:     # doctest: +SKIP
...     out = dev.run(prog, {"input": x}, timeout=5.0)
...     out.raw["logits"], out.counters["cycles"]

A :class:`Device` is the accelerator's host registers (hw/accel.py: CTRL, STATUS, PROG_BASE,
PROG_LEN, WINDOW, REG0..15, the 64-bit counters) and its DRAM, reached through a
:class:`Transport`. Every transport has the same four operations — read/write 32-bit
registers, read/write memory — so the run sequence (load the image, set the registers, START,
poll STATUS with a timeout, read the outputs and counters) is written once, here.

Transports (:func:`open_device` spec strings)
---------------------------------------------
``sim`` / ``sim:golden``
    :class:`GoldenBoard`: a Python board model with the register map of hw/accel.py whose START
    runs the golden model. Fast; used to test the host code and the protocol.
``sim:rtl``
    :class:`vitamin.sim.boardsim.RtlBoard` (when present): the simulated ULX3S top in Verilator.
``serial:PORT[@BAUD]``
    :class:`BridgeTransport` over pyserial: the UART bridge protocol below (ULX3S, iCEBreaker).
``zynq[:REGS_ADDR[,MEM_ADDR,MEM_SIZE]]``
    :class:`ZynqTransport`: the AXI4-Lite registers and a physically contiguous DRAM buffer
    mapped through ``/dev/mem`` (PYNQ-style; needs root on the board).

Bridge protocol (hw/bridge.py implements the device side)
---------------------------------------------------------
Request: ``0xA5, cmd, addr (4 bytes LE), count (1 byte: 32-bit words, 1..MAX_WORDS),
payload (4*count bytes, write commands only), crc (2 bytes LE)``.
Response: ``0x5A, status, payload (4*count bytes, successful reads only), crc (2 bytes LE)``.
The CRC is CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF) over every byte after the sync byte.
A write is applied only after its CRC has been checked, so a corrupted frame is answered with
``BAD_CRC`` and changes nothing; a frame that stops arriving is answered with ``TIMEOUT`` after
the bridge's inter-byte timeout. The host checks every response's CRC, retries a NAK'd or
corrupted exchange (:attr:`BridgeTransport.retries`), and raises :class:`DeviceTimeout` when
the device does not answer within its timeout.
"""

from __future__ import annotations

import enum
import mmap
import os
import struct
import time
from dataclasses import dataclass

import numpy as np

__all__ = [
    "SYNC_REQ", "SYNC_RSP", "MAX_WORDS", "Cmd", "Status", "crc16", "encode_request",
    "encode_response", "DeviceError", "DeviceUnavailable", "DeviceTimeout", "BridgeError",
    "Transport",
    "GoldenBoard", "BridgeTransport", "BridgeModel", "LoopbackPort", "ZynqTransport",
    "Device", "open_device", "run_on_device", "REGISTERS", "COUNTERS",
]

SYNC_REQ = 0xA5
SYNC_RSP = 0x5A
#: Largest payload of one frame in 32-bit words (the bridge's buffer).
MAX_WORDS = 64
#: Bytes of register space behind the bridge (the accelerator's 12-bit AXI4-Lite addresses).
REG_SPACE = 4096
#: Value read by :attr:`Cmd.PING` (protocol version 1).
BRIDGE_ID = 0x56420001


class Cmd(enum.IntEnum):
    PING = 0x00          # returns BRIDGE_ID (count must be 1)
    READ_REG = 0x01      # AXI4-Lite read of count registers from byte offset addr
    WRITE_REG = 0x02
    READ_MEM = 0x03      # AXI4 read of count words from byte address addr (4-byte aligned)
    WRITE_MEM = 0x04


WRITE_CMDS = (Cmd.WRITE_REG, Cmd.WRITE_MEM)


class Status(enum.IntEnum):
    OK = 0
    BAD_CRC = 1          # request CRC mismatch: nothing was applied
    BAD_CMD = 2          # unknown command
    BAD_LEN = 3          # count 0 or > MAX_WORDS (or PING with count != 1)
    TIMEOUT = 4          # the request stopped arriving (truncated frame)
    BUS_ERROR = 5        # an AXI response was not OKAY (the words before it were done), or a
                         # register access beyond REG_SPACE (nothing done)
    BAD_ALIGN = 6        # address not 4-byte aligned


# Host register map, shared with the gateware (hw/accel.py is the one definition).
from vitamin.hw.accel import (  # noqa: E402 - after the protocol constants on purpose
    ACCEL_ID,
    COUNTERS,
    CTRL_CLEAR,
    CTRL_START,
    REGISTERS,
    STATUS_BUSY,
    STATUS_DONE,
    STATUS_ERROR_SHIFT,
)


def crc16(data: bytes, crc: int = 0xFFFF) -> int:
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection, no final xor)."""
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def encode_request(cmd: int, addr: int, count: int, payload: bytes = b"") -> bytes:
    """One request frame (see the module docstring). No range checks: tests send bad frames."""
    body = bytes([int(cmd) & 0xFF]) + struct.pack("<IB", addr & 0xFFFFFFFF, count & 0xFF) + \
        bytes(payload)
    return bytes([SYNC_REQ]) + body + struct.pack("<H", crc16(body))


def encode_response(status: int, payload: bytes = b"") -> bytes:
    body = bytes([int(status)]) + bytes(payload)
    return bytes([SYNC_RSP]) + body + struct.pack("<H", crc16(body))


class DeviceError(RuntimeError):
    """The device reported a problem (a fault of the program, a bad ID, a NAK)."""


class DeviceTimeout(DeviceError, TimeoutError):
    """The device did not answer, or the program did not halt, within the timeout."""


class DeviceUnavailable(DeviceError, ValueError):
    """The device named cannot be opened (a wrong port, no /dev/mem, no pyserial): bad input,
    reported on one line by the command line like other input errors."""


class BridgeError(DeviceError):
    """The bridge answered with a non-OK status (after the retries)."""

    def __init__(self, status: Status, what: str):
        super().__init__(f"{what}: the bridge answered {status.name}")
        self.status = status


# ---- transports ----------------------------------------------------------------------------


class Transport:
    """What a device is reached through: 32-bit registers and byte-addressed memory.

    ``mem_base`` is the AXI address of the memory the transport exposes at offset 0; the host
    writes it to PROG_BASE. Subclasses implement the four accessors and may override
    :meth:`idle` (called while the host polls STATUS; a simulation advances time there).
    """

    mem_base = 0
    mem_size = 0

    def read_regs(self, offset: int, count: int) -> list[int]:
        raise NotImplementedError

    def write_regs(self, offset: int, values) -> None:
        raise NotImplementedError

    def read_mem(self, addr: int, n: int) -> bytes:
        raise NotImplementedError

    def write_mem(self, addr: int, data: bytes) -> None:
        raise NotImplementedError

    def idle(self, seconds: float) -> None:
        time.sleep(seconds)

    def close(self) -> None:
        pass


class GoldenBoard(Transport):
    """A board in Python: the register file of hw/accel.py over a byte array, and START runs
    the golden model (:func:`vitamin.golden.isasim.simulate`) on the DRAM window.

    The counters are the golden model's; ``cycles`` is the v1 cost model's figure (the golden
    model has no clock). ``hang=True`` makes START never finish (for timeout tests).
    """

    def __init__(self, config, mem_size: int | None = None, *, hang: bool = False):
        from vitamin.config import get_config
        self.config = get_config(config)
        self.mem_size = mem_size or min(self.config.dram_bytes, 1 << 24)
        self.mem = np.zeros(self.mem_size, dtype=np.uint8)
        self.regs = {off: 0 for off in range(0, 0x120, 4)}
        self.regs[REGISTERS["ID"]] = ACCEL_ID
        fp = int.from_bytes(self.config.fingerprint(), "little")
        self.regs[REGISTERS["FP_LO"]] = fp & 0xFFFFFFFF
        self.regs[REGISTERS["FP_HI"]] = fp >> 32
        self.regs[REGISTERS["WATCHDOG"]] = self.config.watchdog_cycles
        self.hang = hang
        self.starts = 0

    _WRITABLE = ("PROG_BASE", "PROG_LEN", "WINDOW", "WATCHDOG")

    def _check(self, offset, count):
        if offset % 4 or offset < 0 or offset + 4 * count > 0x120:
            raise BridgeError(Status.BUS_ERROR, f"register access at {offset:#x}")

    def read_regs(self, offset, count):
        self._check(offset, count)
        return [self.regs.get(offset + 4 * i, 0) for i in range(count)]

    def write_regs(self, offset, values):
        values = list(values)
        self._check(offset, len(values))
        for i, v in enumerate(values):
            off = offset + 4 * i
            v &= 0xFFFFFFFF
            if off == REGISTERS["CTRL"]:
                if v & CTRL_START:
                    self._start(bool(v & CTRL_CLEAR))
            elif off in (REGISTERS[n] for n in self._WRITABLE):
                self.regs[off] = v
            elif REGISTERS["REG0"] + 4 <= off < REGISTERS["REG0"] + 64:
                self.regs[off] = v

    def _start(self, clear):
        from vitamin.golden.isasim import simulate
        from vitamin.isa import ErrorCode
        if self.regs[REGISTERS["STATUS"]] & STATUS_BUSY:
            return
        self.starts += 1
        if self.hang:
            self.regs[REGISTERS["STATUS"]] = STATUS_BUSY
            return
        base = self.regs[REGISTERS["PROG_BASE"]] & ~0xFFF
        window = self.regs[REGISTERS["WINDOW"]] or self.config.dram_bytes
        window = min(window, self.config.dram_bytes, self.mem_size - base)
        regs = {r: _signed32(self.regs[REGISTERS["REG0"] + 4 * r]) for r in range(1, 16)}
        dram = self.mem[base:base + window]
        res = simulate(self.config, dram, self.regs[REGISTERS["PROG_LEN"]], regs=regs)
        self.mem[base:base + window] = res.dram
        c = dict(res.counters)
        c["cycles"] = self._cycles(dram, res)
        for name, off in COUNTERS.items():
            v = int(c.get(name, 0))
            self.regs[off], self.regs[off + 4] = v & 0xFFFFFFFF, v >> 32
        self.regs[REGISTERS["ERROR_PC"]] = max(res.error_pc, 0)
        self.regs[REGISTERS["STATUS"]] = STATUS_DONE | \
            (res.status.value << STATUS_ERROR_SHIFT if res.status != ErrorCode.OK else 0)

    def _cycles(self, dram, res):
        try:
            from vitamin.compiler.cost import estimate
            from vitamin.program import Program
            prog = Program(self.config, bytes(dram[:64 * self.regs[REGISTERS["PROG_LEN"]]]))
            return int(estimate(prog).cycles)
        except Exception:  # noqa: BLE001 - a figure for information only; 0 = unknown
            return 0

    def read_mem(self, addr, n):
        if addr < 0 or addr + n > self.mem_size:
            raise BridgeError(Status.BUS_ERROR, f"memory read at {addr:#x}+{n}")
        return self.mem[addr:addr + n].tobytes()

    def write_mem(self, addr, data):
        if addr < 0 or addr + len(data) > self.mem_size:
            raise BridgeError(Status.BUS_ERROR, f"memory write at {addr:#x}+{len(data)}")
        self.mem[addr:addr + len(data)] = np.frombuffer(bytes(data), dtype=np.uint8)

    def idle(self, seconds):
        pass


def _signed32(v):
    return v - (1 << 32) if v & 0x80000000 else v


class BridgeTransport(Transport):
    """The UART bridge protocol over a byte port (a ``serial.Serial`` or anything with
    ``write(bytes)``, ``read(n)`` returning at most ``n`` bytes after its own timeout, and
    ``reset_input_buffer()``).

    Parameters
    ----------
    port : object
    timeout : float
        Seconds to wait for a complete response before :class:`DeviceTimeout`.
    retries : int
        How many times an exchange is repeated after a NAK (BAD_CRC, TIMEOUT) or a corrupted
        response before :class:`BridgeError` / :class:`DeviceTimeout` is raised.
    mem_size : int
        Size of the board's memory (the ULX3S has 32 MiB of SDRAM).
    resync_delay : float
        Seconds of silence before a retry, longer than the bridge's inter-byte timeout (64
        byte times: 0.64 ms at 1 Mbaud), so that a partial frame is dropped first.
    """

    def __init__(self, port, *, timeout: float = 1.0, retries: int = 3,
                 mem_size: int = 32 << 20, resync_delay: float = 0.005):
        self.port = port
        self.timeout = timeout
        self.retries = retries
        self.mem_size = mem_size
        self.resync_delay = resync_delay
        self.stats = {"frames": 0, "retries": 0, "bytes_out": 0, "bytes_in": 0}

    def _recv(self, n, deadline):
        buf = bytearray()
        while len(buf) < n:
            if time.monotonic() > deadline:
                raise DeviceTimeout(f"the device did not answer within {self.timeout} s "
                                    f"({len(buf)} of {n} response bytes)")
            buf += self.port.read(n - len(buf))
        return bytes(buf)

    def _exchange(self, cmd, addr, count, payload=b""):
        what = f"{Cmd(cmd).name} {addr:#x} x{count}"
        frame = encode_request(cmd, addr, count, payload)
        n_rsp = 4 * count if cmd not in WRITE_CMDS else 0
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats["retries"] += 1
                # let the bridge's inter-byte timeout drop any partial frame it still holds
                time.sleep(self.resync_delay)
            if hasattr(self.port, "reset_input_buffer"):
                self.port.reset_input_buffer()
            self.port.write(frame)
            self.stats["frames"] += 1
            self.stats["bytes_out"] += len(frame)
            deadline = time.monotonic() + self.timeout
            try:
                # hunt for the sync byte (line noise before it is skipped)
                while self._recv(1, deadline)[0] != SYNC_RSP:
                    pass
                status = self._recv(1, deadline)[0]
                body_n = n_rsp if status == Status.OK else 0
                rest = self._recv(body_n + 2, deadline)
            except DeviceTimeout as exc:
                last = exc
                continue
            self.stats["bytes_in"] += 4 + len(rest)
            body = bytes([status]) + rest[:-2]
            if crc16(body) != int.from_bytes(rest[-2:], "little"):
                last = DeviceError(f"{what}: corrupted response (CRC mismatch)")
                continue
            try:
                st = Status(status)
            except ValueError:
                last = DeviceError(f"{what}: unknown response status {status}")
                continue
            if st in (Status.BAD_CRC, Status.TIMEOUT):
                last = BridgeError(st, what)
                continue
            if st != Status.OK:
                raise BridgeError(st, what)
            return body[1:]
        raise last

    def ping(self) -> int:
        return int.from_bytes(self._exchange(Cmd.PING, 0, 1), "little")

    def read_regs(self, offset, count):
        out = []
        for i in range(0, count, MAX_WORDS):
            n = min(MAX_WORDS, count - i)
            raw = self._exchange(Cmd.READ_REG, offset + 4 * i, n)
            out += list(struct.unpack(f"<{n}I", raw))
        return out

    def write_regs(self, offset, values):
        values = [v & 0xFFFFFFFF for v in values]
        for i in range(0, len(values), MAX_WORDS):
            part = values[i:i + MAX_WORDS]
            self._exchange(Cmd.WRITE_REG, offset + 4 * i, len(part),
                           struct.pack(f"<{len(part)}I", *part))

    def read_mem(self, addr, n):
        if addr % 4:
            raise ValueError(f"memory address {addr:#x} is not 4-byte aligned")
        words = (n + 3) // 4
        out = bytearray()
        for i in range(0, words, MAX_WORDS):
            k = min(MAX_WORDS, words - i)
            out += self._exchange(Cmd.READ_MEM, addr + 4 * i, k)
        return bytes(out[:n])

    def write_mem(self, addr, data):
        if addr % 4:
            raise ValueError(f"memory address {addr:#x} is not 4-byte aligned")
        data = bytes(data)
        if len(data) % 4:
            # keep the bytes after the end: read-modify-write the last word
            tail = len(data) & ~3
            data += self.read_mem(addr + len(data) & ~3, 4)[len(data) - tail:]
        for i in range(0, len(data), 4 * MAX_WORDS):
            part = data[i:i + 4 * MAX_WORDS]
            self._exchange(Cmd.WRITE_MEM, addr + i, len(part) // 4, part)

    def close(self):
        if hasattr(self.port, "close"):
            self.port.close()


class BridgeModel:
    """The device side of the bridge protocol in Python (the reference of hw/bridge.py):
    feed request bytes with :meth:`feed`, collect response bytes with :meth:`take`.

    ``target`` is a :class:`Transport` the requests are applied to (e.g. a
    :class:`GoldenBoard`). :meth:`line_idle` is the inter-byte timeout firing.
    """

    def __init__(self, target: Transport):
        self.target = target
        self.buf = bytearray()
        self.out = bytearray()
        self.applied = 0

    def _need(self):
        if len(self.buf) < 7:
            return 7
        cmd, count = self.buf[1], self.buf[6]
        return 9 + (4 * count if cmd in WRITE_CMDS else 0)

    def feed(self, data: bytes):
        for b in data:
            if not self.buf and b != SYNC_REQ:
                continue
            self.buf.append(b)
            if len(self.buf) == self._need():
                self._frame(bytes(self.buf))
                self.buf.clear()

    def line_idle(self):
        if self.buf:
            self.buf.clear()
            self.out += encode_response(Status.TIMEOUT)

    def take(self) -> bytes:
        out, self.out = bytes(self.out), bytearray()
        return out

    def _frame(self, f):
        body = f[1:-2]
        if crc16(body) != int.from_bytes(f[-2:], "little"):
            self.out += encode_response(Status.BAD_CRC)
            return
        cmd, addr, count = f[1], int.from_bytes(f[2:6], "little"), f[6]
        payload = f[7:-2]
        if cmd not in set(Cmd):
            self.out += encode_response(Status.BAD_CMD)
        elif count == 0 or count > MAX_WORDS or (cmd == Cmd.PING and count != 1):
            self.out += encode_response(Status.BAD_LEN)
        elif addr % 4:
            self.out += encode_response(Status.BAD_ALIGN)
        elif cmd in (Cmd.READ_REG, Cmd.WRITE_REG) and addr + 4 * count > REG_SPACE:
            self.out += encode_response(Status.BUS_ERROR)
        else:
            try:
                rsp = self._apply(Cmd(cmd), addr, count, payload)
            except BridgeError:
                self.out += encode_response(Status.BUS_ERROR)
                return
            self.applied += 1
            self.out += encode_response(Status.OK, rsp)

    def _apply(self, cmd, addr, count, payload):
        t = self.target
        if cmd == Cmd.PING:
            return struct.pack("<I", BRIDGE_ID)
        if cmd == Cmd.READ_REG:
            return struct.pack(f"<{count}I", *t.read_regs(addr, count))
        if cmd == Cmd.WRITE_REG:
            t.write_regs(addr, struct.unpack(f"<{count}I", payload))
            return b""
        if cmd == Cmd.READ_MEM:
            return t.read_mem(addr, 4 * count)
        t.write_mem(addr, payload)
        return b""


class LoopbackPort:
    """A pyserial-like port connected to a :class:`BridgeModel` (for tests and ``sim``).

    ``corrupt(frame_bytes) -> bytes`` may alter each written chunk (line noise); ``mute``
    makes the device stop answering.
    """

    def __init__(self, model: BridgeModel, corrupt=None):
        self.model = model
        self.corrupt = corrupt
        self.mute = False
        self.rx = bytearray()

    def write(self, data):
        data = bytes(data)
        if self.corrupt is not None:
            data = self.corrupt(data)
        if self.mute:
            return len(data)
        self.model.feed(data)
        # the line goes idle after each host write: a truncated frame times out
        self.model.line_idle()
        self.rx += self.model.take()
        return len(data)

    def read(self, n):
        out, self.rx = bytes(self.rx[:n]), self.rx[n:]
        if not out:
            time.sleep(0.001)
        return out

    def reset_input_buffer(self):
        self.rx.clear()


class SerialTransport(BridgeTransport):
    """:class:`BridgeTransport` over a serial port (pyserial, imported when used)."""

    def __init__(self, port: str, baud: int = 1_000_000, **kw):
        try:
            import serial
        except ImportError:
            raise DeviceUnavailable("the serial transport needs pyserial: pip install "
                                    "pyserial") from None
        try:
            ser = serial.Serial(port, baud, timeout=0.05)
        except (serial.SerialException, OSError) as exc:
            raise DeviceUnavailable(f"cannot open serial port {port!r}: {exc}") from None
        super().__init__(ser, **kw)


class ZynqTransport(Transport):
    """Zynq PS <-> PL through ``/dev/mem`` (PYNQ-style), for the zcu102 block design of
    boards/zcu102: the accelerator's AXI4-Lite registers at ``regs_addr`` (the address the
    block design gives ``s_axil``), and a DRAM buffer at physical ``mem_addr`` of ``mem_size``
    bytes that Linux does not use (e.g. reserved with ``mem=`` or a reserved-memory node), which
    the accelerator's AXI master reaches at the same address through an HP port.

    Not tested here (no board): it is deliberately nothing more than two ``mmap`` views.
    """

    def __init__(self, regs_addr: int = 0xA000_0000, mem_addr: int = 0x7000_0000,
                 mem_size: int = 64 << 20):
        try:
            fd = os.open("/dev/mem", os.O_RDWR | os.O_SYNC)
        except OSError as exc:
            raise DeviceUnavailable(f"cannot open /dev/mem ({exc.strerror}): the zynq transport "
                                    f"runs on the board, as root") from None
        try:
            self._regs = mmap.mmap(fd, 0x1000, offset=regs_addr)
            self._mem = mmap.mmap(fd, mem_size, offset=mem_addr)
        finally:
            os.close(fd)
        self.mem_base, self.mem_size = mem_addr, mem_size

    def read_regs(self, offset, count):
        return [struct.unpack_from("<I", self._regs, offset + 4 * i)[0] for i in range(count)]

    def write_regs(self, offset, values):
        for i, v in enumerate(values):
            struct.pack_into("<I", self._regs, offset + 4 * i, v & 0xFFFFFFFF)

    def read_mem(self, addr, n):
        return bytes(self._mem[addr:addr + n])

    def write_mem(self, addr, data):
        self._mem[addr:addr + len(data)] = bytes(data)

    def close(self):
        self._regs.close()
        self._mem.close()


# ---- the device ------------------------------------------------------------------------------


@dataclass
class DeviceResult:
    """What :meth:`Device.wait` found: the error code, the faulting instruction, the counters."""
    status: int
    error_pc: int
    counters: dict

    @property
    def ok(self) -> bool:
        return self.status == 0


class Device:
    """One accelerator behind a :class:`Transport` (see the module docstring)."""

    def __init__(self, transport: Transport, config=None, *, check_id: bool = True):
        from vitamin.config import get_config
        self.transport = transport
        self.config = None if config is None else get_config(config)
        self._loaded = None
        if check_id:
            ident = self.read_reg("ID")
            if ident != ACCEL_ID:
                raise DeviceError(f"no vitamin accelerator answers: ID register reads "
                                  f"{ident:#010x}, expected {ACCEL_ID:#010x}")
            if self.config is not None:
                lo, hi = self.transport.read_regs(REGISTERS["FP_LO"], 2)
                fp = (lo | hi << 32).to_bytes(8, "little")
                if fp != self.config.fingerprint():
                    raise DeviceError(f"the device's configuration fingerprint {fp.hex()} is "
                                      f"not that of {self.config.name!r} "
                                      f"({self.config.fingerprint().hex()})")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.transport.close()

    def read_reg(self, name) -> int:
        off = REGISTERS[name] if isinstance(name, str) else int(name)
        return self.transport.read_regs(off, 1)[0]

    def write_reg(self, name, value: int) -> None:
        off = REGISTERS[name] if isinstance(name, str) else int(name)
        self.transport.write_regs(off, [value])

    def set_regs(self, regs: dict) -> None:
        """REG[1..15] (REG[1] is the task of a multi-task program); unset ones become 0."""
        vals = [0] * 15
        for r, v in (regs or {}).items():
            if not 1 <= int(r) <= 15:
                raise ValueError(f"register REG[{r}] does not exist or is read-only (1..15)")
            vals[int(r) - 1] = int(v) & 0xFFFFFFFF
        self.transport.write_regs(REGISTERS["REG0"] + 4, vals)

    def load(self, program, int_inputs: dict | None = None, regs: dict | None = None,
             offset: int = 0) -> None:
        """Write the program's DRAM image (with ``int_inputs`` in it) at ``offset`` of the
        transport's memory and set PROG_BASE, PROG_LEN, WINDOW and REG[1..15]."""
        if self.config is not None and program.config.fingerprint() != \
                self.config.fingerprint():
            raise ValueError(f"the program is built for {program.config.name!r}, the device "
                             f"is {self.config.name!r}")
        if offset % 4096:
            raise ValueError(f"offset {offset:#x} is not 4 KiB aligned (PROG_BASE)")
        img = program.dram_image()
        for name, v in (int_inputs or {}).items():
            program.write_tensor(img, name, v)
        if self.transport.mem_size and offset + len(img) > self.transport.mem_size:
            raise ValueError(f"the program needs {len(img)} bytes of memory; the device has "
                             f"{self.transport.mem_size - offset} from offset {offset:#x}")
        self.transport.write_mem(offset, img.tobytes())
        base = self.transport.mem_base + offset
        self.transport.write_regs(REGISTERS["PROG_BASE"], [base, program.n_instr, len(img)])
        self.set_regs(regs or {})
        self._loaded = (program, offset)

    def start(self, clear: bool = True) -> None:
        self.write_reg("CTRL", CTRL_START | (CTRL_CLEAR if clear else 0))

    def wait(self, timeout: float = 10.0, poll: float = 0.002) -> DeviceResult:
        """Poll STATUS until DONE; :class:`DeviceTimeout` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.read_reg("STATUS")
            if st & STATUS_DONE and not st & STATUS_BUSY:
                break
            if time.monotonic() > deadline:
                raise DeviceTimeout(f"the program did not halt within {timeout} s (STATUS "
                                    f"{st:#x}, PC {self.read_reg('PC')})")
            self.transport.idle(poll)
        code = (st >> STATUS_ERROR_SHIFT) & 0xF
        return DeviceResult(code, self.read_reg("ERROR_PC"), self.counters())

    def counters(self) -> dict:
        first = min(COUNTERS.values())
        n = (max(COUNTERS.values()) + 8 - first) // 4
        words = self.transport.read_regs(first, n)
        return {name: words[(off - first) // 4] | words[(off - first) // 4 + 1] << 32
                for name, off in COUNTERS.items()}

    def read_outputs(self, program=None) -> dict:
        """Integer outputs {name: array} of the loaded program, read from device memory."""
        if self._loaded is None:
            raise DeviceError("no program loaded")
        prog, offset = self._loaded
        program = program or prog
        out = {}
        for s in program.outputs:
            raw = np.frombuffer(self.transport.read_mem(offset + s.addr, s.nbytes), np.uint8)
            img = np.zeros(s.addr + s.nbytes, dtype=np.uint8)
            img[s.addr:] = raw
            out[s.name] = program.read_tensor(img, s.name)
        return out

    def run(self, program, inputs: dict, *, task=None, regs=None, timeout: float = 10.0,
            quantized: bool = False):
        """Load, start, wait, read: the same result as :func:`vitamin.run` (a
        :class:`vitamin.api.RunOutput`). ``inputs`` are floats unless ``quantized``."""
        from vitamin.api import RunOutput, quantize_inputs, task_regs
        from vitamin.golden.isasim import Fault
        from vitamin.isa import ErrorCode
        inputs, regs = task_regs(program, inputs, task, regs)
        q = inputs if quantized else quantize_inputs(program, inputs)
        self.load(program, q, regs)
        self.start()
        res = self.wait(timeout)
        if not res.ok:
            code = ErrorCode(res.status)
            raise Fault(code, res.error_pc, f"{code.name} reported by the device")
        raw = self.read_outputs(program)
        outs = {n: raw[n].astype(np.float64) * program.symbol(n).scale for n in raw}
        return RunOutput(outputs=outs, raw=raw, counters=res.counters,
                         cycles=res.counters.get("cycles"))


def _parse_int(s):
    return int(s, 0)


def open_device(spec: str, config=None, **kw) -> Device:
    """Open a device from a spec string: ``sim``, ``sim:golden``, ``sim:rtl``,
    ``serial:PORT[@BAUD]``, ``zynq[:REGS,MEM,SIZE]`` (see the module docstring)."""
    kind, _, arg = spec.partition(":")
    if kind == "sim":
        if config is None:
            raise ValueError("the sim device needs a configuration (the program's)")
        if arg in ("", "golden"):
            return Device(GoldenBoard(config), config)
        if arg == "rtl":
            from vitamin.sim.boardsim import RtlBoard
            return Device(RtlBoard(config, **kw), config)
        raise ValueError(f"unknown sim device {arg!r}; use sim, sim:golden or sim:rtl")
    if kind == "serial":
        if not arg:
            raise ValueError("serial device needs a port: serial:/dev/ttyUSB0[@BAUD]")
        port, _, baud = arg.partition("@")
        return Device(SerialTransport(port, int(baud) if baud else 1_000_000, **kw), config)
    if kind == "zynq":
        nums = [_parse_int(x) for x in arg.split(",")] if arg else []
        if len(nums) not in (0, 1, 3):
            raise ValueError(f"zynq device: give zynq, zynq:REGS or zynq:REGS,MEM,SIZE, "
                             f"not {spec!r}")
        return Device(ZynqTransport(*nums), config)
    raise ValueError(f"unknown device {spec!r}; devices: sim, sim:rtl, serial:PORT[@BAUD], zynq")


def run_on_device(program, inputs: dict, device: str = "sim", *, task=None,
                  timeout: float = 30.0, **open_options):
    """``vitamin run --device DEVICE``: open ``device``, run ``program`` on float ``inputs``,
    close; returns a :class:`vitamin.api.RunOutput` like :func:`vitamin.run`."""
    with open_device(device, program.config, **open_options) as dev:
        return dev.run(program, inputs, task=task, timeout=timeout)
