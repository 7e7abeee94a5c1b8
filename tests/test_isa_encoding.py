"""Instruction encoding: round trips, range checks, illegal opcodes, and the layout invariants."""

import random
import re

import pytest
from amaranth.lib import data, enum

from vitamin import isa
from vitamin.isa import FORMATS, INSTR_BITS, INSTR_BYTES, SIGNED_FIELDS, Header, Opcode


def _layout(opcode):
    return data.Layout.cast(FORMATS[opcode])


def _is_enum(shape):
    return isinstance(shape, type) and issubclass(shape, enum.Enum)


def _header_fields():
    return [(name, f) for name, f in data.Layout.cast(Header) if name != "opcode"]


def _body_fields(opcode):
    return [(name, f) for name, f in _layout(opcode) if name != "hdr"]


def _limits(name, width):
    if name in SIGNED_FIELDS:
        return -(1 << (width - 1)), (1 << (width - 1)) - 1
    return 0, (1 << width) - 1


def _random_fields(opcode, rng):
    fields = {name: rng.randrange(1 << f.width) for name, f in _header_fields()}
    for name, f in _body_fields(opcode):
        if _is_enum(f.shape):
            fields[name] = rng.choice(list(f.shape))
        else:
            lo, hi = _limits(name, f.width)
            # Favour the edges of the range, where sign and width mistakes show.
            fields[name] = rng.choice([lo, hi, rng.randint(lo, hi), rng.randint(lo, hi)])
    return fields


def _range_cases():
    for opcode in FORMATS:
        for name, f in _body_fields(opcode):
            if not _is_enum(f.shape):
                lo, hi = _limits(name, f.width)
                yield pytest.param(opcode, name, lo - 1, id=f"{opcode.name}-{name}-low")
                yield pytest.param(opcode, name, hi + 1, id=f"{opcode.name}-{name}-high")
        for name, f in _header_fields():
            yield pytest.param(opcode, name, -1, id=f"{opcode.name}-{name}-low")
            yield pytest.param(opcode, name, 1 << f.width, id=f"{opcode.name}-{name}-high")


@pytest.mark.parametrize("opcode", list(FORMATS), ids=lambda op: op.name)
def test_round_trip(opcode):
    rng = random.Random(f"vitamin-isa-{opcode.name}")
    for _ in range(50):
        fields = _random_fields(opcode, rng)
        word = isa.encode(opcode, **fields)
        assert isinstance(word, bytes) and len(word) == INSTR_BYTES
        got_op, got = isa.decode(word)
        assert got_op is opcode
        assert got == {"opcode": opcode, **fields}
        # The integer form of the word decodes the same.
        assert isa.decode(int.from_bytes(word, "little")) == (opcode, got)
        hdr = isa.decode_header(word)
        assert hdr.opcode == opcode
        assert hdr.pred_q == fields["pred_q"]


@pytest.mark.parametrize("opcode", list(FORMATS), ids=lambda op: op.name)
def test_defaults_are_zero(opcode):
    _, got = isa.decode(isa.encode(opcode))
    for name, f in _body_fields(opcode):
        assert got[name] == (f.shape(0) if _is_enum(f.shape) else 0), name


def test_bits_above_the_format_are_zero():
    rng = random.Random(1)
    for opcode in FORMATS:
        word = int.from_bytes(isa.encode(opcode, **_random_fields(opcode, rng)), "little")
        assert word >> _layout(opcode).size == 0, opcode.name


@pytest.mark.parametrize("opcode, name, value", list(_range_cases()))
def test_out_of_range_names_field(opcode, name, value):
    with pytest.raises(ValueError, match=re.escape(f"'{name}'")):
        isa.encode(opcode, **{name: value})


@pytest.mark.parametrize("opcode", list(FORMATS), ids=lambda op: op.name)
def test_unknown_field(opcode):
    with pytest.raises(ValueError, match="no_such_field"):
        isa.encode(opcode, no_such_field=1)


def test_hdr_is_not_a_field():
    with pytest.raises(ValueError, match="hdr"):
        isa.encode(Opcode.MATMUL, hdr=0)


def test_bad_enum_value_names_field():
    with pytest.raises(ValueError, match="'act'"):
        isa.encode(Opcode.MATMUL, act=3)


def test_bad_enum_value_raises():
    with pytest.raises(ValueError):
        isa.encode(Opcode.MATMUL, act=3)
    with pytest.raises(ValueError):
        isa.encode(Opcode.MATMUL, out=isa.Act.GELU)


ILLEGAL_OPCODES = sorted(set(range(32)) - {op.value for op in Opcode})


def test_illegal_opcodes_include_zero_and_20():
    assert 0 in ILLEGAL_OPCODES and 20 in ILLEGAL_OPCODES


@pytest.mark.parametrize("raw", ILLEGAL_OPCODES)
def test_decode_illegal_opcode(raw):
    # The rest of a valid MATMUL word, with the opcode bits replaced.
    word = int.from_bytes(isa.encode(Opcode.MATMUL, m=4, k=8, n=16), "little")
    word = (word & ~0x1F) | raw
    with pytest.raises(isa.DecodeError, match=f"illegal opcode {raw}"):
        isa.decode(word)
    with pytest.raises(isa.DecodeError):
        isa.decode(word.to_bytes(INSTR_BYTES, "little"))


def test_decode_zeroed_memory_traps():
    with pytest.raises(isa.DecodeError):
        isa.decode(bytes(INSTR_BYTES))


def test_decode_undefined_enum_value():
    act = _layout(Opcode.MATMUL)["act"]
    assert 3 not in {m.value for m in act.shape}
    word = int.from_bytes(isa.encode(Opcode.MATMUL), "little") | (3 << act.offset)
    with pytest.raises(isa.DecodeError, match="'act'"):
        isa.decode(word)


def test_decode_wrong_length():
    with pytest.raises(isa.DecodeError):
        isa.decode(bytes(INSTR_BYTES - 1))


def test_decode_error_is_value_error():
    assert issubclass(isa.DecodeError, ValueError)


@pytest.mark.parametrize("opcode", list(FORMATS), ids=lambda op: op.name)
def test_format_fits_instruction(opcode):
    assert INSTR_BITS == 512 and INSTR_BYTES == 64
    assert _layout(opcode).size <= INSTR_BITS


def test_header_is_common():
    header = data.Layout.cast(Header)
    for opcode, fmt in FORMATS.items():
        hdr = data.Layout.cast(fmt)["hdr"]
        assert hdr.offset == 0, opcode.name
        assert data.Layout.cast(hdr.shape) == header, opcode.name
    # The opcode is the lowest bits of the header, so a decoder finds it before the format.
    assert header["opcode"].offset == 0
    assert header["opcode"].shape is Opcode


def test_every_opcode_has_a_format_and_unit():
    assert set(FORMATS) == set(Opcode)
    assert set(isa.UNIT_OF) == set(Opcode)
    assert isa.UNIT_OF[Opcode.LOAD] is isa.Unit.LOAD
    assert isa.UNIT_OF[Opcode.STORE] is isa.Unit.STORE


def test_signed_fields_exist():
    names = {name for opcode in FORMATS for name, _ in _body_fields(opcode)}
    assert SIGNED_FIELDS <= names


def test_isa_table_covers_every_field():
    rows = isa.isa_table()
    for opcode in FORMATS:
        listed = {r["field"] for r in rows if r["opcode"] == opcode.name} - {"(header only)"}
        assert listed == {name for name, _ in _body_fields(opcode)}
    text = isa.format_isa_table()
    for name, _ in data.Layout.cast(Header):
        assert f"| {name} |" in text


def test_isa_table_lists_every_opcode():
    text = isa.format_isa_table()
    for opcode in FORMATS:
        assert f"| {opcode.name} |" in text, opcode.name
