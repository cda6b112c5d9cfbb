"""Throughput benchmarks of byol-tf: plain scripts, one JSON line per measurement.

Run each as `python -m benchmarks.<name> ...` (see `benchmarks/run_all.sh` for the full set
and `benchmarks/RESULTS.md` for the figures). Nothing here is imported by the library, and
no test asserts a timing: `tests/test_benchmarks.py` only runs each script's `--smoke` mode.
"""
