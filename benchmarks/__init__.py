"""Benchmarks: accuracy of each variant, HTTP load generator, memory probes, hot-swap timing,
the naive baseline server, the Markdown/PNG report and the end-to-end offline demo.

Every experiment writes one result document carrying its settings, the command line and the
machine it ran on (see `benchmarks.experiment`); the report reads only those files.
"""
