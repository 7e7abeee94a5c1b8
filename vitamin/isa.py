"""The vitamin instruction set, defined once.

Every instruction is a 512-bit word. Each format is an Amaranth :class:`~amaranth.lib.data.Struct`
whose first member is the common :class:`Header` (opcode, dependency tokens, predicate). The
compiler encodes with :func:`encode`, the golden simulator decodes with :func:`decode`, and the
gateware decodes with the same Structs as views on the fetched word. No bit position is written
anywhere else.

The semantics of every field are documented in docs/ISA.md and implemented in
:mod:`vitamin.golden`.
"""



from functools import lru_cache

from amaranth.lib import data, enum

__all__ = [
    "INSTR_BITS", "INSTR_BYTES", "Opcode", "Unit", "DType", "Mem", "DmaMode", "AccIn", "OutMode",
    "Act", "SmMode", "VecOp", "ErrorCode", "Header", "Dma", "Matmul", "Softmax", "LayerNorm",
    "TopK", "Route", "Spans", "Select", "Vec", "Mark", "End", "FORMATS", "UNIT_OF", "encode",
    "decode", "decode_header", "isa_table", "format_isa_table", "DecodeError", "SIGNED_FIELDS",
]

INSTR_BITS = 512
INSTR_BYTES = INSTR_BITS // 8

# Field widths shared by several formats.
SPAD_ADDR = 22   # scratchpad element address (config.spad_words <= 2^22)
DRAM_ADDR = 32   # byte address inside the accelerator's DRAM window
IDX_ADDR = 20    # index-memory entry address
COUNT = 16       # counts hold 0..65535 (config.max_dim, config.max_k <= 32768)
MULT = 16        # signed 16-bit multipliers
SHIFT = 6        # right shifts 0..63


class Opcode(enum.Enum, shape=5):
    """Opcodes. 0 is illegal so that zeroed memory traps."""
    LOAD = 1
    STORE = 2
    MATMUL = 3
    SOFTMAX = 4
    LAYERNORM = 5
    TOPK = 6
    ROUTE = 7
    SPANS = 8
    VEC = 9
    MARK = 10
    SELECT = 11
    END = 31


class Unit(enum.Enum, shape=2):
    """The three decoupled modules; instructions of one module execute in program order."""
    LOAD = 0
    COMPUTE = 1
    STORE = 2


class DType(enum.Enum, shape=2):
    """Element format in DRAM."""
    I8 = 0    # signed byte; sign-extended on load, saturated on store
    I16 = 1   # little-endian signed 16-bit
    U8 = 2    # unsigned byte (images); zero-extended on load, saturated to 0..255 on store
    I32 = 3   # little-endian signed 32-bit pairs: index-memory entries only


class Mem(enum.Enum, shape=1):
    """On-chip side of a LOAD or STORE."""
    SPAD = 0
    IDX = 1


class DmaMode(enum.Enum, shape=1):
    STRIDED = 0   # three nested loops of contiguous runs
    SPANS = 1     # rows gathered from a span list in index memory


class AccIn(enum.Enum, shape=2):
    """What the accumulators hold before the products are added."""
    ZERO = 0    # start from zero
    ACC = 1     # add to the partial sums already in ACC (saturating)
    SCALE = 2   # ACC row i is first multiplied by row state c[rs_base + i] (online softmax)


class OutMode(enum.Enum, shape=2):
    ACC = 0       # leave the sums in ACC, no epilogue
    SPAD = 1      # epilogue, write rows to the scratchpad
    SPAD_ADD = 2  # epilogue, scale by the queue entry's probability, add into the row (MoE)


class Act(enum.Enum, shape=2):
    NONE = 0
    GELU = 1
    RELU = 2


class SmMode(enum.Enum, shape=1):
    FULL = 0     # whole rows: single pass for max and sum, then probabilities
    ONLINE = 1   # a chunk of columns: update row state, write unnormalised exp values


class VecOp(enum.Enum, shape=2):
    COPY = 0   # z = sat(rnd(a * ma >> sa))
    ADD = 1    # z = sat(rnd(a * ma >> sa) + rnd(b * mb >> sb))
    MUL = 2    # z = sat(rnd(a * b * ma >> sa))
    POOL = 3   # row r of z = sat(rnd(sum of rows r*group .. r*group+group-1 of a, times ma, >> sa))


