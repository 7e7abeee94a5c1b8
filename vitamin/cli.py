"""The ``vitamin`` command line.

Subcommands live in a small registry so that any module can add one without editing the parser::

    from vitamin.cli import command

    def _arguments(parser):
        parser.add_argument("model", help="ONNX file")

    @command("compile", "lower an ONNX model to a vitamin program", arguments=_arguments)
    def _compile(args):
        ...            # return an exit status, or None for 0

A module that registers commands is listed in :data:`COMMAND_MODULES`; :func:`main` imports the
listed modules before it builds the parser. Such a module should import heavy dependencies (onnx,
cocotb) inside its ``run`` function, so that every ``vitamin`` invocation stays quick.

Errors that come from the user's input (:class:`~vitamin.config.ConfigError` and other
``ValueError``, ``FileNotFoundError``, bad command-line usage) are printed as one line,
``vitamin: error: <message>``, with exit status 2. ``vitamin --debug ...`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from . import __version__
from .config import PRESETS, get_config

__all__ = ["Command", "COMMANDS", "COMMAND_MODULES", "command", "build_parser", "main"]


@dataclass(frozen=True)
class Command:
    """One registered subcommand.

    Parameters
    ----------
    name : str
        The subcommand as typed (``vitamin <name>``).
    help : str
        One line for ``vitamin --help``.
    add_arguments : callable
        ``add_arguments(parser)`` adds the subcommand's options to its ``argparse`` parser.
    run : callable
        ``run(args)`` does the work with the parsed ``argparse.Namespace`` and returns the exit
        status (``None`` means 0).
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


COMMANDS: dict[str, Command] = {}
"""The registry, in registration order (which is the order of ``vitamin --help``)."""

COMMAND_MODULES: list[str] = ["vitamin.commands", "vitamin.perf_commands",
                              "vitamin.board_commands"]
"""Modules (dotted names) that register further subcommands; imported by :func:`build_parser`."""


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def command(name: str, help: str, *, arguments=None):
    """Register the decorated function as the subcommand ``name``.

    Parameters
    ----------
    name : str
        Subcommand name; registering a name twice raises ``ValueError``.
    help : str
        One-line description.
    arguments : callable, optional
        ``arguments(parser)`` adds the subcommand's options.

    Returns
    -------
    The decorator, which returns the function unchanged.
    """

    def register(run):
        if name in COMMANDS:
            raise ValueError(f"vitamin subcommand {name!r} is already registered")
        COMMANDS[name] = Command(name, help, arguments or _no_arguments, run)
        return run

    return register


class _UsageError(Exception):
    """Bad command-line usage (argparse's errors), reported like every other error."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the whole usage before its error; we print one line and point at --help.
    def error(self, message):
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    """The parser with every registered subcommand."""
    for module in COMMAND_MODULES:
        importlib.import_module(module)
    parser = _Parser(
        prog="vitamin",
        description="vitamin: an open FPGA accelerator for edge transformers.",
    )
    parser.add_argument("--version", action="version", version=f"vitamin {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=_Parser)
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        message = f"{exc.strerror}: {exc.filename}"
    else:
        message = str(exc) or type(exc).__name__
    return " ".join(message.split())


def main(argv: list[str] | None = None) -> int:
    """Run the ``vitamin`` command line and return its exit status.

    ``--help`` and ``--version`` exit through ``SystemExit(0)`` as argparse does.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        debug = args.debug
        status = args._run(args)
    except (_UsageError, ValueError, FileNotFoundError) as exc:
        if debug and not isinstance(exc, _UsageError):
            raise
        print(f"vitamin: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`vitamin isa | head`). As the Python docs advise, point stdout at
        # devnull so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0 if status is None else int(status)


# -- vitamin configs ------------------------------------------------------------------------------


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain-text table; the first column is left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def _configs_arguments(parser):
    parser.add_argument("names", nargs="*", metavar="PRESET",
                        help=f"presets to show (default: all of {', '.join(PRESETS)})")
    parser.add_argument("--json", action="store_true", help="print a JSON list of summaries")


@command("configs", "list the configuration presets and their derived figures",
         arguments=_configs_arguments)
def _configs(args):
    configs = [get_config(n) for n in args.names] if args.names else list(PRESETS.values())
    summaries = [c.summary() for c in configs]
    if args.json:
        print(json.dumps(summaries, indent=2))
        return 0
    headers = ["preset", "array", "MACs/cycle", "act/wgt/acc bits", "spad KiB", "acc KiB",
               "on-chip KiB", "row lanes", "bus bits", "clock MHz", "peak GOPS", "fingerprint"]
    rows = [[s["name"], s["array"], str(s["macs_per_cycle"]),
             f"{s['act_bits']}/{s['weight_bits']}/{s['acc_bits']}",
             f"{s['spad_kib']:g}", f"{s['acc_kib']:g}", f"{s['onchip_kib']:g}",
             str(s["row_lanes"]), str(s["bus_bits"]), f"{s['clock_mhz']:g}",
             f"{s['peak_gops']:g}", s["fingerprint"]] for s in summaries]
    print(_table(headers, rows))
    print("\npeak GOPS = 2 ops per MAC x MACs/cycle x nominal clock")
    return 0


# -- vitamin isa ----------------------------------------------------------------------------------


def _isa_arguments(parser):
    parser.add_argument("--json", action="store_true",
                        help="print the fields as a JSON list")


@command("isa", "print the instruction formats (bit fields of every opcode)",
         arguments=_isa_arguments)
def _isa(args):
    # Imported here: the ISA pulls in Amaranth, which the other commands may not need.
    from amaranth.lib import data

    from . import isa

    if args.json:
        print(json.dumps(isa.isa_table(), indent=2))
        return 0
    # A one-line summary of each opcode first, then every field.
    print("| opcode | value | unit | format | bits |")
    print("|---|---|---|---|---|")
    for op, fmt in isa.FORMATS.items():
        print(f"| {op.name} | {op.value} | {isa.UNIT_OF[op].name} | {fmt.__name__} | "
              f"{data.Layout.cast(fmt).size} |")
    print()
    print(isa.format_isa_table())
    return 0
