"""Sandboxed labs of network namespaces for `make demo`, the tests and the benchmarks."""
