"""Edge-MoE's reordered attention schedule, as a golden model.

Edge-MoE computes Q.K^T with ``P`` query rows in flight and the keys streamed past them, one key
row per step. Slot ``o`` (0 <= o < P) takes a new query row whenever the key on the bus has index
``o``, so the slots start staggered and every row sees the keys in the rotated order
``o, o+1, ..., N-1, 0, ..., o-1``. At every step the schedule reads at most one K row and at most
one Q row from memory, whatever ``P`` is: the bandwidth stays constant as the parallelism grows.

In vitamin the scores of a row stay on chip and are exact integers, so the order in which a row
meets the keys cannot change them: the reordered schedule must give bit for bit the result of the
plain one. :func:`scores_reordered` simulates the schedule step by step (and reports the beats it
loads); :func:`scores_plain` is the reference order; :func:`attention` runs the whole head,
scores -> requantise -> :func:`~.units.softmax_full` -> P.V -> requantise, with either schedule.
The requantisations are the MATMUL epilogue (:func:`~.units.epilogue`, no bias, no activation),
so :func:`attention` equals the ISA program MATMUL(b_trans) -> SOFTMAX(FULL) -> MATMUL.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import units
from .numerics import Sat

__all__ = ["ReorderedScores", "scores_plain", "scores_reordered", "attention", "SCHEDULES"]

SCHEDULES = ("plain", "reordered")


class ReorderedScores(NamedTuple):
    """Result of :func:`scores_reordered`.

    ``scores`` [M, N] int64; ``k_beats`` / ``q_beats`` [steps]: K rows and Q rows loaded at each
    step; ``key_order`` [M, N]: the key indices in the order row i met them; ``slots``: the
    number of slots actually used (``min(P, N)``).
    """
    scores: np.ndarray
    k_beats: np.ndarray
    q_beats: np.ndarray
    key_order: np.ndarray
    slots: int


def _int_matrix(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array, not shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, not {a.dtype}")
    return a.astype(np.int64)


def _check_qk(q, k):
    q = _int_matrix(q, "q")
    k = _int_matrix(k, "k")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"q has rows of {q.shape[1]} elements, k of {k.shape[1]}")
    if k.shape[0] < 1:
        raise ValueError("k needs at least one key row")
    return q, k


def scores_plain(q, k) -> np.ndarray:
    """Exact integer scores ``q . k^T`` [M, N] in the plain order (row by row, keys ascending)."""
    q, k = _check_qk(q, k)
    return q @ k.T          # int64 arithmetic: exact for 16-bit words and any practical d


def scores_reordered(q, k, P: int) -> ReorderedScores:
    """Exact integer scores ``q . k^T`` computed by the staggered Edge-MoE schedule.

    Step ``t`` puts key ``t mod N`` on the bus (one K beat). Slot ``o`` loads its next query row
    (one Q beat) at a step whose key index is ``o``; rows go to slots in order, row ``r`` to slot
    ``r mod P``. Each active slot adds the product of its row with the key on the bus; after N
    steps its row is complete and, since the key index is then ``o`` again, it loads the next
    row at once. A slot ``o >= N`` would never see key index ``o``, so at most ``N`` slots are
    used (``slots = min(P, N)``).
    """
    q, k = _check_qk(q, k)
    if isinstance(P, bool) or not isinstance(P, (int, np.integer)) or P < 1:
        raise ValueError(f"P must be a positive integer, not {P!r}")
    m, n = q.shape[0], k.shape[0]
    slots = min(int(P), n)
    scores = np.zeros((m, n), dtype=np.int64)
    key_order = np.full((m, n), -1, dtype=np.int64)
    row_of = [-1] * slots        # the query row each slot holds (-1: idle)
    seen = [0] * slots           # keys the slot's row has met so far
    qreg = np.zeros((slots, q.shape[1]), dtype=np.int64)   # the slots' query registers
    next_row = 0
    k_beats, q_beats = [], []
    t = 0
    while next_row < m or any(r >= 0 for r in row_of):
        kk = t % n
        key = k[kk].copy()                       # one K beat
        qb = 0
        if kk < slots and row_of[kk] < 0 and next_row < m:
            row_of[kk] = next_row                # one Q beat
            qreg[kk] = q[next_row]
            seen[kk] = 0
            next_row += 1
            qb = 1
        for o in range(slots):
            r = row_of[o]
            if r < 0:
                continue
            scores[r, kk] = int(np.dot(qreg[o], key))
            key_order[r, seen[o]] = kk
            seen[o] += 1
            if seen[o] == n:
                row_of[o] = -1
        k_beats.append(1)
        q_beats.append(qb)
        t += 1
    return ReorderedScores(scores, np.array(k_beats, dtype=np.int64),
                           np.array(q_beats, dtype=np.int64), key_order, slots)


def attention(q, k, v, config, *, score_mult: int, score_shift: int, sm_mult: int,
              sm_shift: int, out_mult: int, out_shift: int, schedule: str = "plain",
              P: int = 4, causal: bool = False, q_pos: int = 0, sat: Sat | None = None
              ) -> np.ndarray:
    """One attention head on integer ``q`` [M, d], ``k`` [N, d], ``v`` [N, dv].

    scores (``schedule``) -> ``sat(rnd(S * score_mult >> score_shift))`` -> softmax_full with
    ``sm_mult``/``sm_shift`` (masking key j of row i when ``causal`` and ``j > q_pos + i``) ->
    exact P.V -> ``sat(rnd(. * out_mult >> out_shift))``. Returns the activations [M, dv].
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, not {schedule!r}")
    q, k = _check_qk(q, k)
    v = _int_matrix(v, "v")
    if v.shape[0] != k.shape[0]:
        raise ValueError(f"v has {v.shape[0]} rows, k has {k.shape[0]}")
    sat = Sat() if sat is None else sat
    m, n = q.shape[0], k.shape[0]
    if schedule == "plain":
        s = scores_plain(q, k)
    else:
        s = scores_reordered(q, k, P).scores
    zero_n = np.zeros(n, dtype=np.int64)
    s16 = units.epilogue(s, config, sat, bias=zero_n, mult=np.full(n, score_mult, np.int64),
                         shift=np.full(n, score_shift, np.int64), act="none")
    if causal:
        valid = np.arange(n)[None, :] <= (q_pos + np.arange(m))[:, None]
    else:
        valid = np.ones((m, n), dtype=bool)
    p = units.softmax_full(s16, valid, sm_mult, sm_shift, config, sat)
    pv = units.matmul_exact(p, v)
    dv = v.shape[1]
    return units.epilogue(pv, config, sat, bias=np.zeros(dv, dtype=np.int64),
                          mult=np.full(dv, out_mult, np.int64),
                          shift=np.full(dv, out_shift, np.int64), act="none")
