"""Benchmarks: each module runs as `.venv/bin/python -m benchmarks.NAME --help`; what they
measure and the results are in BENCHMARKS.md. Shared helpers come from testkit/.
"""