class ErrorCode(enum.Enum, shape=4):
    """Error status shared by the golden simulator and the hardware's status register."""
    OK = 0
    ILLEGAL_OPCODE = 1
    DRAM_RANGE = 2
    SPAD_RANGE = 3
    ACC_RANGE = 4
    IDX_RANGE = 5
    BAD_FIELD = 6
    DEADLOCK = 7
    WATCHDOG = 8
    NO_END = 9
    ROUTE_RANGE = 10
    ROWSTATE_RANGE = 11


class Header(data.Struct):
    """Common to every instruction (bits 0..17)."""
    opcode: Opcode
    pop_prev: 1    # wait for a token from the previous module (module number - 1; LOAD=0..STORE=2)
    pop_next: 1    # wait for a token from the next module
    push_prev: 1   # signal the previous module
    push_next: 1   # signal the next module
    pred_en: 1     # execute only when expert queue `pred_q` is not empty (tokens still move)
    pred_q: 8


class Dma(data.Struct):
    """LOAD (DRAM -> on chip) and STORE (on chip -> DRAM).

    Strided: for i2 < n2, i1 < n1, i0 < n0: a run of `run` elements from
    dram_addr + blk + i2*ds2 + i1*ds1 + i0*ds0 (bytes) to spad_addr + i2*ss2 + i1*ss1 + i0*ss0.
    Spans: for i1 < n1, for each span (start, len) j < count of IDX[idx_addr..]: rows r in
    [start, start+len) of `run` elements from dram_addr + blk + i1*ds1 + r*ds0, to consecutive
    on-chip rows spad_addr + i1*ss1 + (row counter)*ss0.
    blk = REG[blk_reg] * blk_stride (0 when blk_reg = 0).
    """
    hdr: Header
    mem: Mem
    mode: DmaMode
    dtype: DType
    dram_addr: DRAM_ADDR
    spad_addr: SPAD_ADDR
    run: COUNT
    n0: COUNT
    n1: COUNT
    n2: COUNT
    ds0: 32
    ds1: 32
    ds2: 32
    ss0: SPAD_ADDR
    ss1: SPAD_ADDR
    ss2: SPAD_ADDR
    idx_addr: IDX_ADDR
    count_reg: 4      # SPANS: number of spans = REG[count_reg], or n2 when count_reg = 0
    blk_reg: 4
    blk_stride: 32


class Matmul(data.Struct):
    """ACC/SPAD <- A[m x k] . B[k x n] with the fused epilogue (docs/ISA.md, MATMUL)."""
    hdr: Header
    acc_in: AccIn
    out: OutMode
    act: Act
    b_trans: 1        # B is stored as n rows of k elements (B^T), e.g. K in Q.K^T
    chan_en: 1        # per-column bias/mult/shift from the channel table at chan_addr
    res_en: 1         # add a residual read from res_addr (row stride out_stride)
    row_norm: 1       # multiply row i by 1/s of row state rs_base + i before the epilogue
    gather: 1         # A row i is A row token(queue entry i); rows = queue length (<= m)
    scatter: 1        # output row i goes to row token(queue entry i)
    queue: 8
    m: COUNT
    k: COUNT
    n: COUNT
    a_addr: SPAD_ADDR
    a_stride: SPAD_ADDR
    b_addr: SPAD_ADDR
    b_stride: SPAD_ADDR
    acc_addr: 16
    out_addr: SPAD_ADDR
    out_stride: SPAD_ADDR
    chan_addr: SPAD_ADDR
    mult: MULT
    shift: SHIFT
    act_mult: MULT
    act_shift: SHIFT
    res_addr: SPAD_ADDR
    res_mult: MULT
    res_shift: SHIFT
    rs_base: COUNT


class Softmax(data.Struct):
    """Row softmax (FULL) or one chunk of the online softmax (ONLINE)."""
    hdr: Header
    mode: SmMode
    first: 1          # ONLINE: reset the row state before this chunk
    last: 1           # ONLINE: after this chunk, compute 1/s into the row state
    causal: 1         # mask column j of row i when kpos(j) > q_pos + i
    kpos_spans: 1     # kpos(j) from the span list at idx_addr (count from count_reg or n_spans)
    count_reg: 4
    m: COUNT
    n: COUNT
    in_addr: SPAD_ADDR
    in_stride: SPAD_ADDR
    out_addr: SPAD_ADDR
    out_stride: SPAD_ADDR
    mult: MULT
    shift: SHIFT
    q_pos: 32
    k_pos: 32         # kpos(j) = k_pos + j when kpos_spans = 0
    idx_addr: IDX_ADDR
    n_spans: COUNT
    rs_base: COUNT


