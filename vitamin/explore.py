"""Resource estimates and design-space exploration (``vitamin estimate``, ``vitamin explore``).

Resources
    :func:`estimate_resources` predicts LUT / FF / DSP / BRAM of the accelerator for a
    configuration and an FPGA family from a per-block model calibrated on YoWASP Yosys counts
    (``sim/synth.py``, per unit and per memory: :data:`CALIBRATION`, measured by
    :func:`calibrate`). Each block's count is a power law ``c * x ** p`` of the block's size
    driver ``x`` (:data:`DRIVERS`: MACs for the MATMUL unit, row lanes for the row units, bus
    and scratchpad bits per cycle for the DMA units, bits of storage for the memories), fitted
    over the calibrated presets (:func:`fit_block`) and checked on a held-out configuration
    (:data:`VALIDATION`); the accelerator's top (the controller, the port multiplexers, the
    counters) is not in the per-unit figures and is added as :data:`TOP_OVERHEAD`. Families
    without their own calibration (``xcup``) scale the ECP5 figures by :data:`FAMILY_SCALE`
    (LUT6 vs LUT4, RAMB36 vs DP16KD, DSP48E2 vs MULT18X18D) and are labelled so.

Exploration
    :func:`sweep` evaluates configurations (array shape, scratchpad size, row lanes, accumulator
    format) of a part's family: each point compiles the model, runs the cost model
    (compiler/cost.py, the v2 machine) and estimates the resources; points that exceed the part
    (:data:`PARTS`) or do not compile are kept with the reason. :func:`pareto` keeps the points
    no other point beats on both latency and resources. Points go through an executor: local
    processes (``concurrent.futures``) by default, a Dask distributed cluster when a scheduler
    address is given (:func:`make_executor`); both run :func:`evaluate_point`.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

__all__ = ["PARTS", "BOARDS", "CALIBRATION", "CAL_CONFIGS", "cal_config", "VALIDATION", "WHOLE",
           "DRIVERS", "estimate_resources",
           "fit_block", "sweep", "pareto", "evaluate_point", "make_executor", "candidate_configs",
           "resource_cost", "plot_front", "ExploreResult"]

#: Resource limits of the parts (datasheet counts: LUT, FF, DSP blocks, block RAMs) and the
#: synthesis family their counts use.
PARTS = {
    "lfe5u-25f": {"family": "ecp5", "LUT": 24288, "FF": 24288, "DSP": 28, "BRAM": 56,
                  "clock_mhz": 100.0},
    "lfe5u-45f": {"family": "ecp5", "LUT": 43848, "FF": 43848, "DSP": 72, "BRAM": 108,
                  "clock_mhz": 100.0},
    "lfe5u-85f": {"family": "ecp5", "LUT": 83640, "FF": 83640, "DSP": 156, "BRAM": 208,
                  "clock_mhz": 100.0},
    "xczu9eg": {"family": "xcup", "LUT": 274080, "FF": 548160, "DSP": 2520, "BRAM": 912,
                "clock_mhz": 300.0},
}
#: Board -> part.
BOARDS = {"ulx3s": "lfe5u-85f", "ecp5": "lfe5u-85f", "zcu102": "xczu9eg"}

#: Cell types of each resource class per family (Yosys ``stat`` names).
CELL_CLASSES = {
    "ecp5": {"LUT": ("LUT4", "CCU2C", "PFUMX", "L6MUX21", "TRELLIS_DPR16X4"),
             "FF": ("TRELLIS_FF",), "DSP": ("MULT18X18D", "ALU54B"), "BRAM": ("DP16KD",)},
    "xcup": {"LUT": ("LUT1", "LUT2", "LUT3", "LUT4", "LUT5", "LUT6", "CARRY8", "MUXF7", "MUXF8",
                     "RAM32M", "RAM64M", "RAM32X1D", "RAM64X1D", "SRL16E"),
             "FF": ("FDRE", "FDSE", "FDCE", "FDPE"), "DSP": ("DSP48E2",),
             "BRAM": ("RAMB36E2", "RAMB18E2")},
}


def resource_classes(cells: dict, family: str) -> dict:
    """LUT / FF / DSP / BRAM of Yosys cell counts (a RAMB18 counts half a BRAM)."""
    out = {}
    for cls, names in CELL_CLASSES[family].items():
        v = 0.0
        for name in names:
            c = cells.get(name, 0)
            v += c * (0.5 if name == "RAMB18E2" else 1.0)
        out[cls] = v
    return out


#: Size driver of each block: the quantity its resources grow with.
DRIVERS = {
    "MatmulUnit": lambda c: c.rows * c.cols,
    "VecUnit": lambda c: c.row_lanes,
    "TopKUnit": lambda c: c.row_lanes,
    "SoftmaxRowUnit": lambda c: c.row_lanes,
    "LayerNormRowUnit": lambda c: c.row_lanes,
    "LoadUnit": lambda c: c.bus_bits + 8 * max(c.rows, c.cols, c.row_lanes),
    "StoreUnit": lambda c: c.bus_bits + 8 * max(c.rows, c.cols, c.row_lanes),
    "RouteUnit": lambda c: c.max_experts,
    "SpansUnit": lambda c: math.log2(c.idx_entries),
    "SelectUnit": lambda c: c.row_lanes,
    "Scratchpad": lambda c: c.spad_words * 16,
    "AccMemory": lambda c: c.acc_lines * c.cols * c.acc_bits,
    "IdxMemory": lambda c: c.idx_entries * 64,
    "RowStateMemory": lambda c: c.rowstate_rows * 128,
}

#: YoWASP Yosys 0.64 counts per block (``sim/synth.py``, ``synth_ecp5``), by preset:
#: {family: {preset: {block: {LUT, FF, DSP, BRAM}}}}. Measured by :func:`calibrate`.
CALIBRATION: dict = {"ecp5": {
    "tiny": {
        "AccMemory": {"LUT": 202, "FF": 394, "DSP": 0, "BRAM": 6},
        "IdxMemory": {"LUT": 73, "FF": 139, "DSP": 0, "BRAM": 2},
        "LayerNormRowUnit": {"LUT": 3212, "FF": 2757, "DSP": 18, "BRAM": 5},
        "LoadUnit": {"LUT": 5591, "FF": 1561, "DSP": 4, "BRAM": 0},
        "MatmulUnit": {"LUT": 15852, "FF": 12897, "DSP": 78, "BRAM": 4},
        "RouteUnit": {"LUT": 532, "FF": 245, "DSP": 1, "BRAM": 0},
        "RowStateMemory": {"LUT": 108, "FF": 207, "DSP": 0, "BRAM": 3},
        "Scratchpad": {"LUT": 689, "FF": 250, "DSP": 0, "BRAM": 16},
        "SelectUnit": {"LUT": 3511, "FF": 1752, "DSP": 3, "BRAM": 3},
        "SoftmaxRowUnit": {"LUT": 7458, "FF": 3611, "DSP": 23, "BRAM": 7},
        "SpansUnit": {"LUT": 1252, "FF": 610, "DSP": 2, "BRAM": 1},
        "StoreUnit": {"LUT": 6052, "FF": 1775, "DSP": 4, "BRAM": 0},
        "TopKUnit": {"LUT": 1688, "FF": 865, "DSP": 2, "BRAM": 0},
        "VecUnit": {"LUT": 4640, "FF": 2028, "DSP": 20, "BRAM": 0},
    },
    "ecp5-8x16": {
        "AccMemory": {"LUT": 777, "FF": 1547, "DSP": 0, "BRAM": 22},
        "IdxMemory": {"LUT": 79, "FF": 141, "DSP": 0, "BRAM": 8},
        "LayerNormRowUnit": {"LUT": 8653, "FF": 7765, "DSP": 50, "BRAM": 16},
        "LoadUnit": {"LUT": 7332, "FF": 1763, "DSP": 4, "BRAM": 0},
        "MatmulUnit": {"LUT": 58370, "FF": 52763, "DSP": 378, "BRAM": 17},
        "RouteUnit": {"LUT": 588, "FF": 265, "DSP": 1, "BRAM": 0},
        "RowStateMemory": {"LUT": 110, "FF": 208, "DSP": 0, "BRAM": 3},
        "Scratchpad": {"LUT": 8126, "FF": 1044, "DSP": 0, "BRAM": 96},
        "SelectUnit": {"LUT": 4328, "FF": 1857, "DSP": 3, "BRAM": 11},
        "SoftmaxRowUnit": {"LUT": 18295, "FF": 8579, "DSP": 53, "BRAM": 22},
        "SpansUnit": {"LUT": 1242, "FF": 610, "DSP": 2, "BRAM": 1},
        "StoreUnit": {"LUT": 8698, "FF": 2175, "DSP": 4, "BRAM": 0},
        "TopKUnit": {"LUT": 4784, "FF": 1145, "DSP": 2, "BRAM": 0},
        "VecUnit": {"LUT": 15825, "FF": 6245, "DSP": 68, "BRAM": 0},
    },
}}

#: Calibration points that are not (or no longer) presets: ``{name: (base preset, changes)}``.
#: ``ecp5-8x16`` is the ``ecp5`` preset as it was when it was measured (8x16 array, 8 row lanes,
#: full-width epilogue), before the preset was cut down to fit the LFE5U-85F. The figures were
#: measured before ``lut_mul`` and ``epi_lanes`` existed: all products on DSPs.
CAL_CONFIGS: dict = {
    "ecp5-8x16": ("ecp5", {"rows": 8, "cols": 16, "row_lanes": 8, "epi_lanes": 0}),
}


def cal_config(name):
    """The configuration of calibration point ``name`` (a preset or a :data:`CAL_CONFIGS` key)."""
    from vitamin.config import get_config
    if name in CAL_CONFIGS:
        base, changes = CAL_CONFIGS[name]
        return get_config(base).replace(name=name, **changes)
    return get_config(name)


#: Held-out check of the model: per-block counts of a configuration it was not fitted on
#: (measured the same way; tests/test_explore.py).
VALIDATION: dict = {"ecp5": {
    "ecp5-4x8": {
        "base": "ecp5", "changes": {"rows": 4, "cols": 8, "row_lanes": 4, "spad_words": 48 * 1024,
                                    "epi_lanes": 0},
        "blocks": {
            "AccMemory": {"LUT": 395, "FF": 779, "DSP": 0, "BRAM": 11},
            "IdxMemory": {"LUT": 79, "FF": 141, "DSP": 0, "BRAM": 8},
            "LayerNormRowUnit": {"LUT": 4880, "FF": 4313, "DSP": 30, "BRAM": 16},
            "LoadUnit": {"LUT": 6076, "FF": 1630, "DSP": 4, "BRAM": 0},
            "MatmulUnit": {"LUT": 30330, "FF": 24600, "DSP": 162, "BRAM": 9},
            "RouteUnit": {"LUT": 588, "FF": 265, "DSP": 1, "BRAM": 0},
            "RowStateMemory": {"LUT": 110, "FF": 208, "DSP": 0, "BRAM": 3},
            "Scratchpad": {"LUT": 2146, "FF": 523, "DSP": 0, "BRAM": 48},
            "SelectUnit": {"LUT": 3855, "FF": 1820, "DSP": 3, "BRAM": 11},
            "SoftmaxRowUnit": {"LUT": 10881, "FF": 5130, "DSP": 33, "BRAM": 18},
            "SpansUnit": {"LUT": 1242, "FF": 610, "DSP": 2, "BRAM": 1},
            "StoreUnit": {"LUT": 6901, "FF": 1911, "DSP": 4, "BRAM": 0},
            "TopKUnit": {"LUT": 2786, "FF": 978, "DSP": 2, "BRAM": 0},
            "VecUnit": {"LUT": 8418, "FF": 3468, "DSP": 36, "BRAM": 0},
        },
    },
}}

#: Whole-accelerator counts (``synth_ecp5 -run begin:check``, the AUTONAME pass left out; make
#: bench's hardware section), by resource class: the per-block model plus :data:`TOP_OVERHEAD`
#: is checked against them (tests/test_explore.py).
WHOLE: dict = {"ecp5": {
    "tiny": {"LUT": 57840, "FF": 33001, "DSP": 155, "BRAM": 47},
}}

#: Multipliers for a family without its own calibration, from the ECP5 figures: a 6-input LUT
#: holds about 1.6 4-input LUTs of logic, a RAMB36 two DP16KD, a DSP48E2 (27x18) one or two
#: MULT18X18D products.
FAMILY_SCALE = {"xcup": {"LUT": 0.6, "FF": 1.0, "DSP": 1.0, "BRAM": 0.5}}

#: Controller, port multiplexers, queues, counters and the AXI glue of the accelerator's top,
#: as a fraction of the units' logic (not synthesised per unit).
TOP_OVERHEAD = 0.10


@dataclass
class BlockFit:
    """Per resource class: ``count = c * x ** p`` (``kind`` "power") or ``a + b * x``
    ("linear", for a class with a zero count at a calibrated point)."""
    params: dict

    def __call__(self, x) -> dict:
        out = {}
        for k, (kind, u, v) in self.params.items():
            out[k] = max(0.0, u * x ** v if kind == "power" else u + v * x)
        return out


def fit_block(points) -> BlockFit:
    """Fit each resource class over ``points`` [(x, {class: count})]: a power law (least
    squares in log-log space; resources grow sub-linearly with the size driver: on a held-out
    configuration it is within 13 % per class where a straight line misses BRAM by 15 %), a
    straight line when a count is 0, and a constant share ``count / x`` for one point."""
    import numpy as np
    classes = sorted({k for _, c in points for k in c})
    xs = np.array([x for x, _ in points], dtype=float)
    params = {}
    for k in classes:
        ys = np.array([c.get(k, 0.0) for _, c in points], dtype=float)
        if len(points) == 1 or np.ptp(xs) == 0:
            params[k] = ("linear", 0.0, float(ys.mean() / max(xs.mean(), 1e-9)))
        elif (ys > 0).all():
            p, logc = np.polyfit(np.log(xs), np.log(ys), 1)
            params[k] = ("power", float(np.exp(logc)), float(p))
        else:
            b, a = np.polyfit(xs, ys, 1)
            params[k] = ("linear", float(a), float(b))
    return BlockFit(params)


def _fits(family):
    cal = CALIBRATION.get(family)
    if not cal:
        return None
    blocks = sorted({b for counts in cal.values() for b in counts})
    fits = {}
    for blk in blocks:
        pts = [(DRIVERS[blk](cal_config(p)), cal[p][blk]) for p in cal if blk in cal[p]]
        fits[blk] = fit_block(pts)
    return fits


def estimate_resources(config, family=None) -> dict:
    """Predicted LUT / FF / DSP / BRAM of the accelerator for ``config`` on ``family`` (default:
    the preset's: ecp5 for tiny/ecp5, xcup for zcu102), with ``"scaled_from"`` when the family
    is estimated from another family's calibration, and ``"blocks"`` per block."""
    from vitamin.config import get_config
    from vitamin.hw.accel import discover_units
    cfg = get_config(config)
    family = family or ("xcup" if cfg.bus_bits >= 128 else "ecp5")
    src = family if CALIBRATION.get(family) else "ecp5"
    fits = _fits(src)
    if fits is None:
        raise ValueError(f"no resource calibration for family {family!r}")
    names = sorted({c.__name__ for c in set(discover_units().values())}
                   | {"Scratchpad", "AccMemory", "IdxMemory", "RowStateMemory"})
    blocks, total = {}, {"LUT": 0.0, "FF": 0.0, "DSP": 0.0, "BRAM": 0.0}
    for name in names:
        fit = fits.get(name)
        if fit is None:
            continue
        x = DRIVERS[name](cfg)
        got = fit(x)
        est = {k: got.get(k, 0.0) for k in total}
        if name in ("Scratchpad", "AccMemory", "IdxMemory", "RowStateMemory"):
            est["BRAM"] = max(est["BRAM"], _bram_floor(x, src))
        blocks[name] = est
        for k in total:
            total[k] += est[k]
    for k in ("LUT", "FF"):
        total[k] *= 1 + TOP_OVERHEAD
    if src != family:
        for k, s in FAMILY_SCALE.get(family, {}).items():
            total[k] *= s
    out = {k: int(math.ceil(v)) for k, v in total.items()}
    out["family"] = family
    if src != family:
        out["scaled_from"] = src
    out["blocks"] = {n: {k: round(v, 1) for k, v in b.items()} for n, b in blocks.items()}
    if cfg.epi_ratio > 1:
        out["caveat"] = ("epi_lanes < cols and lut_mul are not in the calibration (full-width "
                         "epilogue, every product on DSPs): LUT and DSP are overestimated")
    return out


def _bram_floor(bits, family):
    """Block RAMs a memory of ``bits`` needs at least (18 kbit DP16KD, 36 kbit RAMB36)."""
    size = {"ecp5": 18 * 1024, "xcup": 36 * 1024}.get(family, 18 * 1024)
    return bits / size


def resource_cost(res: dict, part: dict) -> float:
    """The scalar the Pareto front uses: the largest fraction of the part any class takes."""
    return max(res[k] / part[k] for k in ("LUT", "FF", "DSP", "BRAM"))


def fits_part(res: dict, part: dict) -> list:
    """Resource classes over the part's limits (empty when it fits)."""
    return [k for k in ("LUT", "FF", "DSP", "BRAM") if res[k] > part[k]]


# ---- the sweep ----------------------------------------------------------------------------------

#: Array shapes, scratchpad sizes (words), row lanes and accumulator widths the sweep tries.
SHAPES = [(2, 4), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16), (16, 32), (32, 32)]
SPAD_WORDS = [16 * 1024, 64 * 1024, 96 * 1024, 256 * 1024, 1024 * 1024]
ROW_LANES = [2, 4, 8, 16]
ACC_BITS = [40, 48]


