"""Per-request pooling parameters: what makes a Request an embedding request.

Kept free of torch (like sampling_params) so the front ends can build and check them.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmesh.engine.errors import InvalidRequestError

POOLING_MODES = ("last", "mean")


@dataclass(frozen=True)
class PoolingParams:
    """How an embedding request's final hidden states become its vector (docs/embeddings.md)."""

    mode: str
    """"last": the last prompt token's final hidden state (after the final norm);
    "mean": the mean of every prompt token's."""
    normalize: bool = False
    """L2-normalize the vector (after truncation to ``dimensions``)."""
    dimensions: int | None = None
    """Keep only the first ``dimensions`` values (Matryoshka models); None keeps them all."""

    def __post_init__(self) -> None:
        if self.mode not in POOLING_MODES:
            raise InvalidRequestError(f"pooling mode must be one of {', '.join(POOLING_MODES)}, "
                                      f"got {self.mode!r}", field="pooling")
        if self.dimensions is not None and (
                not isinstance(self.dimensions, int) or isinstance(self.dimensions, bool) or self.dimensions < 1):
            raise InvalidRequestError(f"dimensions must be an integer ≥ 1, got {self.dimensions!r}",
                                      field="dimensions")

    @property
    def reads_prefix_cache(self) -> bool:
        """Whether a cached prefix may be skipped. ``last`` needs only the last token's hidden
        state, which a prefix hit always recomputes; ``mean`` needs every token's, and a
        cached block keeps K/V, not hidden states, so a mean request computes its whole
        prompt (and still leaves its blocks to the prefix cache for later requests)."""
        return self.mode == "last"


def pooling_for_model(model: str, pooling: str, normalize: bool, matryoshka: bool, hidden_size: int,
                      dimensions: int | None = None) -> PoolingParams:
    """The PoolingParams of one embedding request to a model served with ``pooling``
    (EngineConfig.pooler); InvalidRequestError naming the model when it serves no
    embeddings or cannot give ``dimensions``."""
    if pooling == "none":
        raise InvalidRequestError(
            f"model {model!r} serves no embeddings: it runs without a pooling mode (set `pooling: last` "
            "or `pooling: mean` in its models-file `engine:` section)", field="model")
    if dimensions is not None:
        if not matryoshka:
            raise InvalidRequestError(
                f"model {model!r} does not support `dimensions`: its vectors cannot be shortened "
                "(only models trained for it, marked `matryoshka: true` in the models file, can)",
                field="dimensions")
        if not isinstance(dimensions, int) or isinstance(dimensions, bool) or not 1 <= dimensions <= hidden_size:
            raise InvalidRequestError(f"dimensions must be an integer in [1, {hidden_size}] for model {model!r}, "
                                      f"got {dimensions!r}", field="dimensions")
        if dimensions == hidden_size:
            dimensions = None
    return PoolingParams(mode=pooling, normalize=normalize, dimensions=dimensions)
