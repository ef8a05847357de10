"""Benchmarks of the gateway on loopback: `python -m bench.run`, described in BENCHMARKS.md."""