class LayerNorm(data.Struct):
    """One-pass LayerNorm of m rows of n elements."""
    hdr: Header
    m: COUNT
    n: COUNT
    in_addr: SPAD_ADDR
    in_stride: SPAD_ADDR
    out_addr: SPAD_ADDR
    out_stride: SPAD_ADDR
    param_addr: SPAD_ADDR   # 4 words per column: gamma, beta_lo, beta_hi, 0
    eps_m: 16
    eps_e: SHIFT
    shift: SHIFT


class TopK(data.Struct):
    """Top-k of each row, descending, ties to the lower index (as ONNX TopK)."""
    hdr: Header
    causal: 1         # only columns j <= q_pos + i take part
    k: 7
    m: COUNT
    n: COUNT
    in_addr: SPAD_ADDR
    in_stride: SPAD_ADDR
    idx_addr: IDX_ADDR
    q_pos: 32


class Route(data.Struct):
    """MoE routing: top-k entries of m tokens -> per-expert token queues."""
    hdr: Header
    k: 7
    n_experts: 9
    m: COUNT
    idx_addr: IDX_ADDR    # m*k entries (expert, probability)
    q_addr: IDX_ADDR      # queue entries (token, probability), experts ascending
    qtab_addr: IDX_ADDR   # n_experts entries (offset, length)


class Spans(data.Struct):
    """Selected blocks -> merged, ascending spans of rows (sparse attention gather lists)."""
    hdr: Header
    k: 7
    idx_addr: IDX_ADDR    # k entries (block, value); block -1 = none
    block: COUNT          # rows per block
    sink: COUNT           # blocks [0, sink) always selected
    diag_lo: 32           # blocks [diag_lo, diag_lo + diag_n) always selected
    diag_n: COUNT
    limit: 32             # spans are clipped to rows < limit
    out_addr: IDX_ADDR
    dst_reg: 4            # REG[dst_reg] <- number of spans written
    rows_reg: 4           # REG[rows_reg] <- total rows of the spans (0: not written)


class Select(data.Struct):
    """DHSA budgeted key selection: chunk scores -> sink + recent + best chunks as merged spans."""
    hdr: Header
    n_chunks: COUNT       # number of chunks when count_reg = 0
    count_reg: 4          # number of chunks = REG[count_reg] when != 0
    chunk_addr: IDX_ADDR  # chunk c starts at w0 of IDX[chunk_addr + c] (strictly ascending)
    seq: 32               # end of the last chunk
    limit: 32             # only keys < limit are candidates (limit <= seq, limit < 2^31)
    in_addr: SPAD_ADDR    # token scores s_j at SPAD[in_addr + j], j < limit
    sink: COUNT           # tokens [0, sink) always selected
    recent: COUNT         # tokens [limit - recent, limit) always selected
    budget: 32            # tokens to select (>= 1), sink and recent included
    out_addr: IDX_ADDR    # output spans (start, length)
    dst_reg: 4            # REG[dst_reg] <- number of spans (0: not written)
    rows_reg: 4           # REG[rows_reg] <- total rows of the spans (0: not written)


class Vec(data.Struct):
    """Element-wise operations and row pooling on the scratchpad."""
    hdr: Header
    op: VecOp
    m: COUNT
    n: COUNT
    group: COUNT
    a_addr: SPAD_ADDR
    a_stride: SPAD_ADDR
    b_addr: SPAD_ADDR
    b_stride: SPAD_ADDR
    out_addr: SPAD_ADDR
    out_stride: SPAD_ADDR
    ma: MULT
    sa: SHIFT
    mb: MULT
    sb: SHIFT


class Mark(data.Struct):
    """Profiling marker: the counters are snapshotted under `id` when COMPUTE executes it."""
    hdr: Header
    id: 16


class End(data.Struct):
    """End of program: waits until all three modules are idle, then reports done."""
    hdr: Header


