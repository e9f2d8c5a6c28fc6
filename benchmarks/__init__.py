"""Micro-benchmarks of lorafair's server-side aggregators (not part of the test run).

Run ``python -m benchmarks --help``. Every cell checks its result for correctness before it is
timed; see ``benchmarks/README.md`` for what each column means and the recorded tables.
"""
