"""SGLang's native HTTP protocol (and the OpenAI-compatible subset) as pydantic models, field names exactly SGLang's.

Sources (SGLang, python/sglang/srt/): managers/io_struct.py GenerateReqInput and UpdateWeightFromDiskReqInput,
sampling/sampling_params.py SamplingParams, entrypoints/openai/protocol.py, the /generate output built in
managers/tokenizer_manager.py, the finish reasons of managers/schedule_batch.py, and entrypoints/http_server.py.
Both servers (real SGLang and fr_jax's engine) are spoken to with these models, and the client parses both
servers' answers with them.

Every field SGLang's requests define is accepted, so that what SGLang's own clients and sglang-router send works.
Each falls in one of three kinds:
- served: text, input_ids, sampling (temperature, top-k/p, min-p, stops, n, seeds), output log-probs, rid,
  streaming;
- ignored, with a note in the log the first time it carries a value: fields that change neither the generated
  tokens nor the fields of the answer (routing and session identity, priority, cache salts, logging and metrics
  switches, tracing; `model`, which sglang-router adds to every request it forwards);
- served only at their neutral value (refused with a message naming the field otherwise): everything that would
  change the output (images, LoRA, grammars, penalties, top or prompt log-probs, hidden states, PD
  disaggregation). Silently dropping those would return a different answer than the one asked for.
Names SGLang does not define are refused (a typo such as max_new_token is an error, not a default).
Request normalisation follows GenerateReqInput.normalize_batch_and_arguments: a single prompt with n > 1 becomes a
batch; a batch's answers come prompt-major (all n samples of prompt 0, then of prompt 1, ...), as the
tokenizer manager sends them.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_log = logging.getLogger(__name__)
_noted: set[tuple[str, str]] = set()

# --------------------------------------------------------------------------------------------- requests


def _screen(data: Any, *, where: str, neutral: dict[str, Any], ignored: frozenset[str]) -> Any:
    """Drop the ignored fields (noting a value the first time) and the unserved ones at their neutral value;
    refuse an unserved field with any other value."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for name in ignored & data.keys():
        value = data.pop(name)
        if value not in (None, False, "", [], {}) and (where, name) not in _noted:
            _noted.add((where, name))
            _log.info("%s: ignoring %s=%r (it changes nothing in fr_jax's answers)", where, name, value)
    for name, value in neutral.items():
        if name in data:
            given = data.pop(name)
            if given is not None and given != value:
                raise ValueError(
                    f"{name}={given!r} is not supported by the fr_jax engine (only {value!r}); "
                    "use a real SGLang server for it"
                )
    return data


# SamplingParams fields the engine does not serve, each with the neutral value it accepts
_SAMPLING_NEUTRAL = {
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_new_tokens": 0,
    "json_schema": None,
    "regex": None,
    "ebnf": None,
    "structural_tag": None,
    "stop_regex": None,
    "logit_bias": None,
}
# stream_interval: tokens between streamed chunks (fr_jax streams a decode chunk at a time);
# custom_params: read only by a custom logit processor, which is refused
_SAMPLING_IGNORED = frozenset({"stream_interval", "custom_params"})

_GENERATE_NEUTRAL = {
    "input_embeds": None,
    "image_data": None,
    "video_data": None,
    "audio_data": None,
    "mm_hashes": None,
    "mm_content_hashes": None,
    "use_audio_in_video": False,
    "video_config": None,
    "token_ids_logprob": None,
    "return_sampling_mask": False,
    "return_flat_raw_top_logprobs": False,
    "return_flat_raw_top_logprobs_b64": False,
    "return_hidden_states": False,
    "return_routed_experts": False,
    "routed_experts_start_len": 0,
    "return_indexer_topk": False,
    "modalities": None,
    "session_params": None,
    "lora_path": None,
    "lora_id": None,
    "custom_logit_processor": None,
    "positional_embed_overrides": None,
    "bootstrap_host": None,
    "bootstrap_port": None,
    "bootstrap_room": None,
    "bootstrap_pair_key": None,
    "decode_tp_size": None,
    "background": False,
    "require_reasoning": False,
    "max_thinking_tokens": None,
    "return_entropy": False,
    "return_prompt_token_ids": False,
    "need_wait_for_mm_inputs": None,
    "num_items_assigned": None,
    "encoder_urls": None,
    "max_dynamic_patch": None,
    "min_dynamic_patch": None,
    "image_max_dynamic_patch": None,
    "video_max_dynamic_patch": None,
    "images_config": None,
    "multi_item_delimiter_indices": None,
}
_GENERATE_IGNORED = frozenset(
    {
        "model",  # not a GenerateReqInput field: sglang-router adds it to what it forwards; SGLang drops it
        "session_id",
        "log_metrics",
        "routed_dp_rank",  # one data-parallel rank here
        "data_parallel_rank",
        "disagg_prefill_dp_rank",
        "kv_router_hint",
        "routing_key",
        "conversation_id",
        "http_worker_ipc",
        "priority",  # fr_jax's queue is fair across requests instead
        "extra_key",  # cache namespaces: the prefix cache is exact, so sharing it changes no output
        "cache_salt",
        "no_logs",  # fr_jax logs no request content
        "custom_labels",
        "return_bytes",  # image generation only
        "external_trace_header",
        "received_time",
    }
)

