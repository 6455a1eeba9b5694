"""The front end's first half: the tokenizer and turning a prompt into an EngineCoreRequest.

Runs where the caller is (the gRPC process, or the ``LLM`` caller's thread), so the core
only ever sees validated token ids.
"""

from __future__ import annotations

from llmesh.engine.core.messages import EngineCoreRequest
from llmesh.engine.errors import InvalidRequestError
from llmesh.engine.loader import LoadedModel
from llmesh.engine.pooling_params import PoolingParams
from llmesh.engine.request import Priority
from llmesh.engine.sampling_params import SamplingParams
from llmesh.engine.text.tokenizer import Tokenizer


class InputProcessor:
    def __init__(self, loaded: LoadedModel) -> None:
        src = loaded.tokenizer_source
        self.tokenizer = Tokenizer.from_hf_folder(src) if isinstance(src, str) else Tokenizer.from_gguf_data(src)
        self.model_config = loaded.config
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids) | frozenset(self.tokenizer.eos_token_ids)

    def process(self, prompt: str | list[int], params: SamplingParams | None, *, request_id: str,
                priority: int = Priority.INTERACTIVE, cache_salt: str | None = None,
                pooling: PoolingParams | None = None) -> EngineCoreRequest:
        """Tokenize and check a prompt; raises InvalidRequestError for one that cannot run.
        Checks that need the KV pool (window, blocks) are the core's, at admission.
        ``pooling`` makes it an embedding request (``params`` are then unused)."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = list(prompt)
            vocab = self.model_config.vocab_size
            bad = next((t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidRequestError(f"prompt token id {bad!r} is outside the vocabulary [0, {vocab})",
                                          field="prompt_token_ids")
        if not token_ids:
            raise InvalidRequestError("the prompt is empty", field="prompt")
        bad_bias = next((t for t in params.logit_bias if t >= self.model_config.vocab_size), None)
        if bad_bias is not None:
            raise InvalidRequestError(f"logit_bias token id {bad_bias} is outside the vocabulary "
                                      f"[0, {self.model_config.vocab_size})", field="logit_bias")
        if params.structured_output is not None:
            # A grammar that does not parse is the caller's error, refused here; the core
            # only compiles grammars that parse (see structured_output.grammar).
            from llmesh.engine.structured_output.grammar import build_grammar

            build_grammar(params.structured_output)
        return EngineCoreRequest(request_id=request_id, prompt_token_ids=token_ids, sampling_params=params,
                                 eos_token_ids=self.eos_token_ids, priority=int(priority), cache_salt=cache_salt,
                                 pooling=pooling)
