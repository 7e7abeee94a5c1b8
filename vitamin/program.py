"""The vitamin program file.

Layout (all integers little-endian)::

    offset  size  field
    0       8     magic b"VITAMIN\\0"
    8       2     format version (FORMAT_VERSION)
    10      2     header size (64)
    12      4     flags (0)
    16      8     configuration fingerprint (Config.fingerprint())
    24      4     number of instructions
    28      4     file offset of the instruction stream (64-byte words)
    32      4     file offset of the constant segment
    36      4     size of the constant segment in bytes
    40      4     file offset of the symbol table (UTF-8 JSON)
    44      4     size of the symbol table in bytes
    48      4     DRAM window the program needs, in bytes
    52      4     DRAM address of the constant segment (the code is at DRAM address 0)
    56      4     file size in bytes
    60      4     CRC-32 of the whole file with this field zeroed

The DRAM image of a program: the instruction stream at address 0, the constant segment at
``const_addr``, zeros elsewhere up to ``dram_size``; inputs are written and outputs read at the
addresses of the symbol table.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import Config, get_config
from .isa import INSTR_BYTES

__all__ = ["MAGIC", "FORMAT_VERSION", "HEADER_SIZE", "Program", "Symbol", "ProgramError",
           "TruncatedProgram", "CorruptProgram", "VersionMismatch", "ConfigMismatch", "NotAProgram"]

MAGIC = b"VITAMIN\x00"
FORMAT_VERSION = 1
HEADER_SIZE = 64
_HDR = struct.Struct("<8sHHI8sIIIIIIIIII")
assert _HDR.size == HEADER_SIZE

DTYPES = {"i8": (np.int8, 1), "u8": (np.uint8, 1), "i16": (np.int16, 2), "i32": (np.int32, 4)}


class ProgramError(ValueError):
    """A program file that cannot be used; subclasses say why."""


class NotAProgram(ProgramError):
    pass


class TruncatedProgram(ProgramError):
    pass


class CorruptProgram(ProgramError):
    pass


class VersionMismatch(ProgramError):
    pass


class ConfigMismatch(ProgramError):
    pass


@dataclass
class Symbol:
    """A tensor in DRAM: an input or output of the program (or a scratch region)."""
    name: str
    kind: str            # "input" | "output" | "scratch"
    addr: int            # DRAM byte address
    shape: tuple
    dtype: str           # "i8" | "u8" | "i16" | "i32"
    scale: float = 1.0   # real value = integer * scale

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * DTYPES[self.dtype][1]

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "addr": self.addr,
                "shape": list(self.shape), "dtype": self.dtype, "scale": self.scale}

    @classmethod
    def from_json(cls, d: dict) -> Symbol:
        return cls(d["name"], d["kind"], int(d["addr"]), tuple(d["shape"]), d["dtype"],
                   float(d.get("scale", 1.0)))


@dataclass
class Program:
    """An executable vitamin program: instructions, constants, and the symbol table."""
    config: Config
    code: bytes
    consts: bytes = b""
    const_addr: int = 0
    dram_size: int = 0
    symbols: list = field(default_factory=list)
    regs: list = field(default_factory=list)   # [{"name", "reg", "min", "max"}] run-time inputs
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if len(self.code) % INSTR_BYTES:
            raise ProgramError(f"code is {len(self.code)} bytes, not a multiple of {INSTR_BYTES}")
        if not self.dram_size:
            self.dram_size = max(self.const_addr + len(self.consts), len(self.code),
                                 *(s.addr + s.nbytes for s in self.symbols), 0)
        if self.const_addr < len(self.code) and self.consts:
            raise ProgramError(f"constant segment at {self.const_addr:#x} overlaps the code "
                               f"(ends at {len(self.code):#x})")
        if self.dram_size > self.config.dram_bytes:
            raise ProgramError(f"program needs {self.dram_size} bytes of DRAM; configuration "
                               f"{self.config.name!r} has a window of {self.config.dram_bytes}")

    @property
    def n_instr(self) -> int:
        return len(self.code) // INSTR_BYTES

    def symbol(self, name: str) -> Symbol:
        for s in self.symbols:
            if s.name == name:
                return s
        raise KeyError(f"program has no symbol {name!r}; symbols: "
                       f"{', '.join(s.name for s in self.symbols)}")

    @property
    def inputs(self) -> list:
        return [s for s in self.symbols if s.kind == "input"]

    @property
    def outputs(self) -> list:
        return [s for s in self.symbols if s.kind == "output"]

    # -- DRAM image --------------------------------------------------------------------------

    def dram_image(self) -> np.ndarray:
        img = np.zeros(self.dram_size, dtype=np.uint8)
        img[:len(self.code)] = np.frombuffer(self.code, dtype=np.uint8)
        if self.consts:
            img[self.const_addr:self.const_addr + len(self.consts)] = np.frombuffer(
                self.consts, dtype=np.uint8)
        return img

    def write_tensor(self, image: np.ndarray, name: str, values: np.ndarray) -> None:
        """Write integer ``values`` to symbol ``name`` in ``image`` (shape and range checked)."""
        sym = self.symbol(name)
        values = np.asarray(values)
        if tuple(values.shape) != tuple(sym.shape):
            raise ValueError(f"input {name!r}: shape {tuple(values.shape)} does not match the "
                             f"program's {tuple(sym.shape)}")
        dt, _ = DTYPES[sym.dtype]
        info = np.iinfo(dt)
        if values.min(initial=0) < info.min or values.max(initial=0) > info.max:
            raise ValueError(f"input {name!r}: values outside {sym.dtype} range")
        raw = values.astype(dt).astype(np.dtype(dt).newbyteorder("<")).tobytes()
        image[sym.addr:sym.addr + len(raw)] = np.frombuffer(raw, dtype=np.uint8)

    def read_tensor(self, image: np.ndarray, name: str) -> np.ndarray:
        sym = self.symbol(name)
        dt, _ = DTYPES[sym.dtype]
        raw = image[sym.addr:sym.addr + sym.nbytes].tobytes()
        return np.frombuffer(raw, dtype=np.dtype(dt).newbyteorder("<")).astype(dt).reshape(
            sym.shape)

    # -- file format -------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        symtab = json.dumps({"config": self.config.name,
                             "symbols": [s.to_json() for s in self.symbols],
                             "regs": self.regs, "meta": self.meta},
                            sort_keys=True).encode()
        code_off = HEADER_SIZE
        const_off = code_off + len(self.code)
        sym_off = const_off + len(self.consts)
        size = sym_off + len(symtab)
        hdr = _HDR.pack(MAGIC, FORMAT_VERSION, HEADER_SIZE, 0, self.config.fingerprint(),
                        self.n_instr, code_off, const_off, len(self.consts), sym_off, len(symtab),
                        self.dram_size, self.const_addr, size, 0)
        body = hdr + self.code + self.consts + symtab
        crc = zlib.crc32(body)
        return body[:60] + struct.pack("<I", crc) + body[64:]

    def save(self, path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def from_bytes(cls, blob: bytes, config=None, *, source: str = "program") -> Program:
        """Parse a program file; checks, in order: magic, version, length, checksum, config.

        ``config`` (a Config or preset name) is the configuration the caller will run on; when
        None, the preset whose fingerprint matches is used.
        """
        if len(blob) < HEADER_SIZE:
            if blob[:min(len(blob), 8)] != MAGIC[:min(len(blob), 8)]:
                raise NotAProgram(f"{source}: not a vitamin program (bad magic)")
            raise TruncatedProgram(f"{source}: truncated: {len(blob)} bytes, shorter than the "
                                   f"{HEADER_SIZE}-byte header")
        (magic, version, hsize, _flags, fp, n_instr, code_off, const_off, const_size, sym_off,
         sym_size, dram_size, const_addr, size, crc) = _HDR.unpack_from(blob)
        if magic != MAGIC:
            raise NotAProgram(f"{source}: not a vitamin program (bad magic {magic!r})")
        if version != FORMAT_VERSION:
            raise VersionMismatch(f"{source}: program format version {version}; this vitamin "
                                  f"reads version {FORMAT_VERSION} (recompile the model)")
        if len(blob) < size:
            raise TruncatedProgram(f"{source}: truncated: {len(blob)} of {size} bytes")
        if len(blob) > size:
            raise CorruptProgram(f"{source}: corrupted: {len(blob) - size} bytes after the end "
                                 f"recorded in the header")
        if zlib.crc32(blob[:60] + b"\0\0\0\0" + blob[64:]) != crc:
            raise CorruptProgram(f"{source}: corrupted: checksum mismatch")
        if hsize != HEADER_SIZE or code_off != HEADER_SIZE or \
                code_off + n_instr * INSTR_BYTES != const_off or \
                const_off + const_size != sym_off or sym_off + sym_size != size:
            raise CorruptProgram(f"{source}: corrupted: inconsistent section offsets")
        try:
            symtab = json.loads(blob[sym_off:sym_off + sym_size].decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptProgram(f"{source}: corrupted symbol table: {e}") from None
        from .config import PRESETS
        if config is None:
            matches = [c for c in PRESETS.values() if c.fingerprint() == fp]
            if not matches:
                raise ConfigMismatch(f"{source}: built for configuration "
                                     f"{symtab.get('config')!r} (fingerprint {fp.hex()}), "
                                     f"which matches no preset; pass its Config")
            config = matches[0]
        config = get_config(config)
        if config.fingerprint() != fp:
            raise ConfigMismatch(f"{source}: built for configuration {symtab.get('config')!r} "
                                 f"(fingerprint {fp.hex()}), not for {config.name!r} "
                                 f"(fingerprint {config.fingerprint().hex()})")
        return cls(config=config, code=bytes(blob[code_off:const_off]),
                   consts=bytes(blob[const_off:sym_off]), const_addr=const_addr,
                   dram_size=dram_size,
                   symbols=[Symbol.from_json(s) for s in symtab["symbols"]],
                   regs=symtab.get("regs", []), meta=symtab.get("meta", {}))

    @classmethod
    def load(cls, path, config=None) -> Program:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"{path}: no such program file")
        return cls.from_bytes(p.read_bytes(), config, source=str(path))
