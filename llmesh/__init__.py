"""llmesh: a self-hosted LLM serving mesh over gRPC.

The top-level package holds what every service shares (the CLI, the prefix block hash,
config helpers). Service code lives in ``llmesh.engine`` (services/engine), and later
``llmesh.gateway``, ``llmesh.router`` and ``llmesh.prefix_cache``.
"""

__version__ = "0.1.0"
