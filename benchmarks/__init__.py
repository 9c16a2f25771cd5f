"""Benchmark harness for ``maxnorm_optim``: the projection against what a user would
run instead (``renorm_``, the corrected forum snippet eager and compiled, the read
floor), scaling sweeps, the sparse embedding step and full training steps.

Run ``python -m benchmarks`` (``--quick`` for the smoke run, ``--help`` for options).
"""
