"""Benchmarks: ``python -m bench {iris,images,bridge,coldstart,all}`` (``make bench``; never part of ``make test``).

Each benchmark starts what it measures on loopback, warms up, drives it from a separate
load-generating process, prints a table (throughput, p50/p99 latency, ratio to a baseline
measured in the same run) and writes JSON to ``bench/results/``. ``bench/RESULTS.md``
holds the latest figures and what they mean.
"""