FORMATS: dict[Opcode, type] = {
    Opcode.LOAD: Dma, Opcode.STORE: Dma, Opcode.MATMUL: Matmul, Opcode.SOFTMAX: Softmax,
    Opcode.LAYERNORM: LayerNorm, Opcode.TOPK: TopK, Opcode.ROUTE: Route, Opcode.SPANS: Spans,
    Opcode.SELECT: Select, Opcode.VEC: Vec, Opcode.MARK: Mark, Opcode.END: End,
}

UNIT_OF: dict[Opcode, Unit] = {op: Unit.COMPUTE for op in FORMATS}
UNIT_OF[Opcode.LOAD] = Unit.LOAD
UNIT_OF[Opcode.STORE] = Unit.STORE

SIGNED_FIELDS = {"mult", "act_mult", "res_mult", "ma", "mb", "ds0", "ds1", "ds2", "diag_lo"}
"""Fields read as two's-complement signed integers; all others are unsigned."""

for _op, _fmt in FORMATS.items():
    assert data.Layout.cast(_fmt).size <= INSTR_BITS, (_op, data.Layout.cast(_fmt).size)


class DecodeError(ValueError):
    """An instruction word that is not a valid instruction."""


def _fields(fmt):
    for name, field in data.Layout.cast(fmt):
        yield name, field


def encode(opcode: Opcode, **fields) -> bytes:
    """Encode one instruction to its 64-byte little-endian word.

    Header fields (``pop_prev``, ``push_next``, ``pred_en``, ...) are given by name like the
    others. Signed fields accept negative values; every value is range-checked against its field
    width and an out-of-range value raises ``ValueError`` naming the field.
    """
    opcode = Opcode(opcode)
    fmt = FORMATS[opcode]
    layout = data.Layout.cast(fmt)
    hdr_names = {n for n, _ in data.Layout.cast(Header)}
    hdr = {"opcode": opcode}
    body = {}
    for name, value in fields.items():
        if name in ("hdr", "opcode"):
            raise ValueError(f"{opcode.name}: field {name!r} is set by encode itself")
        if name in hdr_names:
            hdr[name] = value
        else:
            body[name] = value
    known = {n for n, _ in layout}
    for name in body:
        if name not in known:
            raise ValueError(f"{opcode.name}: no field named {name!r}; fields: "
                             f"{', '.join(sorted(known - {'hdr'}))}")
    for name, value in list(body.items()):
        f = layout[name]
        shape = f.shape
        if isinstance(shape, type) and issubclass(shape, enum.Enum):
            if isinstance(value, enum.Enum) and not isinstance(value, shape):
                raise ValueError(f"{opcode.name}: field {name!r} takes a {shape.__name__}, "
                                 f"not {value!r}")
            try:
                body[name] = shape(value)
            except ValueError:
                raise ValueError(f"{opcode.name}: field {name!r} = {value!r} is not a "
                                 f"{shape.__name__} ({', '.join(m.name for m in shape)})"
                                 ) from None
            continue
        width = f.width
        v = _as_int(opcode, name, value)
        if name in SIGNED_FIELDS:
            lo, hi = -(1 << (width - 1)), (1 << (width - 1)) - 1
        else:
            lo, hi = 0, (1 << width) - 1
        if not lo <= v <= hi:
            raise ValueError(f"{opcode.name}: field {name!r} = {v} does not fit "
                             f"{'signed' if name in SIGNED_FIELDS else 'unsigned'} {width} bits "
                             f"({lo}..{hi})")
        body[name] = v & ((1 << width) - 1)
    hf = data.Layout.cast(Header)
    for name, value in hdr.items():
        if name == "opcode":
            continue
        value = hdr[name] = _as_int(opcode, name, value)
        if not 0 <= value < (1 << hf[name].width):
            raise ValueError(f"{opcode.name}: header field {name!r} = {value} does not fit "
                             f"{hf[name].width} bits")
    word = layout.const({"hdr": hdr, **body}).as_bits()
    return word.to_bytes(INSTR_BYTES, "little")


