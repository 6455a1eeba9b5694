"""Generated gRPC contract (python -m llmesh.protos). Do not edit."""
