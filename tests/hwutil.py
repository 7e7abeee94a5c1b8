"""Shared helpers for Amaranth simulator tests of vitamin's gateware.

``stream_put`` and ``stream_get`` follow the helpers of Amaranth's stream documentation, plus
optional random idle/stall cycles so that every stream is exercised with backpressure: a source
inserts idle cycles before asserting ``valid`` (and then holds ``valid`` until the transfer, as the
stream rules require), a sink keeps ``ready`` low for random cycles before accepting.
"""

import random

from amaranth.sim import Simulator

__all__ = ["stream_put", "stream_get", "run_sim", "make_rng"]


async def _random_wait(ctx, rng, p):
    # Geometric number of idle cycles: mean p / (1 - p).
    if rng is not None:
        while rng.random() < p:
            await ctx.tick()


async def stream_put(ctx, stream, payload, *, rng=None, p_idle=0.0):
    """Send one ``payload`` on ``stream``; returns after the clock edge of the transfer.

    Parameters
    ----------
    ctx : amaranth.sim.SimulatorContext
    stream : amaranth.lib.stream.Interface
        The DUT's input stream (driven by the testbench).
    payload : object
        Anything ``ctx.set`` accepts for the payload shape (an int, a dict for a struct, a list
        for an array).
    rng : random.Random, optional
        Source of idle cycles; none if omitted.
    p_idle : float
        Probability of inserting one more idle cycle before asserting ``valid``.
    """
    await _random_wait(ctx, rng, p_idle)
    ctx.set(stream.payload, payload)
    ctx.set(stream.valid, 1)
    # A loop of plain ticks rather than `ctx.tick().until()`: when another testbench fails, the
    # simulator abandons this one, and an abandoned `until()` raises again on garbage collection
    # ("aclose(): asynchronous generator is already running"), burying the real failure.
    while True:
        _, _, ready = await ctx.tick().sample(stream.ready)
        if ready:
            break
    ctx.set(stream.valid, 0)


async def stream_get(ctx, stream, *, rng=None, p_stall=0.0):
    """Receive one payload from ``stream``; returns it as ``ctx.get`` would.

    Parameters
    ----------
    ctx : amaranth.sim.SimulatorContext
    stream : amaranth.lib.stream.Interface
        The DUT's output stream (the testbench drives ``ready``).
    rng : random.Random, optional
        Source of stall cycles; none if omitted.
    p_stall : float
        Probability of holding ``ready`` low for one more cycle before accepting.
    """
    await _random_wait(ctx, rng, p_stall)
    ctx.set(stream.ready, 1)
    while True:  # not `.until()`, see stream_put
        _, _, valid, payload = await ctx.tick().sample(stream.valid, stream.payload)
        if valid:
            break
    ctx.set(stream.ready, 0)
    return payload


def run_sim(dut, *testbenches, processes=(), deadline_cycles=None, vcd=None):
    """Simulate ``dut`` on a 1 MHz ``sync`` clock with the given async testbenches.

    Parameters
    ----------
    dut : amaranth.hdl.Elaboratable
    *testbenches : async callables taking ``ctx``
        Critical testbenches: the simulation ends when all of them return.
    processes : iterable of async callables
        Background testbenches (e.g. free-running monitors).
    deadline_cycles : int, optional
        Fail if the testbenches have not finished after this many cycles (a hung handshake
        would otherwise hang the test).
    vcd : str, optional
        Write a waveform file for debugging.
    """
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    for tb in testbenches:
        sim.add_testbench(tb)
    for tb in processes:
        sim.add_testbench(tb, background=True)
    if deadline_cycles is not None:
        async def watchdog(ctx):
            # A plain loop rather than `ctx.tick().repeat()`: this testbench is abandoned when
            # the others finish (see stream_put).
            for _ in range(deadline_cycles):
                await ctx.tick()
            raise AssertionError(f"testbenches did not finish within {deadline_cycles} cycles")
        sim.add_testbench(watchdog, background=True)
    if vcd is not None:
        with sim.write_vcd(vcd):
            sim.run()
    else:
        sim.run()


def make_rng(seed):
    """A seeded ``random.Random``."""
    return random.Random(seed)