def candidate_configs(base, shapes=None, spad_words=None, row_lanes=None, acc_bits=None):
    """Valid configurations derived from ``base`` (a Config) over the sweep's axes."""
    from vitamin.config import ConfigError
    out = []
    for (r, c), sw, rl, ab in itertools.product(shapes or SHAPES, spad_words or SPAD_WORDS,
                                                 row_lanes or ROW_LANES, acc_bits or ACC_BITS):
        name = f"{base.name}-{r}x{c}-s{sw // 512}k-l{rl}-a{ab}"
        try:
            cfg = base.replace(name=name, rows=r, cols=c, spad_words=sw, row_lanes=rl,
                               acc_bits=ab)
        except (ConfigError, ValueError):
            continue
        out.append(cfg)
    return out


def evaluate_point(model, cfg_dict, part, calibration=None) -> dict:
    """One design point: compile ``model`` for the configuration, estimate cycles (cost model,
    v2) and resources, check them against ``part``. Runs in a worker (local or Dask)."""
    from vitamin import api
    from vitamin.compiler.cost import estimate
    from vitamin.config import Config
    cfg = Config(**cfg_dict)
    rec = {"config": cfg.name, "rows": cfg.rows, "cols": cfg.cols, "spad_words": cfg.spad_words,
           "row_lanes": cfg.row_lanes, "acc_bits": cfg.acc_bits}
    t0 = time.perf_counter()
    res = estimate_resources(cfg, part["family"])
    rec["resources"] = {k: res[k] for k in ("LUT", "FF", "DSP", "BRAM")}
    rec["resource_cost"] = resource_cost(res, part)
    over = fits_part(res, part)
    if over:
        rec["error"] = "exceeds the part: " + ", ".join(over)
        return rec
    try:
        prog = api.compile(model, cfg, calibration)
    except ValueError as e:
        rec["error"] = f"does not compile: {str(e).splitlines()[0][:120]}"
        return rec
    est = estimate(prog, other=False)
    clk = part["clock_mhz"]
    rec.update(cycles=est.cycles, macs=est.macs, utilisation=est.utilisation(cfg),
               latency_ms=est.cycles / (clk * 1e3), dram_read_bytes=est.dram_read_bytes,
               seconds=time.perf_counter() - t0)
    return rec


