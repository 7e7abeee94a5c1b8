"""Logic loads of the ECP5 global buffers, moved in front of the buffer (a netlist pass).

The ULX3S top puts the reset and the controller's START clear on global lines through DCCA
buffers (:func:`vitamin.boards.flow.ecp5_global_buffer`), for their thousands of flip-flop
set/reset pins. Yosys also uses the reset as a logic input in a few hundred places (reset
terms it put into LUTs: 356 LUT inputs, one PFUMX and one flip-flop data input on the whole
``ecp5`` design). nextpnr-ecp5 routes such loads in its one-run flow, but it could not route
a placement of the ULX3S top read back from JSON (``--no-place``, the second run of
``--timing-mhz``): "Failed to find a route for arc ... of net ...", within seconds (session 30).
With these loads taking the buffer's input (the register that drives it) instead, the same
read-back placement routes.

:func:`move_global_logic_loads` rewrites a parsed Yosys JSON netlist in place: every input of
a LUT4, PFUMX, L6MUX21 or CCU2C, and every flip-flop data input (``DI``), on a DCCA's output
net is connected to that DCCA's input net instead. Clock, set/reset and enable pins stay on
the global line.
"""

from __future__ import annotations

from .dspregs import _top

__all__ = ["LOGIC_CELLS", "move_global_logic_loads"]

#: Cell types whose every input is a logic input.
LOGIC_CELLS = frozenset({"LUT4", "PFUMX", "L6MUX21", "CCU2C"})
#: Logic inputs of other cells: (cell type, port).
LOGIC_PORTS = frozenset({("TRELLIS_FF", "DI")})


def move_global_logic_loads(netlist: dict) -> dict:
    """Rewrite ``netlist`` in place; returns ``{buffer cell: loads moved}`` for every DCCA
    (0 for a buffer with no logic loads)."""
    cells = _top(netlist)["cells"]
    bufs = {}
    for name, c in cells.items():
        if c["type"] != "DCCA":
            continue
        conn = c["connections"]
        if len(conn.get("CLKI", [])) != 1 or len(conn.get("CLKO", [])) != 1:
            raise ValueError(f"DCCA {name}: CLKI and CLKO must be one bit each")
        bufs[conn["CLKO"][0]] = (name, conn["CLKI"][0])
    moved = {name: 0 for name, _src in bufs.values()}
    if not bufs:
        return moved
    for c in cells.values():
        logic = c["type"] in LOGIC_CELLS
        for port, bits in c["connections"].items():
            if c.get("port_directions", {}).get(port) != "input":
                continue
            if not (logic or (c["type"], port) in LOGIC_PORTS):
                continue
            if not any(b in bufs for b in bits):
                continue
            new = []
            for b in bits:
                if b in bufs:
                    name, src = bufs[b]
                    moved[name] += 1
                    b = src
                new.append(b)
            c["connections"][port] = new
    return moved
