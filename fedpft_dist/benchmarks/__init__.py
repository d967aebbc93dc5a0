"""Benchmark drivers: each runs real commands and writes one JSON file."""
