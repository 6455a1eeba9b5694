"""``llmesh bench serve --backend openai``: the same load against any OpenAI-compatible server.

Streams ``POST {base_url}/completions`` (token-id prompts, which vLLM, SGLang and llmesh
all accept, so every server sees exactly the workload's prompt) or
``{base_url}/chat/completions`` (a text prompt of about the workload's length: chat takes
no token ids) over aiohttp, and times each SSE chunk that carries text — the same
TTFT/TPOT/ITL as the gRPC targets, so llmesh and another server are measured side by
side by one tool. Chunks count one token each; ``stream_options.include_usage`` gives the
true total, and tokens a server packed into fewer chunks are credited to the last chunk
(no extra arrival time), so TPOT stays exact while ITL stays per chunk.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp

from llmesh.bench.loadgen import SAME_CHUNK, Target
from llmesh.bench.workloads import RequestSpec
from llmesh.engine.errors import InvalidRequestError


class OpenAITarget(Target):
    """An OpenAI-compatible HTTP server (``base_url`` ends in ``/v1``)."""

    name = "openai"

    def __init__(self, base_url: str, model: str, endpoint: str = "completions", api_key: str | None = None) -> None:
        if endpoint not in ("completions", "chat"):
            raise InvalidRequestError(f"--openai-endpoint must be completions or chat, got {endpoint!r}",
                                      field="openai_endpoint")
        self.base_url, self.model, self.endpoint = base_url.rstrip("/"), model, endpoint
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        self._session = aiohttp.ClientSession(headers=self._headers,
                                              connector=aiohttp.TCPConnector(limit=0))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def resolve_model(self, timeout: float = 10.0) -> int:
        """Pin the model ("auto" takes the server's only one); returns its window (0 if unknown)."""
        async with self._session.get(f"{self.base_url}/models", timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            r.raise_for_status()
            models = (await r.json()).get("data", [])
        names = [m["id"] for m in models]
        if self.model == "auto":
            if len(names) != 1:
                raise InvalidRequestError(f"pick a model with --model: the server serves {', '.join(names)}",
                                          field="model")
            self.model = names[0]
        card = next((m for m in models if m["id"] == self.model), {})
        return int(card.get("max_model_len") or 0)

    def _body(self, spec: RequestSpec, ignore_eos: bool) -> tuple[str, dict]:
        body = {"model": self.model, "max_tokens": spec.max_tokens, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}}
        if ignore_eos:
            body["ignore_eos"] = True  # vLLM's, SGLang's and llmesh's extension
        if self.endpoint == "completions":
            return "completions", {**body, "prompt": spec.prompt_token_ids}
        # One short word per prompt token: about the workload's length in any tokenizer.
        text = " ".join(f"w{t % 97}" for t in spec.prompt_token_ids)
        return "chat/completions", {**body, "messages": [{"role": "user", "content": text}]}

    async def stream(self, spec: RequestSpec, ignore_eos: bool, timeout: float) -> AsyncIterator[tuple]:
        path, body = self._body(spec, ignore_eos)
        counted = 0
        async with self._session.post(f"{self.base_url}/{path}", json=body,
                                      timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            if r.status != 200:
                yield 0, f"HTTP_{r.status}", (await r.text())[:300]
                return
            async for line in r.content:
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    yield 0, "STREAM_ERROR", str(event["error"])[:300]
                    continue
                for choice in event.get("choices") or ():
                    text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                    if text:
                        counted += 1
                        yield 1, ""
                    if choice.get("finish_reason") in ("abort", "error"):
                        yield 0, f"FINISH_{choice['finish_reason'].upper()}"
                usage = event.get("usage")
                if usage and usage.get("completion_tokens", 0) > counted:
                    yield usage["completion_tokens"] - counted, "", SAME_CHUNK
