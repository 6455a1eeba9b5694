from llmesh.v1 import common_pb2 as _common_pb2
from llmesh.v1 import engine_pb2 as _engine_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RouterEmbedRequest(_message.Message):
    __slots__ = ("model", "request")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    model: str
    request: _engine_pb2.EngineEmbedRequest
    def __init__(self, model: _Optional[str] = ..., request: _Optional[_Union[_engine_pb2.EngineEmbedRequest, _Mapping]] = ...) -> None: ...

class RouteRequest(_message.Message):
    __slots__ = ("request_id", "model", "prompt_token_ids", "sampling", "priority", "cache_salt", "prompt_text", "prompt_token_ids_by_model", "tier")
    class PromptTokenIdsByModelEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: TokenIds
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[TokenIds, _Mapping]] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_BY_MODEL_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    priority: _common_pb2.Priority
    cache_salt: str
    prompt_text: str
    prompt_token_ids_by_model: _containers.MessageMap[str, TokenIds]
    tier: str
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., priority: _Optional[_Union[_common_pb2.Priority, str]] = ..., cache_salt: _Optional[str] = ..., prompt_text: _Optional[str] = ..., prompt_token_ids_by_model: _Optional[_Mapping[str, TokenIds]] = ..., tier: _Optional[str] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class RouterListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelCard(_message.Message):
    __slots__ = ("name", "size_class", "max_model_len", "healthy_replicas", "replicas", "generation_defaults", "has_chat_template")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_CLASS_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    HAS_CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    name: str
    size_class: str
    max_model_len: int
    healthy_replicas: int
    replicas: int
    generation_defaults: _common_pb2.SamplingParams
    has_chat_template: bool
    def __init__(self, name: _Optional[str] = ..., size_class: _Optional[str] = ..., max_model_len: _Optional[int] = ..., healthy_replicas: _Optional[int] = ..., replicas: _Optional[int] = ..., generation_defaults: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., has_chat_template: _Optional[bool] = ...) -> None: ...

class RouterListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelCard]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelCard, _Mapping]]] = ...) -> None: ...

class RouteCandidate(_message.Message):
    __slots__ = ("address", "replica")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    address: str
    replica: str
    def __init__(self, address: _Optional[str] = ..., replica: _Optional[str] = ...) -> None: ...

class RouteTarget(_message.Message):
    __slots__ = ("model", "reason", "candidates", "request", "matched_blocks", "pick_reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    MATCHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PICK_REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    reason: str
    candidates: _containers.RepeatedCompositeFieldContainer[RouteCandidate]
    request: _engine_pb2.EngineGenerateRequest
    matched_blocks: int
    pick_reason: str
    def __init__(self, model: _Optional[str] = ..., reason: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[RouteCandidate, _Mapping]]] = ..., request: _Optional[_Union[_engine_pb2.EngineGenerateRequest, _Mapping]] = ..., matched_blocks: _Optional[int] = ..., pick_reason: _Optional[str] = ...) -> None: ...

class EscalationPlan(_message.Message):
    __slots__ = ("large", "tokens", "threshold", "strip_logprobs")
    LARGE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    STRIP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    large: RouteTarget
    tokens: int
    threshold: float
    strip_logprobs: bool
    def __init__(self, large: _Optional[_Union[RouteTarget, _Mapping]] = ..., tokens: _Optional[int] = ..., threshold: _Optional[float] = ..., strip_logprobs: _Optional[bool] = ...) -> None: ...

class RouteDecision(_message.Message):
    __slots__ = ("target", "escalation", "max_failovers", "reuse_ms")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    ESCALATION_FIELD_NUMBER: _ClassVar[int]
    MAX_FAILOVERS_FIELD_NUMBER: _ClassVar[int]
    REUSE_MS_FIELD_NUMBER: _ClassVar[int]
    target: RouteTarget
    escalation: EscalationPlan
    max_failovers: int
    reuse_ms: int
    def __init__(self, target: _Optional[_Union[RouteTarget, _Mapping]] = ..., escalation: _Optional[_Union[EscalationPlan, _Mapping]] = ..., max_failovers: _Optional[int] = ..., reuse_ms: _Optional[int] = ...) -> None: ...
