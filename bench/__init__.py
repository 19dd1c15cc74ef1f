"""Benchmarks and the harnesses they share (``bench.netlink``: a shaped network link in a namespace)."""
