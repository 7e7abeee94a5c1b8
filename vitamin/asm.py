"""A small assembler and linker for vitamin programs.

Used by the compiler and by tests that hand-assemble programs. Instruction fields that hold DRAM
addresses may be given as :class:`Ref` (a symbol plus a byte offset); they are resolved when the
program is linked, once the size of the code (which sits at DRAM address 0) is known.

Example
-------
>>> a = Assembler(get_config("tiny"))
>>> w = a.const("w", np.ones((4, 4), np.int8), "i8")
>>> x = a.tensor("x", "input", (4, 4), "i16", scale=2**-8)
>>> a.load(dram_addr=x, spad_addr=0, run=16, n0=1, dtype=DType.I16, push_next=1)
>>> ...
>>> prog = a.link()
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import isa
from .config import get_config
from .isa import Opcode
from .program import DTYPES, Program, Symbol

__all__ = ["Ref", "Assembler"]

ALIGN = 64


@dataclass(frozen=True)
class Ref:
    """A DRAM address relative to a symbol, resolved at link time."""
    symbol: str
    offset: int = 0

    def __add__(self, off: int) -> Ref:
        return Ref(self.symbol, self.offset + int(off))


def _align(x: int, a: int = ALIGN) -> int:
    return -(-x // a) * a


class Assembler:
    """Collects instructions, constants and tensors, then links them into a :class:`Program`."""

    def __init__(self, config):
        self.config = get_config(config)
        self.instrs: list[tuple[Opcode, dict]] = []
        self._consts: list[tuple[str, bytes, Symbol]] = []
        self._tensors: list[Symbol] = []
        self.regs: list[dict] = []
        self.meta: dict = {}

    # -- data --------------------------------------------------------------------------------

    def const(self, name: str, values, dtype: str) -> Ref:
        """Add a constant tensor (weights, tables, channel parameters) to the constant segment."""
        if dtype not in DTYPES:
            raise ValueError(f"const {name!r}: unknown dtype {dtype!r}")
        dt, _ = DTYPES[dtype]
        values = np.asarray(values)
        info = np.iinfo(dt)
        if values.size and (values.min() < info.min or values.max() > info.max):
            raise ValueError(f"const {name!r}: values outside the {dtype} range")
        raw = values.astype(np.dtype(dt).newbyteorder("<")).tobytes()
        self._check_name(name)
        sym = Symbol(name, "const", 0, tuple(values.shape), dtype)
        self._consts.append((name, raw, sym))
        return Ref(name)

    def tensor(self, name: str, kind: str, shape, dtype: str, scale: float = 1.0) -> Ref:
        """Reserve a DRAM tensor: an ``input``, an ``output`` or ``scratch``."""
        if kind not in ("input", "output", "scratch"):
            raise ValueError(f"tensor {name!r}: kind must be input, output or scratch")
        if dtype not in DTYPES:
            raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r}")
        self._check_name(name)
        self._tensors.append(Symbol(name, kind, 0, tuple(int(s) for s in shape), dtype,
                                    float(scale)))
        return Ref(name)

    def reg(self, name: str, reg: int, lo: int, hi: int) -> None:
        """Declare host register ``reg`` as a run-time input ``name`` with range lo..hi."""
        if not 1 <= reg <= 15:
            raise ValueError(f"register {reg} is not a host register (1..15)")
        self.regs.append({"name": name, "reg": reg, "min": lo, "max": hi})

    def _check_name(self, name):
        if any(n == name for n, _, _ in self._consts) or any(s.name == name
                                                             for s in self._tensors):
            raise ValueError(f"duplicate symbol {name!r}")

    # -- instructions ------------------------------------------------------------------------

    def emit(self, opcode: Opcode, **fields) -> int:
        """Append an instruction; returns its index. Fields are checked now (Refs at link)."""
        opcode = Opcode(opcode)
        probe = {k: (0 if isinstance(v, Ref) else v) for k, v in fields.items()}
        isa.encode(opcode, **probe)
        self.instrs.append((opcode, dict(fields)))
        return len(self.instrs) - 1

    def load(self, **f) -> int:
        """LOAD; loop counts n0, n1, n2 default to 1."""
        return self.emit(Opcode.LOAD, **{"n0": 1, "n1": 1, "n2": 1, **f})

    def store(self, **f) -> int:
        """STORE; loop counts n0, n1, n2 default to 1."""
        return self.emit(Opcode.STORE, **{"n0": 1, "n1": 1, "n2": 1, **f})

    def matmul(self, **f) -> int:
        return self.emit(Opcode.MATMUL, **f)

    def softmax(self, **f) -> int:
        return self.emit(Opcode.SOFTMAX, **f)

    def layernorm(self, **f) -> int:
        return self.emit(Opcode.LAYERNORM, **f)

    def topk(self, **f) -> int:
        return self.emit(Opcode.TOPK, **f)

    def route(self, **f) -> int:
        return self.emit(Opcode.ROUTE, **f)

    def spans(self, **f) -> int:
        return self.emit(Opcode.SPANS, **f)

    def vec(self, **f) -> int:
        return self.emit(Opcode.VEC, **f)

    def mark(self, id: int, **f) -> int:
        return self.emit(Opcode.MARK, id=id, **f)

    def end(self, **f) -> int:
        return self.emit(Opcode.END, **f)

    # -- link --------------------------------------------------------------------------------

    def link(self) -> Program:
        """Lay out DRAM (code, constants, tensors), resolve Refs, encode, and build the Program."""
        if not self.instrs or self.instrs[-1][0] != Opcode.END:
            raise ValueError("program must end with END")
        code_bytes = len(self.instrs) * isa.INSTR_BYTES
        const_addr = _align(code_bytes, 4096)
        addr = {}
        consts = bytearray()
        symbols = []
        for name, raw, sym in self._consts:
            off = _align(len(consts))
            consts.extend(b"\0" * (off - len(consts)))
            consts.extend(raw)
            addr[name] = const_addr + off
            sym.addr = const_addr + off
            symbols.append(sym)
        top = _align(const_addr + len(consts), 4096)
        for sym in self._tensors:
            sym.addr = top
            addr[sym.name] = top
            top = _align(top + sym.nbytes)
            symbols.append(sym)
        code = bytearray()
        for op, fields in self.instrs:
            resolved = {}
            for k, v in fields.items():
                if isinstance(v, Ref):
                    if v.symbol not in addr:
                        raise ValueError(f"{op.name}: field {k!r} refers to unknown symbol "
                                         f"{v.symbol!r}")
                    v = addr[v.symbol] + v.offset
                resolved[k] = v
            code.extend(isa.encode(op, **resolved))
        return Program(config=self.config, code=bytes(code), consts=bytes(consts),
                       const_addr=const_addr if consts else 0, dram_size=_align(top, 4096),
                       symbols=symbols, regs=list(self.regs), meta=dict(self.meta))