class _LocalExecutor:
    """``concurrent.futures.ProcessPoolExecutor`` with the interface :func:`sweep` uses."""

    def __init__(self, workers=None):
        from concurrent.futures import ProcessPoolExecutor
        self.pool = ProcessPoolExecutor(max_workers=workers)
        self.kind = "local processes"

    def map(self, fn, *iterables):
        return list(self.pool.map(fn, *iterables))

    def close(self):
        self.pool.shutdown()


class _DaskExecutor:
    """A Dask distributed client: each point is one task on the cluster."""

    def __init__(self, address):
        from dask.distributed import Client
        self.client = Client(address)
        self.kind = f"dask scheduler {address}"

    def map(self, fn, *iterables):
        futs = self.client.map(fn, *iterables, pure=False)
        return self.client.gather(futs)

    def close(self):
        self.client.close()


def make_executor(scheduler=None, workers=None):
    """Local processes (default) or a Dask distributed cluster at ``scheduler`` (an address
    such as ``tcp://host:8786`` or a ``LocalCluster``'s ``scheduler_address``)."""
    return _DaskExecutor(scheduler) if scheduler else _LocalExecutor(workers)


@dataclass
class ExploreResult:
    part: str
    points: list = field(default_factory=list)
    front: list = field(default_factory=list)
    executor: str = ""
    seconds: float = 0.0


