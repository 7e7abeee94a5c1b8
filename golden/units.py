"""Integer-exact models of the compute units: the specification of every arithmetic instruction.

All functions take and return int64 NumPy arrays (scratchpad words are 16-bit; accumulators are
``config.acc_bits`` wide). Saturation events are counted through a :class:`~.numerics.Sat`.
The row units process each row in chunks of ``config.row_lanes`` elements, in the same order as
the hardware, so the results (whose roundings depend on that order) are bit-exact.
"""

from __future__ import annotations

import numpy as np

from .numerics import Sat, bit_length, rshift_round
from .tables import interp, table, table_spec

__all__ = [
    "GELU_FRAC", "LN_FRAC", "exp_shift", "matmul_exact", "exp2_neg", "recip_norm", "rsqrt_norm",
    "gelu_fx", "epilogue", "softmax_full", "softmax_online", "RowState", "layernorm",
    "topk", "route", "spans", "select", "select_scores", "vec",
]

GELU_FRAC = 16   # the GELU stage works on Q.16 values in 32 bits
LN_FRAC = 12     # the normalised LayerNorm value x_hat is Q.12
NEG_BIG = np.int64(-(1 << 40))


def exp_shift(config) -> int:
    """ONLINE softmax writes exp values as Q.(act_bits - 2), i.e. E >> exp_shift (no saturation)."""
    return 16 - config.act_bits + 1


