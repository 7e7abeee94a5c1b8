"""The configuration presets, their derived figures, and validation of bad configurations."""

import dataclasses
import re

import pytest

from vitamin.config import PRESETS, Config, ConfigError, get_config


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_validates(name):
    cfg = PRESETS[name]
    assert cfg.name == name
    # Rebuilding from the fields runs __post_init__ again on exactly the same values.
    assert Config(**cfg.to_dict()) == cfg
    assert get_config(name) is cfg
    assert get_config(cfg) is cfg


def test_preset_names():
    assert list(PRESETS) == ["tiny", "ecp5", "zcu102"]


@pytest.mark.parametrize("name", list(PRESETS))
def test_derived_figures(name):
    cfg = PRESETS[name]
    assert cfg.macs == cfg.rows * cfg.cols
    assert cfg.peak_gops == pytest.approx(2 * cfg.rows * cfg.cols * cfg.clock_mhz / 1000)
    assert cfg.act_min == -(2 ** (cfg.act_bits - 1))
    assert cfg.act_max == 2 ** (cfg.act_bits - 1) - 1
    assert cfg.acc_min == -(2 ** (cfg.acc_bits - 1))
    assert cfg.acc_max == 2 ** (cfg.acc_bits - 1) - 1
    assert cfg.spad_bytes == 2 * cfg.spad_words
    assert cfg.onchip_bytes >= cfg.spad_bytes + cfg.acc_bytes
    s = cfg.summary()
    assert s["name"] == name
    assert s["macs_per_cycle"] == cfg.macs
    assert s["array"] == f"{cfg.rows}x{cfg.cols}"
    assert s["peak_gops"] == cfg.peak_gops
    assert s["onchip_kib"] == cfg.onchip_bytes / 1024
    assert s["fingerprint"] == cfg.fingerprint().hex()


def test_preset_sizes():
    # ULX3S LFE5U-85F has 156 MULT18X18D; one MAC of 16-bit words needs one.
    assert PRESETS["ecp5"].macs <= 156
    # Like-for-like with Edge-MoE on the ZCU102: a 16x16 array.
    assert PRESETS["zcu102"].macs == 256
    # iCE40UP5K has 8 DSPs.
    assert PRESETS["tiny"].macs <= 8
    assert PRESETS["ecp5"].peak_gops == pytest.approx(3.2)   # 16 MACs at 100 MHz
    assert PRESETS["zcu102"].peak_gops == pytest.approx(153.6)


@pytest.mark.parametrize("preset, changes, field", [
    ("ecp5", {"rows": 3}, "rows"),
    ("ecp5", {"cols": 128}, "cols"),
    ("ecp5", {"act_bits": 12}, "act_bits"),
    ("ecp5", {"weight_bits": 5}, "weight_bits"),
    # 4096 products of two 16-bit words need 31 + 12 + 1 = 44 bits.
    ("ecp5", {"acc_bits": 40, "max_k": 4096}, "acc_bits"),
    ("tiny", {"acc_bits": 32, "max_k": 1024}, "acc_bits"),
    # ecp5 has rows*cols = 16; 96 Ki + 8 words is not a multiple of it.
    ("ecp5", {"spad_words": 96 * 1024 + 8}, "spad_words"),
    ("ecp5", {"spad_words": 512}, "spad_words"),
    ("ecp5", {"bus_bits": 48}, "bus_bits"),
    ("ecp5", {"max_k": 3000}, "max_k"),
    ("ecp5", {"row_lanes": 3}, "row_lanes"),
    ("ecp5", {"dram_bytes": 3 << 20}, "dram_bytes"),
    ("ecp5", {"clock_mhz": 0.0}, "clock_mhz"),
    ("ecp5", {"gelu_range": 5}, "gelu_range"),
])
def test_invalid_config_names_field(preset, changes, field):
    with pytest.raises(ConfigError, match=re.escape(f"'{field}'")):
        PRESETS[preset].replace(**changes)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="nope") as info:
        get_config("nope")
    for name in PRESETS:
        assert name in str(info.value)


@pytest.mark.parametrize("name", list(PRESETS))
def test_fingerprint_ignores_name(name):
    cfg = PRESETS[name]
    assert cfg.replace(name="renamed").fingerprint() == cfg.fingerprint()
    assert cfg.fingerprint() == Config(**cfg.to_dict()).fingerprint()
    assert len(cfg.fingerprint()) == 8


@pytest.mark.parametrize("changes", [
    {"cols": 8},
    {"act_bits": 8},
    {"weight_bits": 4},
    {"spad_words": 64 * 1024},
    {"row_lanes": 4},
    {"bus_bits": 64},
    {"gelu_step_log2": 5},
])
def test_fingerprint_changes_with_fields(changes):
    cfg = PRESETS["ecp5"]
    assert cfg.replace(**changes).fingerprint() != cfg.fingerprint()


def test_fingerprints_of_presets_differ():
    assert len({cfg.fingerprint() for cfg in PRESETS.values()}) == len(PRESETS)


def test_frozen():
    cfg = PRESETS["ecp5"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rows = 2
    assert cfg.rows == 4
