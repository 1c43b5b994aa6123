"""Benchmarks: relax vs torch DDP on an emulated cluster network, and the cost of SPRM scoring."""
