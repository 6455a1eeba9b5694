"""``llmesh bench``: serving load generator, offline throughput, mesh overhead, plots.

workloads  the requests a run sends (synthetic, shared prefix, chat-like mix), seeded
loadgen    streams them over gRPC to a gateway or one engine (Poisson rate or concurrency)
offline    runs them through an in-process engine
metrics    per-request timings → TTFT / TPOT / ITL / e2e percentiles, throughput, goodput
overhead   one workload straight to an engine and through gateway + router, compared
report     text tables and ``bench compare``; plots: PNG latency CDFs and rate sweeps
"""
