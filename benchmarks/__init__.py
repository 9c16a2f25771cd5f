"""Benchmark harness for ``maxnorm_optim`` (GitHub issue 4).

Run ``python -m benchmarks`` (``--quick`` for the < 1 minute smoke run); see
``docs/performance.md`` for the method and the committed results.
"""
