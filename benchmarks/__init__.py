"""Benchmarks: accuracy of each variant, HTTP load generator, memory probes, hot-swap timing,
the naive baseline server, the Markdown/PNG report and the end-to-end offline demo.

Every command writes one results JSON carrying the command line and the machine it ran on
(see `benchmarks.common.write_results`); the report reads only those files.
"""