_OPENAI_NEUTRAL = {
    "logprobs": None,
    "top_logprobs": None,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "logit_bias": None,
    "response_format": None,
    "tools": None,
    "tool_choice": None,
    "echo": False,
    "best_of": None,
    "suffix": None,
    "repetition_penalty": 1.0,
    "min_tokens": 0,
    "regex": None,
    "ebnf": None,
    "json_schema": None,
    "stop_regex": None,
    "return_hidden_states": False,
    "return_routed_experts": False,
    "routed_experts_start_len": 0,
    "return_cached_tokens_details": False,
    "return_prompt_token_ids": False,
    "return_token_ids": False,
    "return_meta_info": False,
    "reasoning_effort": None,
    "task": None,
    "continue_final_message": False,
    "lora_path": None,
    "session_params": None,
    "custom_logit_processor": None,
    "images_config": None,
    "max_dynamic_patch": None,
    "min_dynamic_patch": None,
    "use_audio_in_video": False,
    "input_ids": None,
    "bootstrap_host": None,
    "bootstrap_port": None,
    "bootstrap_room": None,
}
_OPENAI_IGNORED = frozenset(
    {
        "user",
        "parallel_tool_calls",
        "separate_reasoning",
        "stream_reasoning",
        "custom_params",
        "session_id",
        "rid",
        "extra_key",
        "cache_salt",
        "ngram_corpus_id",
        "priority",
        "routed_dp_rank",
        "disagg_prefill_dp_rank",
        "data_parallel_rank",
        "custom_labels",
    }
)


class SamplingParams(BaseModel):
    """sampling_params of /generate: SGLang's names and defaults (None means "the default", as in SGLang)."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = 128  # None: up to the context length
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = -1  # -1: whole vocabulary
    min_p: float = 0.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = 1
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    sampling_seed: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _defaults_and_unsupported(cls, data: Any) -> Any:
        data = _screen(data, where="sampling_params", neutral=_SAMPLING_NEUTRAL, ignored=_SAMPLING_IGNORED)
        if isinstance(data, dict):
            # SGLang treats an explicit null as "use the default" for every field but max_new_tokens
            data = {k: v for k, v in data.items() if v is not None or k == "max_new_tokens"}
        return data

    @model_validator(mode="after")
    def _ranges(self) -> SamplingParams:
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be at least 0, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and self.temperature != float("inf")):
            raise ValueError(f"temperature must be a non-negative finite number, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (self.top_k == -1 or self.top_k >= 1):
            raise ValueError(f"top_k must be -1 (disable) or at least 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if self.stop is not None and any(s == "" for s in self.stop_strings):
            raise ValueError("stop strings must be non-empty")
        return self

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class GenerateReqInput(BaseModel):
    """POST /generate. Exactly one of text / input_ids; each a single prompt or a batch."""

    model_config = ConfigDict(extra="forbid")

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: SamplingParams | list[SamplingParams] | None = None
    return_logprob: bool | list[bool] | None = None
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    return_text_in_logprobs: bool = False
    stream: bool = False
    rid: str | list[str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        return _screen(data, where="/generate", neutral=_GENERATE_NEUTRAL, ignored=_GENERATE_IGNORED)

    @model_validator(mode="after")
    def _check(self) -> GenerateReqInput:
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("exactly one of text and input_ids must be given")
        if self.input_ids is not None and len(self.input_ids) == 0:
            raise ValueError("input_ids cannot be empty")
        for name in ("top_logprobs_num",):
            if any(v not in (None, 0) for v in _as_list(getattr(self, name))):
                raise ValueError(f"{name} > 0 is not supported by the fr_jax engine")
        if any(v not in (None, -1) for v in _as_list(self.logprob_start_len)):
            raise ValueError(
                "logprob_start_len >= 0 (prompt log-probs) is not supported by the fr_jax engine; "
                "use -1 (output tokens only)"
            )
        return self

    @property
    def is_single(self) -> bool:
        """One prompt (answered with one object) rather than a batch (answered with a list)."""
        prompt = self.text if self.text is not None else self.input_ids
        single_prompt = isinstance(prompt, str) or (bool(prompt) and isinstance(prompt[0], int))
        return single_prompt and self.parallel_sample_num == 1

    @property
    def parallel_sample_num(self) -> int:
        params = self.sampling_params
        if params is None:
            return 1
        if isinstance(params, SamplingParams):
            return params.n
        ns = {p.n for p in params}
        if len(ns) > 1:
            raise ValueError("The parallel_sample_num should be the same for all samples in sample params.")
        return ns.pop() if ns else 1

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list (text strings or id lists), before the n expansion."""
        prompt = self.text if self.text is not None else self.input_ids
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            return [prompt]
        return list(prompt)

    def per_prompt(self, name: str, default):
        """A per-prompt list of field `name` (a scalar applies to all prompts)."""
        count = len(self.prompts())
        value = getattr(self, name)
        if value is None:
            return [default] * count
        if not isinstance(value, list):
            return [value] * count
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} entries for {count} prompts")
        return value


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


