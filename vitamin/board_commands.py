"""Subcommand ``build`` (bitstreams and board reports), registered in :mod:`vitamin.cli`.

``vitamin run --device sim|sim:rtl|serial:PORT[@BAUD]|zynq`` is served by
:func:`vitamin.runtime.run_on_device`.
"""

from __future__ import annotations

import json
import time

from .cli import command

__all__ = ["BOARD_NAMES"]

#: Kept here (not imported from vitamin.boards) so that ``vitamin --help`` stays quick.
BOARD_NAMES = ("ulx3s-85f", "icebreaker", "zcu102")


def _build_args(p):
    p.add_argument("--board", required=True, choices=BOARD_NAMES, help="target board")
    p.add_argument("--config", help="configuration preset (default: the board's: ulx3s-85f "
                                    "ecp5, icebreaker tiny, zcu102 zcu102)")
    p.add_argument("-o", "--output", metavar="DIR",
                   help="build directory (default: build/boards/BOARD-CONFIG)")
    p.add_argument("--seed", type=int, default=1, help="nextpnr placement seed (default 1)")
    p.add_argument("--seeds", metavar="LIST", default=None,
                   help="place once per seed (e.g. 1,2,5 or 1-4), --jobs at a time, and route "
                        "the placement with the best post-placement Fmax (the placement decides "
                        "most of the routed Fmax); replaces --seed")
    p.add_argument("--jobs", type=int, default=2,
                   help="placements run side by side with --seeds (default 2; each takes one "
                        "core and a few GB)")
    p.add_argument("--clock-mhz", type=float, default=None,
                   help="system clock (ULX3S: PLL output; default: the preset's clock for the "
                        "board's own preset, else the 25 MHz oscillator)")
    p.add_argument("--timing-mhz", type=float, default=None,
                   help="ULX3S: the clock nextpnr places for, when it should differ from "
                        "--clock-mhz (above the design's Fmax it gives the placer a timing "
                        "drive; the PLL still runs at --clock-mhz, and the placed design is "
                        "routed in a second nextpnr run for a clock it meets)")
    p.add_argument("--synth-only", action="store_true",
                   help="stop after synthesis: resources and a pre-route timing estimate "
                        "(ECP5) in minutes instead of the hour of place and route")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


@command("build", "synthesise, place and route a board: bitstream + resource/timing report",
         arguments=_build_args)
def _build(args):
    from .boards.flow import build, format_report
    t0 = time.monotonic()

    def progress(msg):
        print(f"[{time.monotonic() - t0:7.1f} s] {msg}", flush=True)

    rep = build(args.board, args.config, args.output, progress, seed=args.seed,
                seeds=args.seeds, jobs=args.jobs,
                clock_mhz=args.clock_mhz, synth_only=args.synth_only,
                timing_mhz=args.timing_mhz)
    print(json.dumps(rep, indent=1, default=str) if args.json else format_report(rep),
          end="")
    # 1 unless there is a bitstream that meets timing (or the Vivado files for zcu102): a
    # bitstream that fails its clock constraint is written, but not reported as a success
    return 0 if rep["status"] in ("built", "synthesised (place and route skipped)") \
        or rep["status"].startswith("generated") else 1
