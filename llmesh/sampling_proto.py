"""Conversions between the contract's SamplingParams / Priority and the engine's.

Torch-free: the gateway validates with the engine's SamplingParams before any engine
work, and the engine builds the same object from the same message.
"""

from __future__ import annotations

from llmesh.engine.request import Priority
from llmesh.engine.sampling_params import SamplingParams
from llmesh.engine.structured_output.spec import StructuredOutputSpec
from llmesh.v1 import common_pb2

_OPTIONAL = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
             "presence_penalty", "frequency_penalty", "seed", "logprobs", "min_tokens", "n",
             "prompt_logprobs", "speculative")


def sampling_from_proto(msg: common_pb2.SamplingParams, *, default_max_tokens: int | None = None) -> SamplingParams:
    """Build (and so validate) SamplingParams; raises InvalidRequestError naming the field."""
    kw = {name: getattr(msg, name) for name in _OPTIONAL if msg.HasField(name)}
    if "max_tokens" not in kw and default_max_tokens is not None:
        kw["max_tokens"] = default_max_tokens
    return SamplingParams(
        **kw,
        stop=list(msg.stop),
        stop_token_ids=list(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        skip_special_tokens=not msg.include_special_tokens,
        logit_bias={int(t): float(b) for t, b in msg.logit_bias.items()},
        structured_output=structured_output_from_proto(msg),
    )


def structured_output_from_proto(msg: common_pb2.SamplingParams) -> StructuredOutputSpec | None:
    """The ``structured_output`` oneof as a spec (None when unset); raises InvalidRequestError."""
    kind = msg.WhichOneof("structured_output")
    if kind is None:
        return None
    if kind == "json_object":
        return StructuredOutputSpec("json_object") if msg.json_object else None
    if kind == "choice":
        return StructuredOutputSpec("choice", choices=tuple(msg.choice.values))
    return StructuredOutputSpec(kind, getattr(msg, kind))


def structured_output_to_proto(spec: StructuredOutputSpec | None, msg: common_pb2.SamplingParams) -> None:
    """Set ``msg``'s structured_output oneof from ``spec`` (clears it for None)."""
    msg.ClearField("structured_output")
    if spec is None:
        return
    if spec.kind == "json_object":
        msg.json_object = True
    elif spec.kind == "choice":
        msg.choice.values.extend(spec.choices)
    else:
        setattr(msg, spec.kind, spec.value)


def priority_from_proto(value: int) -> int:
    return Priority.BATCH if value == common_pb2.PRIORITY_BATCH else Priority.INTERACTIVE


FINISH_REASONS = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
    "error": common_pb2.FINISH_REASON_ERROR,
}