class UpdateWeightFromDiskReqInput(BaseModel):
    """POST /update_weights_from_disk."""

    model_config = ConfigDict(extra="forbid")

    model_path: str
    load_format: str | None = None
    abort_all_requests: bool = False
    weight_version: str | None = None
    flush_cache: bool = True
    is_async: bool = False
    torch_empty_cache: bool = False
    keep_pause: bool = False
    recapture_cuda_graph: bool = False
    token_step: int = 0


# -------------------------------------------------------------------------------------------- responses


class FinishReason(BaseModel):
    """meta_info.finish_reason: FINISH_MATCHED_TOKEN / FINISH_MATCHED_STR / FINISH_LENGTH / FINISH_ABORT .to_json()."""

    model_config = ConfigDict(extra="allow")

    type: Literal["stop", "length", "abort"]
    matched: int | str | None = None
    length: int | None = None
    message: str | None = None


class MetaInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    e2e_latency: float | None = None
    weight_version: str | None = None
    # [logprob, token_id, token text or null] per output token, present when return_logprob
    output_token_logprobs: list[tuple[float, int, str | None]] | None = None


class GenerateOutput(BaseModel):
    """One /generate answer (a batch request gets a list of them)."""

    model_config = ConfigDict(extra="allow")

    text: str
    output_ids: list[int] | None = None  # real SGLang may leave it out when its tokenizer is skipped
    meta_info: MetaInfo


class UpdateWeightFromDiskReqOutput(BaseModel):
    success: bool
    message: str
    num_paused_requests: int | None = 0


class ModelInfo(BaseModel):
    """GET /model_info (SGLang's fields; weight_version is what weight sync checks)."""

    model_config = ConfigDict(extra="allow")

    model_path: str
    tokenizer_path: str | None = None
    is_generation: bool = True
    weight_version: str | None = None


# ------------------------------------------------------------------------------------- OpenAI-compatible


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _OpenAIBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # SGLang extensions of the OpenAI API
    min_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            if data.get("logprobs") is False:
                data["logprobs"] = None
            if data.get("tool_choice") in ("none", "auto") and not data.get("tools"):
                data["tool_choice"] = None  # no tools: either choice means plain text
        return _screen(data, where="OpenAI API", neutral=_OPENAI_NEUTRAL, ignored=_OPENAI_IGNORED)

    def sampling_params(self, max_tokens: int | None) -> SamplingParams:
        given = {
            "max_new_tokens": max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "n": self.n,
            "ignore_eos": self.ignore_eos,
            "skip_special_tokens": self.skip_special_tokens,
            "no_stop_trim": self.no_stop_trim,
            "sampling_seed": self.seed,
        }
        return SamplingParams(**given)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict] | None = None


class ChatCompletionRequest(_OpenAIBase):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @field_validator("messages")
    @classmethod
    def _text_only(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        for i, m in enumerate(messages):
            if isinstance(m.content, list):
                kinds = {part.get("type") for part in m.content}
                if kinds - {"text"}:
                    raise ValueError(
                        f"messages[{i}].content has parts of type {sorted(kinds - {'text'})}; "
                        "the fr_jax engine serves text only"
                    )
        return messages


class CompletionRequest(_OpenAIBase):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for /v1/completions

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens
