"""The documentation cannot drift from the code.

docs/ISA.md embeds the generated field table of :func:`vitamin.isa.format_isa_table` between two
markers; it must be exactly the current table. Every opcode and error code must be described in
docs/ISA.md, and every configuration field in docs/ARCHITECTURE.md or docs/ISA.md.
"""

import dataclasses
import re
from pathlib import Path

import pytest

from vitamin import isa
from vitamin.config import Config
from vitamin.isa import ErrorCode, Opcode

DOCS = Path(__file__).resolve().parent.parent / "docs"
BEGIN = "<!-- isa-table:begin -->"
END = "<!-- isa-table:end -->"


def _read(name):
    path = DOCS / name
    assert path.exists(), f"{path} is missing"
    return path.read_text(encoding="utf-8")


def _mentions(text, word):
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(word)}(?![A-Za-z0-9_])", text) is not None


def test_isa_table_matches_code():
    text = _read("ISA.md")
    assert text.count(BEGIN) == 1, f"docs/ISA.md must contain {BEGIN!r} exactly once"
    assert text.count(END) == 1, f"docs/ISA.md must contain {END!r} exactly once"
    start = text.index(BEGIN) + len(BEGIN)
    stop = text.index(END)
    assert start <= stop, "the isa-table markers are in the wrong order"
    embedded = text[start:stop].strip("\n")
    expected = isa.format_isa_table()
    assert embedded == expected, (
        "docs/ISA.md's field table differs from isa.format_isa_table(); paste the output of\n"
        "  python -c \"from vitamin import isa; print(isa.format_isa_table())\"\n"
        f"between {BEGIN} and {END}")


@pytest.mark.parametrize("name", [op.name for op in Opcode])
def test_every_opcode_documented(name):
    assert _mentions(_read("ISA.md"), name), f"opcode {name} is not mentioned in docs/ISA.md"


@pytest.mark.parametrize("name", [code.name for code in ErrorCode])
def test_every_error_code_documented(name):
    assert _mentions(_read("ISA.md"), name), f"error code {name} is not mentioned in docs/ISA.md"


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(Config)])
def test_every_config_field_documented(name):
    text = _read("ARCHITECTURE.md") + "\n" + _read("ISA.md")
    assert _mentions(text, name), (
        f"Config field {name!r} is mentioned in neither docs/ARCHITECTURE.md nor docs/ISA.md")
