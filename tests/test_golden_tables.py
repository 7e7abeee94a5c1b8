"""The lookup tables (golden/tables.py): shape, contents, determinism, interpolation."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from vitamin.config import PRESETS
from vitamin.golden import tables
from vitamin.golden.tables import TABLE_NAMES, interp, make_table, table, table_spec

CONFIGS = [PRESETS[name] for name in PRESETS]
CFG_IDS = list(PRESETS)

# configurations exercising every allowed table parameter
VARIANTS = [PRESETS["tiny"].replace(exp_index_bits=b, recip_index_bits=b, rsqrt_index_bits=b)
            for b in (4, 5, 6, 10, 12)]
VARIANTS += [PRESETS["ecp5"].replace(gelu_step_log2=g, gelu_range=r)
             for g in (3, 6, 8) for r in (4, 8, 16)]
ALL_CFGS = CONFIGS + VARIANTS

_erfc = np.frompyfunc(math.erfc, 1, 1)


def exact_values(name: str, spec) -> np.ndarray:
    """f(x0 + i*step) * 2^out_frac in float64, computed independently of tables.py."""
    x = spec.x0 + np.arange(spec.entries) * spec.step
    if name == "exp2":
        v = np.exp2(-x)
    elif name == "recip":
        v = 1.0 / x
    elif name == "rsqrt":
        v = 1.0 / np.sqrt(np.maximum(x, 1.0))
    else:   # gelu correction d(u) = u * Phi(-u)
        v = x * 0.5 * _erfc(x / math.sqrt(2.0)).astype(np.float64)
    return v * 2.0 ** spec.out_frac


@pytest.mark.parametrize("name", TABLE_NAMES)
@pytest.mark.parametrize("cfg", ALL_CFGS, ids=lambda c: f"{c.name}-e{c.exp_index_bits}-"
                         f"g{c.gelu_step_log2}r{c.gelu_range}")
def test_table_shape_and_range(name, cfg):
    spec = table_spec(name, cfg)
    t = make_table(name, cfg)
    assert t.dtype == np.int64 and t.ndim == 1
    assert len(t) == spec.entries == (1 << spec.index_bits) + 1
    assert np.all(t >= 0) and np.all(t < (1 << spec.value_bits))
    # the index and the interpolation fraction together cover the unit's input field
    if name == "rsqrt":
        assert spec.index_bits + spec.in_frac == 18          # x in [0, 4) with 16 fraction bits
    elif name == "gelu":
        assert (1 << (spec.index_bits + spec.in_frac)) == cfg.gelu_range << 16   # |x| in Q.16
        assert spec.step == 2.0 ** -cfg.gelu_step_log2
    else:
        assert spec.index_bits + spec.in_frac == 16
    idx_bits = {"exp2": cfg.exp_index_bits, "recip": cfg.recip_index_bits,
                "rsqrt": cfg.rsqrt_index_bits}
    if name in idx_bits:
        assert spec.index_bits == idx_bits[name]
    # every entry is f(x_i) rounded half up (independent float computation)
    v = exact_values(name, spec)
    assert np.all(np.abs(t - v) <= 0.5 + 1e-9)
    not_half = np.abs((v - np.floor(v)) - 0.5) > 1e-9
    assert np.array_equal(t[not_half], np.floor(v[not_half] + 0.5).astype(np.int64))


@pytest.mark.parametrize("name", TABLE_NAMES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
def test_make_table_is_deterministic(name, cfg):
    a = make_table(name, cfg)
    b = make_table(name, cfg)
    c = make_table(name, cfg.replace())                       # an equal, distinct Config
    assert a is not b
    assert np.array_equal(a, b) and np.array_equal(a, c)
    assert np.array_equal(table(name, cfg), a)
    # the name and clock do not take part: equal table fields give equal tables
    d = make_table(name, cfg.replace(name="other", clock_mhz=1.0))
    assert np.array_equal(a, d)


@pytest.mark.parametrize("cfg", ALL_CFGS[:8], ids=lambda c: f"{c.name}-e{c.exp_index_bits}")
def test_exp2_and_recip_endpoints(cfg):
    e = make_table("exp2", cfg)
    assert e[0] == 1 << 15 and e[-1] == 1 << 14                # 2^0 and 2^-1 in Q.15
    assert np.all(np.diff(e) < 0)                              # strictly decreasing
    r = make_table("recip", cfg)
    assert r[0] == 1 << 15 and r[-1] == 1 << 14                # 1/1 and 1/2 in Q.15
    assert np.all(np.diff(r) < 0)
    q = make_table("rsqrt", cfg)
    spec = table_spec("rsqrt", cfg)
    one = (len(q) - 1) // 4                                    # index of x = 1
    assert spec.x0 + one * spec.step == 1.0
    assert q[one] == 1 << 15 and q[-1] == 1 << 14              # 1/sqrt(1), 1/sqrt(4)
    assert np.all(q[:one] == 1 << 15)                          # never read: hold the x=1 value
    assert np.all(np.diff(q[one:]) < 0)
    mid = 2 * one                                              # x = 2
    assert q[mid] == math.floor(2 ** 15 / math.sqrt(2) + 0.5)


@pytest.mark.parametrize("cfg", CONFIGS + VARIANTS[5:], ids=lambda c: f"{c.name}-"
                         f"g{c.gelu_step_log2}r{c.gelu_range}")
def test_gelu_correction_table(cfg):
    d = make_table("gelu", cfg)
    spec = table_spec("gelu", cfg)
    assert d[0] == 0                                           # d(0) = 0
    assert np.all(d >= 0)
    # max of u * Phi(-u) is 0.16997 at u = 0.7518: ~0.17 * 2^16 = 11139
    u = np.linspace(0, 4, 400001)
    dmax = (u * 0.5 * _erfc(u / math.sqrt(2)).astype(np.float64)).max()
    assert abs(dmax - 0.16997) < 1e-5
    assert abs(d.max() - dmax * 2 ** 16) <= 0.5 + dmax * 2 ** 16 * 1e-3  # grid step effect
    assert 11000 <= d.max() <= 11200
    peak = int(d.argmax())
    flat = np.nonzero(d == d.max())[0]                         # the rounded peak may be flat
    assert spec.x0 + (flat[0] - 1) * spec.step <= 0.7518 <= spec.x0 + (flat[-1] + 1) * spec.step
    # unimodal: rises to the peak, then decays to ~0 at the end of the range
    assert np.all(np.diff(d[:peak + 1]) >= 0) and np.all(np.diff(d[peak:]) <= 0)
    end = cfg.gelu_range * 0.5 * math.erfc(cfg.gelu_range / math.sqrt(2)) * 2 ** 16
    assert abs(d[-1] - end) <= 0.5
    if cfg.gelu_range >= 8:
        assert d[-1] == 0


@pytest.mark.parametrize("name", TABLE_NAMES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
def test_table_is_read_only_and_cached(name, cfg):
    t = table(name, cfg)
    assert not t.flags.writeable
    with pytest.raises(ValueError):
        t[0] = 1
    with pytest.raises(ValueError):
        t += 1
    assert table(name, cfg) is t                               # cached
    assert table(name, cfg.replace()) is t                     # equal configs share the cache
    # make_table returns a fresh, writable array: mutating it does not change table()
    m = make_table(name, cfg)
    assert m.flags.writeable
    before = t.copy()
    m[:] = 0
    assert np.array_equal(table(name, cfg), before)


def test_unknown_table_name():
    with pytest.raises(KeyError):
        table_spec("tanh", PRESETS["tiny"])
    with pytest.raises(KeyError):
        make_table("sigmoid", PRESETS["tiny"])


@pytest.mark.parametrize("name", TABLE_NAMES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
def test_interp_exact_at_table_points(name, cfg):
    t = table(name, cfg)
    spec = table_spec(name, cfg)
    i = np.arange(len(t) - 1, dtype=np.int64)
    assert np.array_equal(interp(t, i << spec.in_frac, spec.in_frac), t[:-1])
    # scalar input
    assert int(interp(t, 3 << spec.in_frac, spec.in_frac)) == t[3]


@pytest.mark.parametrize("name", TABLE_NAMES)
def test_interp_matches_exact_reference(name):
    cfg = PRESETS["ecp5"]
    t = table(name, cfg)
    spec = table_spec(name, cfg)
    rng = np.random.default_rng(30)
    u = rng.integers(0, (len(t) - 1) << spec.in_frac, 4000)
    got = interp(t, u, spec.in_frac)
    half = Fraction(1, 2)
    want = []
    for x in u.tolist():
        i, f = x >> spec.in_frac, x & ((1 << spec.in_frac) - 1)
        d = int(t[i + 1]) - int(t[i])
        want.append(int(t[i]) + math.floor(Fraction(d * f, 1 << spec.in_frac) + half))
    assert got.tolist() == want
    # the result lies between the neighbouring entries
    i = u >> spec.in_frac
    lo = np.minimum(t[i], t[i + 1])
    hi = np.maximum(t[i], t[i + 1])
    assert np.all((got >= lo) & (got <= hi))


def test_interp_rounding_and_linearity():
    # a linear table is reproduced exactly
    tab = np.arange(17, dtype=np.int64) * 256
    u = np.arange(16 * 256, dtype=np.int64)
    assert np.array_equal(interp(tab, u, 8), u)
    # halves round up (towards +infinity), for rising and falling segments
    assert int(interp(np.array([10, 11]), 1, 1)) == 11        # 10.5 -> 11
    assert int(interp(np.array([10, 9]), 1, 1)) == 10         # 9.5 -> 10
    assert int(interp(np.array([10, 13]), 1, 2)) == 11        # 10.75 -> 11
    assert int(interp(np.array([10, 13]), 2, 2)) == 12        # 11.5 -> 12
    assert int(interp(np.array([10, 7]), 2, 2)) == 9          # 8.5 -> 9
    assert int(interp(np.array([10, 7]), 3, 2)) == 8          # 7.75 -> 8


@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
def test_presets_share_table_contents(cfg):
    """The presets use the default table fields: the tables (and so the measured error bounds
    in test_golden_units.py) are the same for all of them."""
    for name in TABLE_NAMES:
        assert np.array_equal(table(name, cfg), table(name, PRESETS["tiny"]))
    assert tables.table_spec("gelu", cfg).entries == 8 * 64 + 1
