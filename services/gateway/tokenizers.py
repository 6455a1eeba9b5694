"""Every served model's tokenizer, loaded once when the gateway starts.

The gateway tokenizes (and renders chat templates) itself so that requests reach the
router as token ids: the router hashes them for prefix-cache routing and the engine does
no text work on the hot path. Only tokenizers are read (``load_tokenizer``), never
weights, so the gateway needs neither torch nor the model files' tensors.

``TokenizerPool`` keeps large inputs off the event loop. Hugging Face's fast tokenizer
holds the GIL in ``encode``, so a thread pool leaves the loop stalled for the whole encode
(seconds for 1 MB), and ``encode_batch``, which releases it, still stalls the loop ~0.25 s
building the result; a process pool kept the loop's worst gap near 60 ms
(bench/tokenize_offload.py). So text over ``inline_bytes`` is tokenized in worker
processes (spawned, holding pickled copies of the tokenizers, at a lower CPU priority so
the event loop wins a busy core) and comes back as packed bytes, which unpickle in
microseconds; small inputs are tokenized inline, where a round trip would cost more than
the work.
"""

from __future__ import annotations

import array
import asyncio
import concurrent.futures
import dataclasses
import logging
import multiprocessing as mp
import os

from llmesh.engine.errors import InvalidRequestError
from llmesh.engine.text.loading import load_tokenizer
from llmesh.engine.text.tokenizer import Tokenizer
from llmesh.errors import unavailable
from llmesh.models_file import ModelsFile

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Tokenized:
    """Token ids of a text and their vocabulary strings."""

    token_ids: list[int]
    tokens: list[str]


class ModelTokenizers:
    """Model name → its tokenizer."""

    def __init__(self, tokenizers: dict[str, Tokenizer], unavailable: dict[str, str] | None = None) -> None:
        self._by_model = dict(tokenizers)
        self.unavailable = dict(unavailable or {})
        """Model name → why it cannot be served here (its files are missing)."""

    @classmethod
    def load(cls, models: ModelsFile) -> ModelTokenizers:
        """Load the tokenizer of every model whose files exist; a model whose path is missing
        is reported unavailable instead (a deployment may mount only some models, as compose
        does without its "large" profile). A path that exists but does not load fails fast."""
        loaded, unavailable = {}, {}
        for spec in models.models:
            path = spec.resolved_path()
            # "random:<arch>" models (benchmarks) have no files. (The loader's own constant
            # lives beside torch, which the gateway does not import.)
            if not path.startswith("random:") and not os.path.exists(path):
                unavailable[spec.name] = f"model {spec.name!r} is unavailable: its files are missing at {path}"
                log.warning("model unavailable", extra={"model": spec.name, "path": path,
                                                        "reason": "files missing"})
                continue
            loaded[spec.name] = load_tokenizer(path)
            log.info("tokenizer loaded", extra={"model": spec.name, "path": path,
                                                "vocab_size": loaded[spec.name].vocab_size})
        return cls(loaded, unavailable)

    @property
    def names(self) -> list[str]:
        return list(self._by_model)

    def get(self, model: str) -> Tokenizer | None:
        return self._by_model.get(model)

    def tokenize(self, model: str, text: str = "", messages: list[dict] | None = None,
                 add_special_tokens: bool = True) -> Tokenized:
        """Tokens of ``text``, or of ``messages`` rendered with the chat template."""
        tok = self._by_model.get(model)
        if tok is None:
            raise InvalidRequestError(f"no tokenizer loaded for model {model!r}", field="model")
        ids = tok.encode_chat(messages) if messages else tok.encode(text, add_special_tokens=add_special_tokens)
        return Tokenized(ids, [t if t is not None else "" for t in tok.convert_ids_to_tokens(ids)])


WORKER_NICENESS = 5
"""Added to the workers' niceness: the event loop streams tokens; tokenizing can wait a little."""

_worker_tokenizers: ModelTokenizers | None = None
"""In a worker process: the tokenizers handed over at start."""


def _init_worker(tokenizers: ModelTokenizers) -> None:
    global _worker_tokenizers
    _worker_tokenizers = tokenizers
    try:
        os.nice(WORKER_NICENESS)
    except OSError:
        pass  # not permitted here: the worker runs at the gateway's own priority


