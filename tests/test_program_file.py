"""A hand-assembled program (matmul + bias + GELU -> LayerNorm -> Q.K^T -> softmax) through the
program file and the ISA simulator, against float NumPy; and the file's rejection paths."""

import math
import zlib

import numpy as np
import pytest

from vitamin import get_config
from vitamin.asm import Assembler
from vitamin.golden.isasim import run_program
from vitamin.golden.numerics import requant_params
from vitamin.isa import Act, DType, ErrorCode, OutMode
from vitamin.program import (
    ConfigMismatch,
    CorruptProgram,
    NotAProgram,
    Program,
    TruncatedProgram,
    VersionMismatch,
)

M, K, N = 12, 24, 16          # tokens, input features, hidden features
S_X = 2.0 ** -10              # input scale
S_H = 2.0 ** -11              # GELU output scale
S_LN = 2.0 ** -11             # LayerNorm output scale
S_S = 2.0 ** -8               # score scale
EPS = 1e-5


def _erf_gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _chan_table(bias, mult, shift):
    """4 words per column: bias_lo, bias_hi, mult, shift (docs/ISA.md, MATMUL)."""
    bias = np.asarray(bias, dtype=np.int64)
    t = np.zeros((len(bias), 4), dtype=np.int64)
    lo = bias & 0xFFFF
    t[:, 0] = np.where(lo >= 32768, lo - 65536, lo)
    t[:, 1] = bias >> 16
    t[:, 2] = mult
    t[:, 3] = shift
    return t


def build(config_name="tiny", seed=0):
    cfg = get_config(config_name)
    rng = np.random.default_rng(seed)
    w_f = rng.normal(0, 1 / math.sqrt(K), (K, N))
    s_w = np.abs(w_f).max(axis=0) / 127          # per-output-channel weight scales
    w_q = np.clip(np.round(w_f / s_w), -127, 127).astype(np.int64)
    b_f = rng.normal(0, 0.1, N)
    b_q = np.round(b_f / (S_X * s_w)).astype(np.int64)   # bias in accumulator units
    # requantise the accumulator to the GELU stage's Q.16 input, per channel
    rq = [requant_params(S_X * s_w[j] * 2 ** 16) for j in range(N)]
    chan1 = _chan_table(b_q, [m for m, _ in rq], [s for _, s in rq])
    act_mult, act_shift = requant_params(2.0 ** -16 / S_H)
    gamma_f = rng.uniform(0.5, 1.5, N)
    beta_f = rng.uniform(-0.5, 0.5, N)
    # out = (x_hat_Q12 * g + beta) >> shift represents gamma*x_hat + beta at scale S_LN
    ln_shift = 12
    g_q = np.round(gamma_f / S_LN).astype(np.int64)        # x_hat*2^12*g >> 12 = x_hat*g
    beta_q = np.round(beta_f / S_LN * 2 ** ln_shift).astype(np.int64)
    ln_par = np.zeros((N, 4), dtype=np.int64)
    ln_par[:, 0] = g_q
    lo = beta_q & 0xFFFF
    ln_par[:, 1] = np.where(lo >= 32768, lo - 65536, lo)
    ln_par[:, 2] = beta_q >> 16
    eps_val = N * N * EPS / S_H ** 2
    eps_e = max(0, math.ceil(math.log2(eps_val)) - 15)
    eps_m = round(eps_val / 2 ** eps_e)
    s_mult, s_shift = requant_params(S_LN * S_LN / S_S / math.sqrt(N))   # attention 1/sqrt(d)
    sm_mult, sm_shift = requant_params(S_S * math.log2(math.e) * 2 ** 16)

    a = Assembler(cfg)
    x = a.tensor("x", "input", (M, K), "i16", S_X)
    w = a.const("w", w_q, "i8")
    c1 = a.const("chan1", chan1, "i16")
    lp = a.const("ln_par", ln_par, "i16")
    h_out = a.tensor("h", "output", (M, N), "i16", S_H)
    ln_out = a.tensor("ln", "output", (M, N), "i16", S_LN)
    p_out = a.tensor("p", "output", (M, M), "i16", 2.0 ** -(cfg.act_bits - 1))
    X, W, C1, LP, H, LN, S, P = 0, 512, 1024, 1152, 2048, 2560, 3072, 3584
    a.load(dram_addr=x, spad_addr=X, run=K, n0=M, ds0=2 * K, ss0=K, dtype=DType.I16)
    a.load(dram_addr=w, spad_addr=W, run=N, n0=K, ds0=N, ss0=N, dtype=DType.I8)
    a.load(dram_addr=c1, spad_addr=C1, run=4 * N, dtype=DType.I16)
    a.load(dram_addr=lp, spad_addr=LP, run=4 * N, dtype=DType.I16, push_next=1)
    a.matmul(pop_prev=1, m=M, k=K, n=N, a_addr=X, a_stride=K, b_addr=W, b_stride=N,
             out=OutMode.SPAD, out_addr=H, out_stride=N, chan_en=1, chan_addr=C1,
             act=Act.GELU, act_mult=act_mult, act_shift=act_shift)
    a.layernorm(m=M, n=N, in_addr=H, in_stride=N, out_addr=LN, out_stride=N, param_addr=LP,
                eps_m=eps_m, eps_e=eps_e, shift=ln_shift)
    a.matmul(m=M, k=N, n=M, a_addr=LN, a_stride=N, b_addr=LN, b_stride=N, b_trans=1,
             out=OutMode.SPAD, out_addr=S, out_stride=M, mult=s_mult, shift=s_shift)
    a.softmax(m=M, n=M, in_addr=S, in_stride=M, out_addr=P, out_stride=M, mult=sm_mult,
              shift=sm_shift, push_next=1)
    a.store(pop_prev=1, dram_addr=h_out, spad_addr=H, run=M * N, dtype=DType.I16)
    a.store(dram_addr=ln_out, spad_addr=LN, run=M * N, dtype=DType.I16)
    a.store(dram_addr=p_out, spad_addr=P, run=M * M, dtype=DType.I16)
    a.end()
    prog = a.link()
    ref = dict(w=w_q * s_w, b=b_q * S_X * s_w, gamma=g_q * S_LN, beta=beta_q * S_LN / 2 ** 12,
               s_mult=s_mult, s_shift=s_shift)
    return prog, ref