def matmul_exact(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact integer product of 16-bit word matrices.

    float64 BLAS is exact here: every product is below 2^30 and every partial sum below 2^52
    (k <= max_k <= 2^22), so all intermediates are integers that float64 represents exactly.
    """
    assert a.shape[1] <= (1 << 22)
    return (a.astype(np.float64) @ b.astype(np.float64)).astype(np.int64)


def exp2_neg(z, config):
    """E(z) = 2^(-z / 2^16) in Q.15 for z >= 0 (z in Q.16 log2 units)."""
    z = np.asarray(z, dtype=np.int64)
    spec = table_spec("exp2", config)
    t = interp(table("exp2", config), z & 0xFFFF, spec.in_frac)
    return rshift_round(t, np.minimum(z >> 16, 62))


def recip_norm(s, config):
    """For s >= 1: (r, k) with 1/s ~= r * 2^-15 * 2^-k, r in Q.15 within (0.5, 1].

    s = 2^k (1 + f); the 16 bits of f below the leading one index the 1/(1+f) table (bits beyond
    16 are truncated). s = 0 gives (0, 0).
    """
    s = np.asarray(s, dtype=np.int64)
    k = np.maximum(bit_length(s) - 1, 0)
    mant = np.where(k >= 16, s >> np.maximum(k - 16, 0), s << np.maximum(16 - k, 0)) & 0xFFFF
    spec = table_spec("recip", config)
    r = interp(table("recip", config), mant, spec.in_frac)
    return np.where(s > 0, r, 0), np.where(s > 0, k, 0)


def rsqrt_norm(d, config):
    """For d >= 1: (r, k) with 1/sqrt(d) ~= r * 2^-15 * 2^-k, r in Q.15 within (0.5, 1].

    d = x * 4^k with x in [1, 4); x with 16 fraction bits (lower bits truncated) indexes the
    1/sqrt table.
    """
    d = np.asarray(d, dtype=np.int64)
    k = (bit_length(d) - 1) // 2
    sh = 2 * k - 16
    x16 = np.where(sh >= 0, d >> np.maximum(sh, 0), d << np.maximum(-sh, 0))
    spec = table_spec("rsqrt", config)
    r = interp(table("rsqrt", config), x16, spec.in_frac)
    return r, k


def gelu_fx(x, config):
    """gelu(x) = relu(x) - d(|x|) on Q.16 values; d from the interpolated table, 0 beyond range."""
    x = np.asarray(x, dtype=np.int64)
    u = np.abs(x)
    spec = table_spec("gelu", config)
    lim = np.int64(config.gelu_range) << GELU_FRAC
    d = interp(table("gelu", config), np.minimum(u, lim - 1), spec.in_frac)
    d = np.where(u >= lim, 0, d)
    return np.maximum(x, 0) - d


def epilogue(acc, config, sat: Sat, *, bias, mult, shift, act, act_mult=0, act_shift=0,
             residual=None, res_mult=0, res_shift=0, row_r=None, row_k=None):
    """The output lane: (row norm) -> bias -> requantise -> (GELU | ReLU) -> (residual).

    ``acc`` is [m, n]; ``bias``, ``mult``, ``shift`` are per column [n]; ``row_r``/``row_k`` per
    row [m]; ``act`` is "none", "gelu" or "relu". Returns activations [m, n] (saturated to
    ``act_bits``).
    """
    abits = config.act_bits
    v = np.asarray(acc, dtype=np.int64)
    if row_r is not None:
        sh = 15 + row_k - exp_shift(config)
        v = sat(rshift_round(v * row_r[:, None], sh[:, None]), config.acc_bits)
    v = sat(v + bias[None, :], config.acc_bits)
    if act == "gelu":
        x = sat(rshift_round(v * mult[None, :], shift[None, :]), 32)
        g = gelu_fx(x, config)
        y = sat(rshift_round(g * act_mult, act_shift), abits)
    elif act == "relu":
        y = sat(rshift_round(np.maximum(v, 0) * mult[None, :], shift[None, :]), abits)
    else:
        y = sat(rshift_round(v * mult[None, :], shift[None, :]), abits)
    if residual is not None:
        y = sat(y + rshift_round(np.asarray(residual, dtype=np.int64) * res_mult, res_shift),
                abits)
    return y


def _z(hi, lo, mult, shift):
    return rshift_round((hi - lo) * mult, shift)


def _sm_pass1(x, valid, mult, shift, config, have, m, s):
    """Running max/sum over the columns of x in chunks of row_lanes; returns (have, m, s)."""
    lanes = config.row_lanes
    n = x.shape[1]
    for c0 in range(0, n, lanes):
        xs = x[:, c0:c0 + lanes]
        vs = valid[:, c0:c0 + lanes]
        anyv = vs.any(axis=1)
        cm = np.where(vs, xs, NEG_BIG).max(axis=1)
        m_new = np.where(have, np.maximum(m, cm), cm)
        scale = np.where(have, exp2_neg(_z(m_new, np.where(have, m, m_new), mult, shift),
                                        config), 0)
        e = np.where(vs, exp2_neg(_z(m_new[:, None], np.where(vs, xs, m_new[:, None]), mult,
                                     shift), config), 0)
        s_new = rshift_round(s * scale, 15) + e.sum(axis=1)
        s = np.where(anyv, s_new, s)
        m = np.where(anyv, m_new, m)
        have = have | anyv
    return have, m, s


def softmax_full(x, valid, mult, shift, config, sat: Sat):
    """Softmax of each row of int16 scores ``x`` [m, n] (real value x*scale).

    ``mult``/``shift`` map score differences to Q.16 log2 units: z = rnd((max - x) * mult >>
    shift). Masked elements (valid False) give 0; a row without valid elements gives zeros.
    Output: probabilities in Q.(act_bits-1), saturated (p = 1.0 saturates to the largest word).
    """
    x = np.asarray(x, dtype=np.int64)
    rows = x.shape[0]
    have = np.zeros(rows, dtype=bool)
    m = np.zeros(rows, dtype=np.int64)
    s = np.zeros(rows, dtype=np.int64)
    have, m, s = _sm_pass1(x, valid, mult, shift, config, have, m, s)
    r, k = recip_norm(s, config)
    e = exp2_neg(_z(m[:, None], np.where(valid, x, m[:, None]), mult, shift), config)
    p15 = np.where(valid, rshift_round(e * r[:, None], k[:, None]), 0)
    return sat(rshift_round(p15, 16 - config.act_bits), config.act_bits)


class RowState:
    """Row-state memory of the online softmax: per row, valid flag, running max m, sum s,
    correction factor c (Q.15), and 1/s as (r, k)."""

    def __init__(self, rows: int):
        self.have = np.zeros(rows, dtype=bool)
        self.m = np.zeros(rows, dtype=np.int64)
        self.s = np.zeros(rows, dtype=np.int64)
        self.c = np.zeros(rows, dtype=np.int64)
        self.r = np.zeros(rows, dtype=np.int64)
        self.k = np.zeros(rows, dtype=np.int64)


def softmax_online(x, valid, mult, shift, config, sat: Sat, rs: RowState, rows: slice, *,
                   first: bool, last: bool):
    """One chunk of columns of the online softmax; updates ``rs[rows]``, returns exp values.

    Output e = E(z(m_new, x)) >> exp_shift, in Q.(act_bits-2) (never saturates). The row state's
    c = E(z(m_new, m_old)) rescales earlier partial sums (0 when the row had no valid element).
    With ``last``, (r, k) = recip_norm(s) is stored for the row-normalising epilogue.
    """
    x = np.asarray(x, dtype=np.int64)
    if first:
        rs.have[rows] = False
        rs.m[rows] = 0
        rs.s[rows] = 0
    have0 = rs.have[rows].copy()
    m0 = rs.m[rows].copy()
    have, m, s = _sm_pass1(x, valid, mult, shift, config, have0.copy(), m0.copy(),
                           rs.s[rows].copy())
    rs.c[rows] = np.where(have0, exp2_neg(_z(m, np.where(have0, m0, m), mult, shift), config), 0)
    rs.have[rows] = have
    rs.m[rows] = m
    rs.s[rows] = s
    if last:
        r, k = recip_norm(s, config)
        rs.r[rows] = r
        rs.k[rows] = k
    e = exp2_neg(_z(m[:, None], np.where(valid, x, m[:, None]), mult, shift), config)
    return np.where(valid, rshift_round(e, exp_shift(config)), 0)


def layernorm(x, gamma, beta, eps_m, eps_e, shift, config, sat: Sat):
    """One-pass LayerNorm of rows of ``x`` [m, n] (int16 words).

    S1 = sum x, S2 = sum x^2, D = n*S2 - S1^2 + eps_m*2^eps_e (= n^2 (var + eps) in x units^2),
    x_hat = rnd((n*x - S1) * rsqrt(D)) in Q.12, out = sat(rnd((x_hat*gamma + beta) >> shift)).
    """
    x = np.asarray(x, dtype=np.int64)
    n = x.shape[1]
    s1 = x.sum(axis=1)
    s2 = (x * x).sum(axis=1)
    d = n * s2 - s1 * s1 + (np.int64(eps_m) << np.int64(eps_e))
    d = np.maximum(d, 1)
    r, k = rsqrt_norm(d, config)
    xh = rshift_round((n * x - s1[:, None]) * r[:, None], (15 + k - LN_FRAC)[:, None])
    return sat(rshift_round(xh * gamma[None, :] + beta[None, :], shift), config.act_bits)


def topk(x, k: int, valid=None):
    """Top-k of each row: (indices, values) [m, k], descending value, ties to the lower index.

    Invalid columns never take part; missing entries are (-1, 0).
    """
    x = np.asarray(x, dtype=np.int64)
    m, n = x.shape
    idx = np.full((m, k), -1, dtype=np.int64)
    val = np.zeros((m, k), dtype=np.int64)
    if valid is None:
        valid = np.ones_like(x, dtype=bool)
    for i in range(m):
        cols = np.nonzero(valid[i])[0]
        order = cols[np.lexsort((cols, -x[i, cols]))][:k]
        idx[i, :len(order)] = order
        val[i, :len(order)] = x[i, order]
    return idx, val


def route(experts, probs, n_experts: int):
    """Per-expert token queues from top-k routing [m, k].

    Returns (queue_tokens, queue_probs, offsets, lengths): experts in ascending order, tokens in
    ascending order inside each queue; entries with expert -1 are ignored. Raises ValueError for
    an expert index outside [0, n_experts).
    """
    experts = np.asarray(experts, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.int64)
    bad = (experts >= n_experts) | (experts < -1)
    if bad.any():
        t, j = np.argwhere(bad)[0]
        raise ValueError(f"token {t} selects expert {experts[t, j]} outside 0..{n_experts - 1}")
    toks, ps, offs, lens = [], [], [], []
    for e in range(n_experts):
        t_idx, j_idx = np.nonzero(experts == e)
        order = np.argsort(t_idx, kind="stable")
        offs.append(len(toks))
        lens.append(len(order))
        toks.extend(t_idx[order].tolist())
        ps.extend(probs[t_idx[order], j_idx[order]].tolist())
    return (np.array(toks, dtype=np.int64), np.array(ps, dtype=np.int64),
            np.array(offs, dtype=np.int64), np.array(lens, dtype=np.int64))


def spans(blocks, block: int, sink: int, diag_lo: int, diag_n: int, limit: int):
    """Selected blocks (plus sink and diagonal blocks) -> ascending merged (start, length) spans,
    clipped to rows < limit."""
    sel = {int(b) for b in blocks if b >= 0}
    sel.update(range(sink))
    sel.update(b for b in range(diag_lo, diag_lo + diag_n) if b >= 0)
    out = []
    for b in sorted(sel):
        start = b * block
        if start >= limit:
            break
        end = min(start + block, limit)
        if out and out[-1][0] + out[-1][1] == start:
            out[-1][1] = end - out[-1][0]
        else:
            out.append([start, end - start])
    return out


def select_scores(starts, seq: int, limit: int, s, config):
    """DHSA chunk scores: ``[(score, a, e')]`` of the candidate chunks (starts ``a < limit``).

    Chunk ``c`` is ``[starts[c], starts[c + 1])`` (the last one ends at ``seq``), clipped to
    ``e' = min(e, limit)``; ``score = rnd(S * r, 15 + k)`` with ``S`` the exact sum of the token
    scores ``s[a:e']`` and ``(r, k) = rsqrt_norm(e' - a)``. ``starts`` must be ascending.
    """
    starts = [int(a) for a in starts]
    out = []
    for c, a in enumerate(starts):
        if a >= limit:
            break
        e = starts[c + 1] if c + 1 < len(starts) else int(seq)
        e2 = min(e, int(limit))
        total = int(np.asarray(s[a:e2], dtype=np.int64).sum())
        r, k = rsqrt_norm(e2 - a, config)
        out.append((int(rshift_round(total * int(r), 15 + int(k))), a, e2))
    return out


def select(starts, seq: int, limit: int, s, sink: int, recent: int, budget: int, config):
    """DHSA budgeted selection (docs/ISA.md, SELECT): ascending merged ``[start, length]`` spans.

    Forced tokens ``F = [0, min(sink, limit)) U [max(0, limit - recent), limit)``; the rest of
    the budget goes to the candidate chunks (:func:`select_scores`) in descending score, ties to
    the lower chunk index, each giving the first tokens of its part outside ``F``.
    """
    limit = int(limit)
    chunks = select_scores(starts, seq, limit, s, config)
    sk = min(int(sink), limit)
    rs = max(0, limit - int(recent))
    n_forced = limit if sk >= rs else sk + (limit - rs)
    left = int(budget) - n_forced
    pieces = [(0, sk)] if sk > 0 else []
    taken = []
    if left > 0:
        order = sorted(range(len(chunks)), key=lambda c: (-chunks[c][0], c))
        for c in order:
            _, a, e2 = chunks[c]
            lo, hi = max(a, sk), min(e2, rs)
            t = min(left, max(0, hi - lo))
            if t:
                taken.append((lo, lo + t))
                left -= t
            if left == 0:
                break
    pieces += sorted(taken)
    if rs < limit:
        pieces.append((rs, limit))
    out = []
    for a, e in sorted(pieces):
        if out and a <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][0] + out[-1][1], e) - out[-1][0]
        else:
            out.append([a, e - a])
    return out


def vec(op: str, a, b, ma, sa, mb, sb, group, config, sat: Sat):
    """Element-wise COPY / ADD / MUL, and POOL (sum of `group` consecutive rows)."""
    a = np.asarray(a, dtype=np.int64)
    abits = config.act_bits
    if op == "copy":
        return sat(rshift_round(a * ma, sa), abits)
    if op == "add":
        b = np.asarray(b, dtype=np.int64)
        return sat(rshift_round(a * ma, sa) + rshift_round(b * mb, sb), abits)
    if op == "mul":
        b = np.asarray(b, dtype=np.int64)
        return sat(rshift_round(a * b * ma, sa), abits)
    if op == "pool":
        m = a.shape[0] // group
        s = a[:m * group].reshape(m, group, -1).sum(axis=1)
        return sat(rshift_round(s * ma, sa), abits)
    raise ValueError(op)