def _as_int(opcode, name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np
            if isinstance(value, np.integer):
                return int(value)
        except ImportError:  # pragma: no cover
            pass
        raise ValueError(f"{opcode.name}: field {name!r} must be an integer, not {value!r}")
    return int(value)


_HEADER_BITS = data.Layout.cast(Header).size
_OPCODE_FIELD = data.Layout.cast(Header)["opcode"]


def _signed(v: int, width: int) -> int:
    return v - (1 << width) if v >> (width - 1) else v


def decode_header(word):
    if isinstance(word, (bytes, bytearray, memoryview)):
        word = int.from_bytes(bytes(word), "little")
    return data.Layout.cast(Header).from_bits(word & ((1 << _HEADER_BITS) - 1))


def decode(word) -> "tuple[Opcode, dict]":
    """Decode a 64-byte instruction word to ``(opcode, fields)`` with plain Python values.

    Raises :class:`DecodeError` for an unknown opcode, or an enum field with an undefined value.
    """
    if isinstance(word, (bytes, bytearray, memoryview)):
        if len(word) != INSTR_BYTES:
            raise DecodeError(f"instruction word must be {INSTR_BYTES} bytes, not {len(word)}")
        word = int.from_bytes(bytes(word), "little")
    op, fields = _decode_cached(word)
    return op, dict(fields)


@lru_cache(maxsize=1 << 16)
def _decode_cached(word: int):
    if not 0 <= word < (1 << INSTR_BITS):
        raise DecodeError(f"instruction word must be an unsigned {INSTR_BITS}-bit integer")
    raw_op = (word >> _OPCODE_FIELD.offset) & ((1 << _OPCODE_FIELD.width) - 1)
    try:
        opcode = Opcode(raw_op)
    except ValueError:
        raise DecodeError(f"illegal opcode {raw_op}") from None
    fmt = FORMATS[opcode]
    layout = data.Layout.cast(fmt)
    out = {}
    for name, f in layout:
        raw = (word >> f.offset) & ((1 << f.width) - 1)
        if name == "hdr":
            for hname, hf in data.Layout.cast(Header):
                hv = (raw >> hf.offset) & ((1 << hf.width) - 1)
                out[hname] = opcode if hname == "opcode" else hv
            continue
        shape = f.shape
        if isinstance(shape, type) and issubclass(shape, enum.Enum):
            try:
                out[name] = shape(raw)
            except ValueError:
                raise DecodeError(f"{opcode.name}: field {name!r} has undefined value {raw}"
                                  ) from None
        elif name in SIGNED_FIELDS:
            out[name] = _signed(raw, f.width)
        else:
            out[name] = raw
    return opcode, out


def isa_table():
    """The instruction set as rows (opcode, unit, field, bit offset, width, signedness)."""
    rows = []
    for name, f in data.Layout.cast(Header):
        kind = f.shape.__name__ if name == "opcode" else "unsigned"
        rows.append({"opcode": "(all)", "value": None, "unit": None, "field": name,
                     "offset": f.offset, "width": f.width, "kind": kind})
    for op, fmt in FORMATS.items():
        if len(list(data.Layout.cast(fmt))) == 1:
            rows.append({"opcode": op.name, "value": op.value, "unit": UNIT_OF[op].name,
                         "field": "(header only)", "offset": _HEADER_BITS, "width": 0,
                         "kind": ""})
        for name, f in data.Layout.cast(fmt):
            if name == "hdr":
                continue
            shape = f.shape
            kind = (shape.__name__ if isinstance(shape, type) and issubclass(shape, enum.Enum)
                    else ("signed" if name in SIGNED_FIELDS else "unsigned"))
            rows.append({"opcode": op.name, "value": op.value, "unit": UNIT_OF[op].name,
                         "field": name, "offset": f.offset, "width": f.width, "kind": kind})
    return rows


def format_isa_table() -> str:
    """The markdown table printed by ``vitamin isa`` and embedded in docs/ISA.md."""
    lines = ["| opcode | value | unit | field | bits | width | kind |",
             "|---|---|---|---|---|---|---|"]
    for r in isa_table():
        bits = f"{r['offset']}..{r['offset'] + r['width'] - 1}" if r["width"] else "-"
        lines.append(f"| {r['opcode']} | {'' if r['value'] is None else r['value']} | "
                     f"{r['unit'] or ''} | {r['field']} | {bits} | {r['width']} | "
                     f"{r['kind']} |")
    return "\n".join(lines)
