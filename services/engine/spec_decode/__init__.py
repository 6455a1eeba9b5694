"""Speculative decoding: proposers guess the next tokens cheaply, the target model checks
them all in one forward pass, and rejection sampling keeps the target's distribution."""

from llmesh.engine.spec_decode.proposer import Proposer, build_proposer

__all__ = ["Proposer", "build_proposer"]
