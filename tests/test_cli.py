"""The ``vitamin`` command line, in-process and as ``python -m vitamin``."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vitamin import cli
from vitamin.config import PRESETS
from vitamin.isa import Opcode


def run(*args):
    """``python -m vitamin ARGS`` in a subprocess."""
    return subprocess.run([sys.executable, "-m", "vitamin", *args], capture_output=True,
                          text=True, timeout=120)


def assert_one_line_error(err):
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("vitamin: error: ")


def test_configs_json(capsys):
    assert cli.main(["configs", "--json"]) == 0
    summaries = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in summaries] == ["tiny", "ecp5", "zcu102"]
    for s in summaries:
        assert s["macs_per_cycle"] == PRESETS[s["name"]].macs
        assert s["peak_gops"] == pytest.approx(PRESETS[s["name"]].peak_gops)


def test_configs_json_subprocess():
    proc = run("configs", "--json")
    assert proc.returncode == 0, proc.stderr
    summaries = json.loads(proc.stdout)
    assert [s["name"] for s in summaries] == ["tiny", "ecp5", "zcu102"]
    assert {s["name"]: s["macs_per_cycle"] for s in summaries} == {
        name: cfg.macs for name, cfg in PRESETS.items()}


def test_configs_table(capsys):
    assert cli.main(["configs"]) == 0
    out = capsys.readouterr().out
    assert "MACs/cycle" in out and "peak GOPS" in out
    for name, cfg in PRESETS.items():
        row = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert f"{cfg.rows}x{cfg.cols}" in row
        assert f" {cfg.macs} " in row


def test_configs_selected(capsys):
    assert cli.main(["configs", "--json", "zcu102"]) == 0
    summaries = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in summaries] == ["zcu102"]
    assert summaries[0]["macs_per_cycle"] == 256


def test_isa(capsys):
    assert cli.main(["isa"]) == 0
    out = capsys.readouterr().out
    for op in Opcode:
        assert f"| {op.name} | {op.value} |" in out


def test_isa_json(capsys):
    assert cli.main(["isa", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    # Every opcode has rows (END a header-only row), plus the common header's "(all)" rows.
    assert {r["opcode"] for r in rows} == {op.name for op in Opcode} | {"(all)"}
    assert {"opcode", "value", "unit", "field", "offset", "width", "kind"} <= set(rows[0])


def test_unknown_preset(capsys):
    assert cli.main(["configs", "no-such-preset"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_one_line_error(captured.err)
    assert "no-such-preset" in captured.err


def test_unknown_preset_subprocess():
    proc = run("configs", "no-such-preset")
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr)


@pytest.mark.parametrize("argv", [["frobnicate"], [], ["configs", "--no-such-option"]])
def test_bad_usage(capsys, argv):
    assert cli.main(argv) == 2
    assert_one_line_error(capsys.readouterr().err)


def test_bad_subcommand_subprocess():
    proc = run("frobnicate")
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr)
    assert "frobnicate" in proc.stderr


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "configs" in out and "isa" in out


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the command registry, so test commands do not leak."""
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))
    return cli.COMMANDS


def test_registered_command(registry, capsys):
    def arguments(parser):
        parser.add_argument("word")

    @cli.command("echo-test", "print a word", arguments=arguments)
    def echo(args):
        print(args.word)

    assert registry["echo-test"].run is echo
    assert cli.main(["echo-test", "hello"]) == 0
    assert capsys.readouterr().out == "hello\n"


def test_duplicate_command(registry):
    with pytest.raises(ValueError, match="configs"):
        cli.command("configs", "again")(lambda args: 0)


@pytest.mark.parametrize("exc", [
    ValueError("bad input\nsecond line"),
    FileNotFoundError(2, "No such file or directory", "missing.onnx"),
])
def test_errors_are_one_line(registry, capsys, exc):
    @cli.command("fail-test", "raise an error")
    def fail(args):
        raise exc

    assert cli.main(["fail-test"]) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert ("missing.onnx" in err) if isinstance(exc, FileNotFoundError) else ("bad input" in err)


def test_debug_shows_traceback(registry):
    @cli.command("fail-test", "raise an error")
    def fail(args):
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        cli.main(["--debug", "fail-test"])


def test_exit_status_of_command(registry):
    cli.command("status-test", "return 3")(lambda args: 3)
    assert cli.main(["status-test"]) == 3


def test_run_device_sim_matches_golden_backend(tmp_path):
    """``vitamin run --device sim`` (host runtime, golden board) gives the golden backend's
    outputs and counters; an unknown device is a one-line error."""
    prog = tmp_path / "d.vit"
    model = Path(__file__).resolve().parent.parent / "models" / "digits_vit.onnx"
    r = run("compile", str(model), "--config", "tiny", "-o", str(prog))
    assert r.returncode == 0, r.stderr
    runs = [json.loads(run("run", str(prog), "--json", *extra).stdout)
            for extra in ((), ("--device", "sim"))]
    assert runs[0]["outputs"] == runs[1]["outputs"]
    assert runs[0]["macs"] == runs[1]["macs"] > 0
    r = run("run", str(prog), "--device", "bogus")
    assert r.returncode == 2 and "unknown device 'bogus'" in r.stderr
