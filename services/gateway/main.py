"""``python -m llmesh.gateway.main``: run the public Inference API.

    python -m llmesh.gateway.main --models-file models.yaml --router 127.0.0.1:50052
"""

from __future__ import annotations

import asyncio
import sys

import grpc

from llmesh.config import load_config
from llmesh.engine.errors import EngineError
from llmesh.gateway.catalog import ModelCatalog
from llmesh.gateway.config import GatewayConfig
from llmesh.gateway.servicer import InferenceServicer, add_to_server
from llmesh.gateway.tokenizers import ModelTokenizers
from llmesh.grpc_server import GrpcServer, run_async
from llmesh.logs import setup_logging
from llmesh.models_file import ModelsFileError, load_models_file
from llmesh.telemetry import client_interceptors
from llmesh.v1 import router_pb2_grpc


async def serve(config: GatewayConfig, tokenizers: ModelTokenizers) -> None:
    channel = grpc.aio.insecure_channel(
        config.router, interceptors=client_interceptors(),
        options=[("grpc.max_receive_message_length", 64 << 20)])
    router = router_pb2_grpc.RouterStub(channel)
    catalog = ModelCatalog(router, config.router, config.models_refresh_s)
    servicer = InferenceServicer(config, tokenizers, catalog, router)
    refresher: asyncio.Task | None = None

    def register(server: grpc.aio.Server) -> list[str]:
        return [add_to_server(servicer, server)]

    async def on_shutdown() -> None:
        if refresher is not None:
            refresher.cancel()
        await channel.close()

    server = GrpcServer("gateway", config, register, on_shutdown)
    refresher = asyncio.create_task(catalog.run_refresh_loop())
    await server.run()


def main(argv: list[str] | None = None) -> None:
    config = load_config(GatewayConfig, argv, service="gateway")
    setup_logging("gateway", config.log_level)
    try:
        tokenizers = ModelTokenizers.load(load_models_file(config.models_file))
    except (ModelsFileError, EngineError) as e:
        sys.exit(f"llmesh-gateway: {e}")
    run_async(lambda: serve(config, tokenizers))


if __name__ == "__main__":
    main()
