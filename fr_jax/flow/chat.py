"""Chat completions from any OpenAI-compatible endpoint: the designer of the refinement loop (a teacher such as
DeepSeek-R1, or fr_jax.serve) and the worker prompted directly in the evaluation baseline.

Reasoning models return their reasoning either in a separate field (`reasoning_content`, as DeepSeek's API and the
reasoning parsers of vLLM and SGLang do, or `reasoning`) or inline as a <think> block; `ChatReply.reasoning` is
whichever was given. Transport errors, 429 and 5xx are retried with exponential backoff; any other error status
raises at once with the endpoint's message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from typing import Any

import httpx

from fr_jax.config import ConfigError


class ChatError(RuntimeError):
    """The endpoint could not give an answer (unreachable, refused the request, malformed reply)."""


@dataclasses.dataclass(frozen=True)
class ChatReply:
    content: str  # the message content as sent (it may hold a <think> block)
    reasoning: str  # the separate reasoning field, else the content's <think> block, else ""
    prompt_tokens: int | None  # None: the endpoint reported no usage
    completion_tokens: int | None
    finish_reason: str | None
    latency_s: float


def split_reasoning(content: str, reasoning_field: str | None) -> str:
    """The reasoning of an answer: the API's separate field if given, else the answer's <think> block (all of it
    when the block was never closed)."""
    if reasoning_field:
        return reasoning_field
    if "</think>" in content:
        return content.rsplit("</think>", 1)[0].split("<think>", 1)[-1]
    return content.split("<think>", 1)[1] if "<think>" in content else ""


class ChatClient:
    """POST {url}/chat/completions; `api_key_env` names the variable holding a bearer token, if any."""

    def __init__(
        self,
        url: str,
        *,
        model: str | None = None,
        api_key_env: str | None = None,
        timeout_s: float = 600.0,
        max_retries: int = 3,
        backoff_s: float = 2.0,
    ):
        self.url, self.model, self.max_retries, self.backoff_s = url.rstrip("/"), model, max_retries, backoff_s
        headers = {}
        if api_key_env:
            if not os.environ.get(api_key_env):
                raise ConfigError(
                    f"api_key_env: the environment variable {api_key_env} is not set (needed by {self.url})"
                )
            headers["Authorization"] = f"Bearer {os.environ[api_key_env]}"
        self._http = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout_s, connect=30.0))

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def complete(
        self,
        messages: list[dict[str, str]],
        *,
        temperature: float,
        top_p: float = 1.0,
        max_tokens: int,
        seed: int | None = None,
    ) -> ChatReply:
        body: dict[str, Any] = {
            "messages": messages,
            "temperature": temperature,
            "top_p": top_p,
            "max_tokens": max_tokens,
        }
        if self.model:
            body["model"] = self.model
        if seed is not None:
            body["seed"] = seed
        problem = "no attempt"
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            started = time.perf_counter()
            try:
                response = await self._http.post(f"{self.url}/chat/completions", json=body)
            except httpx.TransportError as err:
                problem = f"{type(err).__name__}: {err}"
                continue
            if response.status_code == 429 or response.status_code >= 500:
                problem = f"HTTP {response.status_code}: {response.text[:500]}"
                continue
            if response.status_code != 200:
                raise ChatError(f"{self.url} refused the request: HTTP {response.status_code}: {response.text[:1000]}")
            return self._reply(response, time.perf_counter() - started)
        raise ChatError(f"{self.url} gave no answer after {self.max_retries + 1} attempts (last: {problem})")

    def _reply(self, response: httpx.Response, latency_s: float) -> ChatReply:
        try:
            document = response.json()
            choice = document["choices"][0]
            message = choice["message"]
            content = message.get("content") or ""
            usage = document.get("usage") or {}
            reasoning = split_reasoning(content, message.get("reasoning_content") or message.get("reasoning"))
            tokens = [int(usage[key]) if key in usage else None for key in ("prompt_tokens", "completion_tokens")]
            return ChatReply(content, reasoning, *tokens, choice.get("finish_reason"), latency_s)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as err:
            raise ChatError(
                f"{self.url} sent a reply without choices[0].message ({type(err).__name__}: {err}): "
                f"{response.text[:500]}"
            ) from None
