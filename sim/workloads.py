"""Hand-built workloads for measuring the accelerator (tests and ``make bench``).

:func:`long_matmul` is the "long matmul program" of the DMA/compute overlap goal: ``Y = A . W``
with ``A`` (``M x k``) resident in the scratchpad and the weights streamed from DRAM in column
tiles of ``nt`` columns through two scratchpad buffers, ordered with dependency tokens the way
``compiler/lower.py`` double-buffers weights:

* LOAD module: ``A`` row block 0, weight tiles 0 and 1, then each later tile after the MATMUL
  that used its buffer (``pop_next``); the next ``A`` row block is loaded while the current one
  computes. Every LOAD pushes a token to COMPUTE.
* COMPUTE module: per row block a MARK that takes the block's ``A`` token, then one MATMUL per
  weight tile (``pop_prev`` its tile, ``push_prev`` its buffer free, ``push_next`` its output
  ready). Outputs go to distinct scratchpad rows, so no buffer waits for a STORE.
* STORE module: one STORE per MATMUL output tile (``pop_prev``).

The scratchpad has one read port, which the MATMUL unit uses in every slot, so a STORE reads
mostly between MATMULs and at the end: the exposed time is the first ``A`` block and weight tile,
and the output drain (about ``1/k`` of the compute per output element read). The first row
block is small so that little of ``A`` is loaded before the first MATMUL starts.
"""

from __future__ import annotations

import numpy as np

from vitamin.asm import Assembler
from vitamin.config import get_config
from vitamin.isa import AccIn, Act, DType, OutMode

__all__ = ["long_matmul", "LONG_MATMUL_SHAPES"]

#: Per preset: row blocks of A, k, weight-tile columns, tiles per row block (at most 14 MATMULs
#: in all, so that unconsumed COMPUTE->STORE tokens stay below ``token_depth``).
LONG_MATMUL_SHAPES = {
    "tiny": dict(blocks=(8, 56), k=96, nt=16, tiles=4),
    "ecp5": dict(blocks=(32, 160), k=192, nt=32, tiles=4),
    "zcu102": dict(blocks=(64, 576), k=896, nt=64, tiles=7),
}


def long_matmul(config, blocks=None, k=None, nt=None, tiles=None, seed=0):
    """``(program, inputs)`` of the long matmul workload (see the module docstring).

    Defaults come from :data:`LONG_MATMUL_SHAPES` for the preset's name. Inputs: ``a``
    (``M x k`` int8), ``w`` (``tiles x k x nt`` int8, tile-major); output ``y`` (``M x n``
    int8, ``n = tiles * nt``), requantised by ``2^-10``.
    """
    cfg = get_config(config)
    shape = dict(LONG_MATMUL_SHAPES.get(cfg.name, LONG_MATMUL_SHAPES["tiny"]))
    for key, val in (("blocks", blocks), ("k", k), ("nt", nt), ("tiles", tiles)):
        if val is not None:
            shape[key] = val
    blocks, k, nt, tiles = tuple(shape["blocks"]), shape["k"], shape["nt"], shape["tiles"]
    M = sum(blocks)
    n = tiles * nt
    a_base, w_base = 0, M * k
    out_base = w_base + 2 * k * nt
    if out_base + M * n > cfg.spad_words:
        raise ValueError(f"long_matmul: {out_base + M * n} scratchpad words needed, "
                         f"{cfg.spad_words} available")
    if len(blocks) * tiles > min(cfg.token_depth, cfg.cmd_depth) - 2 or tiles < 3:
        raise ValueError("long_matmul: too many MATMULs for the token and command queues")
    asm = Assembler(cfg)
    a = asm.tensor("a", "input", (M, k), "i8")
    w = asm.tensor("w", "input", (tiles, k, nt), "i8")
    y = asm.tensor("y", "output", (M, n), "i8")

    steps = [(b, t) for b in range(len(blocks)) for t in range(tiles)]
    first_step = {b: b * tiles for b in range(len(blocks))}
    # LOAD push order: A block 0, weight tiles 0 and 1, then each later weight tile preceded by
    # a chunk of the next A block (the chunks of block b+1 spread over block b's tiles)
    order = [("A", 0, 0, blocks[0]), ("W", 0), ("W", 1)][:2 + (len(steps) > 1)]
    for s_ in range(2, len(steps)):
        b_ = steps[s_][0]
        nxt = b_ + 1 if steps[s_][1] < tiles - 1 or b_ + 1 < len(blocks) else None
        order.append(("W", s_))
        del nxt
    # chunks: block b >= 1 in `chunks` parts, inserted before the weight tiles of block b - 1
    chunks = max(1, tiles - 2)
    for b in range(1, len(blocks)):
        rows = blocks[b]
        parts = [(rows * i // chunks, rows * (i + 1) // chunks) for i in range(chunks)]
        slots = [i for i, e in enumerate(order) if e[0] == "W" and
                 first_step[b - 1] + 2 <= e[1] < first_step[b] + 2]
        if len(slots) < chunks:
            raise ValueError("long_matmul: not enough tiles per block to hide the A loads")
        for i, (lo, hi) in reversed(list(enumerate(parts))):
            order.insert(slots[i], ("A", b, lo, hi))

    def emit_load(e):
        if e[0] == "A":
            _, b, lo, hi = e
            r0 = sum(blocks[:b]) + lo
            asm.load(dram_addr=a + r0 * k, spad_addr=a_base + r0 * k, run=k, n0=hi - lo,
                     ds0=k, ss0=k, dtype=DType.I8, push_next=1)
        else:
            s_ = e[1]
            t = steps[s_][1]
            asm.load(dram_addr=w + t * k * nt, spad_addr=w_base + (s_ % 2) * k * nt,
                     run=k * nt, dtype=DType.I8, push_next=1, pop_next=int(s_ >= 2))

    def emit_compute(e):
        if e[0] == "A":
            asm.mark(e[1], pop_prev=1)          # a chunk of A block e[1] is in
            return
        s_ = e[1]
        b, t = steps[s_]
        r0 = sum(blocks[:b])
        asm.matmul(m=blocks[b], k=k, n=nt, a_addr=a_base + r0 * k, a_stride=k,
                   b_addr=w_base + (s_ % 2) * k * nt, b_stride=nt, acc_addr=0,
                   out_addr=out_base + r0 * n + t * nt, out_stride=n, out=OutMode.SPAD,
                   acc_in=AccIn.ZERO, act=Act.NONE, mult=1, shift=10,
                   pop_prev=1, push_prev=int(s_ + 2 < len(steps)), push_next=1)
        asm.store(dram_addr=y + r0 * n + t * nt, spad_addr=out_base + r0 * n + t * nt,
                  run=nt, n0=blocks[b], ds0=n, ss0=n, dtype=DType.I8, pop_prev=1)

    # program order: a LOAD as early as its buffer token allows, compute in push order
    li = ci = 0
    mm_done = set()
    while ci < len(order):
        if li < len(order) and (order[li][0] == "A" or order[li][1] < 2 or
                                order[li][1] - 2 in mm_done):
            emit_load(order[li])
            li += 1
        else:
            assert ci < li
            emit_compute(order[ci])
            if order[ci][0] == "W":
                mm_done.add(order[ci][1])
            ci += 1
    asm.end()
    prog = asm.link()
    rng = np.random.default_rng(seed)
    inputs = {"a": rng.integers(-128, 128, (M, k)), "w": rng.integers(-128, 128, (tiles, k, nt))}
    return prog, inputs
