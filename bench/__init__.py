"""Benchmarks of longctx's kernels, training and communication; results in bench/results/*.json."""