@pytest.mark.parametrize("config_name", ["tiny", "ecp5"])
def test_hand_assembled_program_matches_float(tmp_path, config_name):
    prog, ref = build(config_name)
    path = tmp_path / "prog.vit"
    prog.save(path)
    loaded = Program.load(path, config_name)
    rng = np.random.default_rng(1)
    x_f = rng.normal(0, 1.0, (M, K))
    x_q = np.clip(np.round(x_f / S_X), -32768, 32767).astype(np.int64)
    res, out = run_program(loaded, {"x": x_q})
    assert res.ok, res.message
    assert res.counters["macs"] == M * K * N + M * N * M
    assert res.counters["sat_events"] == 0
    # 1. linear + bias + GELU against float on the same (dequantised) operands:
    #    bound = GELU approximation (2e-4) + requantisation to Q.16 (2^-17 times GELU's slope
    #    <= 1.13) + one output LSB
    h = out["h"] * S_H
    h_ref = _erf_gelu((x_q * S_X) @ ref["w"] + ref["b"])
    assert np.abs(h - h_ref).max() <= 2e-4 + 1.13 * 2 ** -17 + S_H
    # 2. LayerNorm of the accelerator's own h: within 2^-6
    hq = out["h"] * S_H
    mu = hq.mean(axis=1, keepdims=True)
    ln_ref = (hq - mu) / np.sqrt(hq.var(axis=1, keepdims=True) + EPS) * ref["gamma"] + ref["beta"]
    assert np.abs(out["ln"] * S_LN - ln_ref).max() <= 2 ** -6
    # 3. Q.K^T requantisation is exact integer arithmetic (round half up)
    lnq = out["ln"].astype(np.int64)
    prod = lnq @ lnq.T
    s_exact = np.clip((prod * ref["s_mult"] + (1 << (ref["s_shift"] - 1))) >> ref["s_shift"],
                      -32768, 32767)
    # 4. softmax of those scores: within 2^-8 of float
    s_f = s_exact * S_S  # the 1/sqrt(d) factor is inside s_mult
    e = np.exp(s_f - s_f.max(axis=1, keepdims=True))
    p_ref = e / e.sum(axis=1, keepdims=True)
    p = out["p"] / 2.0 ** (loaded.config.act_bits - 1)
    assert np.abs(p - p_ref).max() <= 2 ** -8
    assert (p.argmax(axis=1) == p_ref.argmax(axis=1)).all()


def test_program_round_trip_is_identical():
    prog, _ = build()
    blob = prog.to_bytes()
    again = Program.from_bytes(blob).to_bytes()
    assert again == blob


def _blob():
    prog, _ = build()
    return prog.to_bytes()


def test_flipped_byte_is_corrupt():
    blob = bytearray(_blob())
    for pos in (70, len(blob) // 2, len(blob) - 1, 20):   # code, consts, symtab, header
        bad = bytearray(blob)
        bad[pos] ^= 0x40
        with pytest.raises(CorruptProgram, match="corrupted: checksum mismatch"):
            Program.from_bytes(bytes(bad))


def test_truncated_file():
    blob = _blob()
    for cut in (len(blob) - 1, 200, 64):
        with pytest.raises(TruncatedProgram, match=f"truncated: {cut} of {len(blob)} bytes"):
            Program.from_bytes(blob[:cut])
    with pytest.raises(TruncatedProgram, match="shorter than the 64-byte header"):
        Program.from_bytes(blob[:30])


def test_not_a_program():
    with pytest.raises(NotAProgram, match="bad magic"):
        Program.from_bytes(b"\x7fELF" + bytes(100))


def test_wrong_version():
    blob = bytearray(_blob())
    blob[8:10] = (99).to_bytes(2, "little")
    with pytest.raises(VersionMismatch, match="version 99"):
        Program.from_bytes(bytes(blob))


def test_other_configuration():
    prog, _ = build("tiny")
    blob = prog.to_bytes()
    with pytest.raises(ConfigMismatch, match="built for configuration 'tiny'.*not for 'ecp5'"):
        Program.from_bytes(blob, "ecp5")
    # a file stamped with a fingerprint of no preset, with a valid checksum
    bad = bytearray(blob)
    bad[16:24] = bytes(8)
    bad[60:64] = bytes(4)
    bad[60:64] = zlib.crc32(bytes(bad)).to_bytes(4, "little")
    with pytest.raises(ConfigMismatch, match="matches no preset"):
        Program.from_bytes(bytes(bad))


def test_corrupted_instruction_halts_machine():
    """A checksum-valid file whose code holds an illegal opcode: the machine halts with an
    error status at that instruction, it does not crash or run on."""
    prog, _ = build()
    code = bytearray(prog.code)
    code[5 * 64:6 * 64] = bytes(64)
    bad = Program(config=prog.config, code=bytes(code), consts=prog.consts,
                  const_addr=prog.const_addr, dram_size=prog.dram_size, symbols=prog.symbols)
    res, _ = run_program(bad, {"x": np.zeros((M, K), dtype=np.int64)})
    assert res.status == ErrorCode.ILLEGAL_OPCODE
    assert res.error_pc == 5
