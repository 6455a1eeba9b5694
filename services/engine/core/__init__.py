"""The engine core (scheduler, model runner, KV cache) and its process boundary.

``engine_core.EngineCore`` is the synchronous core; ``messages`` holds what crosses the
boundary; ``core_proc`` runs a core in a child process and ``core_client`` talks to it.
"""