def pareto(points) -> list:
    """Points (feasible ones, with ``cycles``) that no other point beats on both cycles and
    ``resource_cost`` (ties kept once), by increasing resource cost."""
    ok = sorted((p for p in points if "cycles" in p),
                key=lambda p: (p["resource_cost"], p["cycles"]))
    front, best = [], None
    for p in ok:
        if best is None or p["cycles"] < best:
            front.append(p)
            best = p["cycles"]
    return front


def sweep(model, part_name, configs, executor=None, calibration=None) -> ExploreResult:
    """Evaluate ``configs`` for ``model`` on part ``part_name`` through ``executor``."""
    part = PARTS[part_name]
    own = executor is None
    ex = executor or make_executor()
    t0 = time.perf_counter()
    try:
        n = len(configs)
        pts = ex.map(evaluate_point, [str(model)] * n, [c.to_fields() if hasattr(c, "to_fields")
                                                         else _fields(c) for c in configs],
                     [part] * n, [calibration] * n)
    finally:
        if own:
            ex.close()
    return ExploreResult(part=part_name, points=list(pts), front=pareto(pts),
                         executor=ex.kind, seconds=time.perf_counter() - t0)


def _fields(cfg) -> dict:
    import dataclasses
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def plot_front(result: ExploreResult, path):
    """Latency (cycles) against resource cost of every feasible point, the front joined."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [p for p in result.points if "cycles" in p]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([100 * p["resource_cost"] for p in ok], [p["cycles"] for p in ok], s=10,
               color="0.6", label="feasible points")
    fr = result.front
    ax.plot([100 * p["resource_cost"] for p in fr], [p["cycles"] for p in fr], "o-",
            color="C3", label="Pareto front")
    for p in fr:
        ax.annotate(f"{p['rows']}x{p['cols']}", (100 * p["resource_cost"], p["cycles"]),
                    fontsize=6)
    ax.set_xlabel(f"largest resource share of {result.part} (%)")
    ax.set_ylabel("cycles (cost model, v2)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def calibrate(presets=("tiny",), family="ecp5", blocks=None, timeout=3600, log=print) -> dict:
    """Synthesise each block of the accelerator (units and memories) for ``presets`` with YoWASP
    Yosys and return ``{preset: {block: {LUT, FF, DSP, BRAM}}}``, the form of
    :data:`CALIBRATION` (whose figures were measured with this function)."""
    import tempfile

    from vitamin.hw.accel import discover_units
    from vitamin.hw.mem import AccMemory, IdxMemory, RowStateMemory, Scratchpad
    from vitamin.sim import synth
    classes = {cls.__name__: cls for cls in set(discover_units().values())}
    run_as = family
    if family == "ecp5":
        # synth_ecp5's last pass, AUTONAME, takes tens of minutes on the MATMUL unit (and fails
        # on the whole accelerator): stop after the check pass; the cells are mapped by then
        run_as = "ecp5-no-autoname"
        synth.FAMILIES.setdefault(run_as, "synth_ecp5 -top {top} -run begin:check")
    classes.update({c.__name__: c for c in (Scratchpad, AccMemory, IdxMemory, RowStateMemory)})
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for preset in presets:
            cfg = cal_config(preset)
            out[preset] = {}
            for name in sorted(blocks or classes):
                r = synth.synthesize(classes[name](cfg), run_as, d, name=name.lower(),
                                     timeout=timeout)
                out[preset][name] = resource_classes(r.cells, family)
                log(f"{preset} {name}: {out[preset][name]} ({r.seconds:.0f} s)")
    return out
