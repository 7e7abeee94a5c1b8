"""Bit-exact NumPy models of every vitamin instruction, and the ISA simulator (the spec)."""
