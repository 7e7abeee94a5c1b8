"""Board platforms, top levels and bitstream flows."""
