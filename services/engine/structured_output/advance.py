"""Advancing constrained requests' matchers past the tokens a step gave them."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from llmesh.engine.request import FinishReason, Request
from llmesh.engine.scheduler import Scheduler

log = logging.getLogger(__name__)


def advance_grammars(scheduler: Scheduler, updated: Sequence[Request], new_tokens: Mapping[str, list[int]]) -> None:
    """Advance each constrained request's matcher past the tokens it just received; a
    request whose grammar is complete finishes with STOP."""
    for req in updated:
        if req.grammar is None or req.is_finished:
            continue
        for token in new_tokens[req.request_id]:
            if not req.grammar.accept(token):
                # The mask allowed only tokens the grammar accepts: this is an engine bug.
                log.error("grammar refused a sampled token", extra={"request_id": req.request_id, "token": token})
                scheduler.finish_request(req.request_id, FinishReason.ERROR)
                break
            if req.grammar.terminated:
                scheduler.finish_request(req.request_id, FinishReason.STOP)
                break