def _worker_ready() -> int:
    return os.getpid()


def _pack(ids: list[int]) -> bytes:
    return array.array("I", ids).tobytes()


def _unpack(data: bytes) -> list[int]:
    out = array.array("I")
    out.frombytes(data)
    return out.tolist()


def _encode_in_worker(model: str, text: str | None, messages: list[dict] | None,
                      tools: list[dict] | None = None) -> bytes:
    assert _worker_tokenizers is not None
    tok = _worker_tokenizers.get(model)
    assert tok is not None  # the caller checked the name against the same tokenizers
    return _pack(_encode_chat(tok, messages, tools) if messages is not None else tok.encode(text or ""))


def _encode_chat(tok: Tokenizer, messages: list[dict], tools: list[dict] | None) -> list[int]:
    """The template renders the tools only when there are some (tools=None and no tools
    differ in some templates)."""
    return tok.encode_chat(messages, tools=tools) if tools else tok.encode_chat(messages)


def _tokenize_in_worker(model: str, text: str, messages: list[dict] | None, add_special_tokens: bool
                        ) -> Tokenized:
    assert _worker_tokenizers is not None
    return _worker_tokenizers.tokenize(model, text, messages, add_special_tokens)


def input_bytes(text: str | None = None, messages: list[dict] | None = None) -> int:
    """Size of a prompt in UTF-8 bytes (chat: the messages' contents)."""
    if messages is not None:
        return sum(len((m.get("content") or "").encode("utf-8")) for m in messages)
    return len((text or "").encode("utf-8"))


class TokenizerPool:
    """Tokenizes on the event loop or in worker processes, by input size (see module doc)."""

    def __init__(self, tokenizers: ModelTokenizers, workers: int, inline_bytes: int) -> None:
        self.tokenizers = tokenizers
        self.workers = workers
        self.inline_bytes = inline_bytes
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def start(self) -> None:
        """Spawn the workers and wait until each holds the tokenizers (blocking: call it at
        startup, before serving, so no request pays for a worker's start)."""
        if self.workers <= 0:
            return
        self._pool = self._new_pool()
        # Submitted together, the calls find no idle worker and so start every one.
        for f in [self._pool.submit(_worker_ready) for _ in range(self.workers)]:
            f.result()

    def _new_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        # spawn: forking would copy the gateway's gRPC threads and their locks.
        return concurrent.futures.ProcessPoolExecutor(
            self.workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
            initargs=(self.tokenizers,))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _offloaded(self, nbytes: int) -> bool:
        return self._pool is not None and nbytes > self.inline_bytes

    async def _run(self, fn, *args):
        assert self._pool is not None
        pool = self._pool
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
        except concurrent.futures.process.BrokenProcessPool:
            # A worker died (killed, out of memory): this request fails, the next ones get
            # a fresh pool.
            if self._pool is pool:
                log.error("a tokenizer worker process died; starting new workers")
                pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()
            raise unavailable("the gateway's tokenizer worker process died while tokenizing this "
                              "request; retry it") from None

    async def encode(self, tok: Tokenizer, model: str, text: str) -> list[int]:
        """Prompt ids of ``text`` for ``model`` (``tok`` is its tokenizer)."""
        if not self._offloaded(input_bytes(text)):
            return tok.encode(text)
        return _unpack(await self._run(_encode_in_worker, model, text, None))

    async def encode_chat(self, tok: Tokenizer, model: str, messages: list[dict],
                          tools: list[dict] | None = None) -> list[int]:
        """Prompt ids of a conversation (and its tools) rendered with ``model``'s chat template."""
        if not self._offloaded(input_bytes(messages=messages)):
            return _encode_chat(tok, messages, tools)
        return _unpack(await self._run(_encode_in_worker, model, None, messages, tools))

    async def tokenize(self, model: str, text: str = "", messages: list[dict] | None = None,
                       add_special_tokens: bool = True) -> Tokenized:
        """``ModelTokenizers.tokenize`` (ids and their strings), off the loop when large."""
        if self.tokenizers.get(model) is None or not self._offloaded(input_bytes(text, messages)):
            return self.tokenizers.tokenize(model, text, messages, add_special_tokens)
        return await self._run(_tokenize_in_worker, model, text, messages, add_special_tokens)
