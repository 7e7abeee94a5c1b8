"""cocotb + Verilator harness and the RTL backend."""
