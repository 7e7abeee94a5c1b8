"""Amaranth gateware of the vitamin accelerator."""
