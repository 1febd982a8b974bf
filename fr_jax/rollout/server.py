"""The embedded rollout server: fr_jax's engine behind SGLang's native HTTP protocol (plus OpenAI-compatible routes).

One scheduler thread owns the engine (fr_jax.rollout.scheduler): HTTP handlers turn requests into jobs and await
their completions, or their progress chunk by chunk when they stream. Weight updates load the new checkpoint
beside the running requests, then drain them (or abort them, with abort_all_requests) and swap, as SGLang does.

Endpoints (SGLang's names): POST /generate (stream: SGLang's `data:` lines, cumulative text and ids, then
`data: [DONE]`), POST /update_weights_from_disk, GET /health, /health_generate, /model_info (+ /get_model_info),
/get_weight_version (+ /weight_version), /server_info (+ /get_server_info), /get_load, GET|POST /flush_cache,
GET /v1/models, POST /v1/chat/completions, /v1/completions (stream: OpenAI's SSE chunks with text deltas, then
`data: [DONE]`). sglang-router needs /health, /server_info, /model_info, /get_load and /flush_cache of a worker
(its worker discovery and load polling). Errors are {"error": {"message": ...}}: 400 for a bad request, 503 when
the queue is full ("The request queue is full.", as SGLang), 500 for a server fault.

Not served (each refused by name, see protocol.py): prompt log-probs (meta_info has no input_token_logprobs), top
log-probs, penalties, grammars, multimodal input, LoRA.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import pathlib
import time
import uuid
from collections.abc import AsyncIterator, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

import fr_jax
from fr_jax.models.config import ModelConfig
from fr_jax.models.decoder import Decoder
from fr_jax.models.hf import load_pretrained
from fr_jax.models.tokenizer import load_tokenizer
from fr_jax.rollout.engine import Completion, Engine, GenerationRequest, Sample, SamplingOptions
from fr_jax.rollout.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateReqInput,
    SamplingParams,
    UpdateWeightFromDiskReqInput,
)
from fr_jax.rollout.scheduler import Job, QueueFull, Scheduler

_log = logging.getLogger(__name__)

LOAD_FORMATS = (None, "auto", "safetensors")
_DONE = b"data: [DONE]\n\n"


class BadRequest(ValueError):
    """A request the server refuses (HTTP 400), with a message naming what is wrong."""


def eos_token_ids(model_dir, tokenizer) -> tuple[int, ...]:
    """End-of-sequence ids: config.json's and generation_config.json's eos_token_id plus the tokenizer's."""
    ids: list[int] = []
    for name in ("config.json", "generation_config.json"):
        path = pathlib.Path(model_dir) / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            ids.extend(value if isinstance(value, list) else [] if value is None else [value])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(int(i) for i in ids))


def _sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


class RolloutServer:
    """The engine, its tokenizer, its scheduler thread and the served checkpoint's identity (path, weight version)."""

    def __init__(
        self,
        engine: Engine,
        tokenizer,
        *,
        model_path: str,
        served_model_name: str | None = None,
        tokenizer_path: str | None = None,
        max_queued_requests: int | None = None,
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_path = str(model_path)
        self.tokenizer_path = str(tokenizer_path or model_path)
        self.served_model_name = served_model_name or self.model_path
        self.scheduler = Scheduler(engine, max_queued_requests=max_queued_requests)
        self._update_lock = asyncio.Lock()

    @classmethod
    def from_pretrained(
        cls,
        model_dir,
        *,
        mesh,
        tokenizer_path=None,
        param_dtype: str | None = None,
        dtype: str | None = None,
        context_length: int | None = None,
        served_model_name: str | None = None,
        max_queued_requests: int | None = None,
        **engine_kwargs,
    ) -> RolloutServer:
        """Load an HF checkpoint directory (weights sharded over `mesh`) and its tokenizer, ready to serve.
        engine_kwargs: the Engine's options (max_running_requests, scheduling, prefix_cache_tokens, seed, ...)."""
        overrides = {k: v for k, v in (("param_dtype", param_dtype), ("dtype", dtype)) if v is not None}
        model = load_pretrained(model_dir, mesh=mesh, **overrides)
        tokenizer = load_tokenizer(tokenizer_path or model_dir)
        engine = Engine(
            model,
            mesh=mesh,
            eos_token_ids=eos_token_ids(model_dir, tokenizer),
            detokenize=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
            max_seq_len=context_length,
            **engine_kwargs,
        )
        return cls(
            engine,
            tokenizer,
            model_path=str(model_dir),
            tokenizer_path=tokenizer_path,
            served_model_name=served_model_name,
            max_queued_requests=max_queued_requests,
        )

    @property
    def weight_version(self) -> str:
        return self.engine.weight_version

    # ------------------------------------------------------------------------------------- generation

    def encode(self, prompt: str | list[int]) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def sampling_options(self, params: SamplingParams, prompt_len: int) -> SamplingOptions:
        # SGLang's max_new_tokens=None: whatever the context leaves (the engine refuses a prompt that fills it)
        max_new = (
            params.max_new_tokens if params.max_new_tokens is not None else max(self.engine.max_seq_len - prompt_len, 1)
        )
        return SamplingOptions(
            max_new_tokens=max_new,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            min_p=params.min_p,
            stop_token_ids=tuple(params.stop_token_ids or ()),
            stop=params.stop_strings,
            ignore_eos=params.ignore_eos,
            seed=params.sampling_seed,
        )

    def submit(self, prompts: Sequence[list[int]], params: Sequence[SamplingParams], on_progress=None) -> Job:
        requests = [
            GenerationRequest(tuple(ids), self.sampling_options(p, len(ids)), p.n) for ids, p in zip(prompts, params)
        ]
        try:
            return self.scheduler.submit(requests, on_progress)  # a bad request fails alone, before it is queued
        except ValueError as error:
            raise BadRequest(str(error)) from error

    async def run(self, prompts: Sequence[list[int]], params: Sequence[SamplingParams]) -> list[list[Completion]]:
        return await asyncio.wrap_future(self.submit(prompts, params).future)

    def progress(
        self, prompts: Sequence[list[int]], params: Sequence[SamplingParams]
    ) -> AsyncIterator[tuple[int, Completion]]:
        """Submit now (a refusal raises here, before any response starts) and return an iterator of (sample index,
        prompt-major; its completion so far) after every decode chunk that changed it; a finished sample's last
        one has its finish_reason. Closing the iterator early aborts what is left."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[tuple[Sample, Completion]] = asyncio.Queue()

        def on_progress(sample: Sample) -> None:  # the scheduler thread
            loop.call_soon_threadsafe(updates.put_nowait, (sample, sample.completion()))

        return self._follow(self.submit(prompts, params, on_progress), updates)

    async def _follow(self, job: Job, updates: asyncio.Queue) -> AsyncIterator[tuple[int, Completion]]:
        index = {id(s): k for k, s in enumerate(s for group in job.samples for s in group)}
        done, finals = asyncio.wrap_future(job.future), set()
        try:
            while True:
                getter = asyncio.ensure_future(updates.get())
                await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    break
                sample, snapshot = getter.result()
                finals.update([index[id(sample)]] if snapshot.finish_reason else [])
                yield index[id(sample)], snapshot
            while not updates.empty():
                sample, snapshot = updates.get_nowait()
                finals.update([index[id(sample)]] if snapshot.finish_reason else [])
                yield index[id(sample)], snapshot
            for k, completion in enumerate(c for group in done.result() for c in group):
                if k not in finals:  # finished without a decode chunk (max_new_tokens 0, aborted while queued)
                    yield k, completion
        finally:
            if not job.future.done():
                self.scheduler.cancel(job)

    def completion_text(self, completion: Completion, params: SamplingParams) -> str:
        """The decoded output with SGLang's trimming: a matched stop token or stop string is cut unless no_stop_trim.
        While the sample still runs: the text so far, less an unfinished character and any tail that may yet
        become a stop string (so that streamed text never has to be taken back)."""
        ids = completion.output_ids
        reason = completion.finish_reason or {}
        matched = reason.get("matched")
        if isinstance(matched, int) and not params.no_stop_trim:
            ids = ids[:-1]
        text = self.tokenizer.decode(
            ids,
            skip_special_tokens=params.skip_special_tokens,
            spaces_between_special_tokens=params.spaces_between_special_tokens,
        )
        if isinstance(matched, str) and not params.no_stop_trim and matched in text:
            text = text[: text.index(matched)]
        if not reason:
            text = text.rstrip("\ufffd")
            held = max(
                (k for stop in params.stop_strings for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0
            )
            text = text[: len(text) - held]
        return text

    def _requests(self, req: GenerateReqInput) -> tuple[list[list[int]], list[SamplingParams]]:
        prompts = [self.encode(p) for p in req.prompts()]
        params = (
            req.sampling_params
            if isinstance(req.sampling_params, list)
            else [req.sampling_params or SamplingParams()] * len(prompts)
        )
        if len(params) != len(prompts):
            raise BadRequest(f"sampling_params has {len(params)} entries for {len(prompts)} prompts")
        return prompts, params

    def _output(self, req: GenerateReqInput, k: int, c: Completion, params: SamplingParams, rid: str, started) -> dict:
        """One /generate output (sample k, prompt-major) as SGLang's tokenizer manager builds it."""
        meta = {
            "id": rid,
            "finish_reason": c.finish_reason,
            "prompt_tokens": c.prompt_tokens,
            "weight_version": c.weight_version,
            "completion_tokens": len(c.output_ids),
            "cached_tokens": c.cached_tokens,
        }
        if c.finish_reason is not None:
            meta["e2e_latency"] = time.perf_counter() - started
        if req.per_prompt("return_logprob", False)[k // req.parallel_sample_num]:
            texts = (
                [self.tokenizer.decode([t]) for t in c.output_ids]
                if req.return_text_in_logprobs
                else [None] * len(c.output_ids)
            )
            meta["output_token_logprobs"] = [[lp, t, s] for lp, t, s in zip(c.logprobs, c.output_ids, texts)]
        return {"text": self.completion_text(c, params), "output_ids": c.output_ids, "meta_info": meta}

    async def generate(self, req: GenerateReqInput) -> dict | list[dict]:
        started = time.perf_counter()
        prompts, params = self._requests(req)
        n = req.parallel_sample_num
        rids = self._rids(req.rid, len(prompts), n)
        results = await self.run(prompts, params)
        flat = [c for group in results for c in group]
        outputs = [self._output(req, k, c, params[k // n], rids[k], started) for k, c in enumerate(flat)]
        return outputs[0] if req.is_single else outputs

    def generate_stream(self, req: GenerateReqInput) -> AsyncIterator[bytes]:
        """SGLang's stream: per sample and chunk, its text and ids so far (an "index" in a batch), then [DONE]."""
        started = time.perf_counter()
        prompts, params = self._requests(req)
        n = req.parallel_sample_num
        rids = self._rids(req.rid, len(prompts), n)
        updates = self.progress(prompts, params)
        return self._stream(updates, lambda k, c: self._output(req, k, c, params[k // n], rids[k], started), req)

    async def _stream(self, updates, render, req: GenerateReqInput) -> AsyncIterator[bytes]:
        try:
            async for k, completion in updates:
                out = render(k, completion)
                yield _sse(out if req.is_single else {**out, "index": k})
        except Exception as error:  # noqa: BLE001 - the stream has started: SGLang reports errors in-band
            _log.exception("/generate stream failed")
            yield _sse({"error": {"message": f"{type(error).__name__}: {error}"}})
        finally:
            await updates.aclose()  # a client that went away: its samples are aborted
        yield _DONE

    @staticmethod
    def _rids(rid, prompts: int, n: int) -> list[str]:
        """SGLang's request ids: the given ones for n == 1 (a string prefix gets _index), else fresh ones per sample."""
        count = prompts * n
        if n > 1 or rid is None:
            return [uuid.uuid4().hex for _ in range(count)]
        if isinstance(rid, str):
            return [rid] if count == 1 else [f"{rid}_{i}" for i in range(count)]
        if len(rid) != prompts:
            raise BadRequest(f"rid has {len(rid)} entries for {prompts} prompts")
        return list(rid)

    # ----------------------------------------------------------------------------------- weight update

    def _load_model(self, model_path: str) -> Decoder:
        cfg = self.engine.cfg
        try:
            new_cfg = ModelConfig.from_pretrained(
                model_path, param_dtype=cfg.param_dtype, dtype=cfg.dtype, remat=cfg.remat
            )
        except (FileNotFoundError, ValueError) as error:
            raise BadRequest(f"cannot read the checkpoint at {model_path}: {error}") from error
        differ = {
            f.name: (getattr(cfg, f.name), getattr(new_cfg, f.name))
            for f in dataclasses.fields(cfg)
            if getattr(cfg, f.name) != getattr(new_cfg, f.name)
        }
        if differ:
            detail = ", ".join(f"{k}: served {a!r}, checkpoint {b!r}" for k, (a, b) in differ.items())
            raise BadRequest(f"the checkpoint at {model_path} does not match the served model ({detail})")
        try:
            model = load_pretrained(
                model_path, mesh=self.engine.mesh, param_dtype=cfg.param_dtype, dtype=cfg.dtype, remat=cfg.remat
            )
        except (FileNotFoundError, KeyError, ValueError) as error:
            raise BadRequest(f"cannot load the checkpoint at {model_path}: {error}") from error
        return model

    async def update_weights_from_disk(self, req: UpdateWeightFromDiskReqInput) -> tuple[bool, str]:
        """Load beside the running requests, then drain them (or abort them all) and swap between steps. The
        prefix cache is always emptied: its K/V belongs to the old weights."""
        if req.load_format not in LOAD_FORMATS:
            return False, f"load_format={req.load_format!r} is not supported (supported: auto, safetensors)"
        started = time.perf_counter()
        async with self._update_lock:
            try:
                model = await asyncio.to_thread(self._load_model, req.model_path)
                abort = "aborted by a weight update (abort_all_requests)" if req.abort_all_requests else None
                swap = self.scheduler.call(lambda e: e.swap_state(model, req.weight_version), drain=True, abort=abort)
                await asyncio.wrap_future(swap)
            except ValueError as error:  # a refused checkpoint (BadRequest) or mismatched parameters
                return False, str(error)
            self.model_path = req.model_path
        _log.info(
            "updated weights from %s (weight_version %s) in %.2fs",
            req.model_path,
            self.weight_version,
            time.perf_counter() - started,
        )
        return True, "Succeeded to update model weights."

    # --------------------------------------------------------------------------------------- OpenAI API

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        messages = [
            {
                "role": m.role,
                "content": m.content
                if not isinstance(m.content, list)
                else "".join(part.get("text", "") for part in m.content),
            }
            for m in req.messages
        ]
        if self.tokenizer.chat_template is None:
            raise BadRequest(f"the tokenizer at {self.tokenizer_path} has no chat template; use /v1/completions")
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, **(req.chat_template_kwargs or {})
        )
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def _openai_prompts(self, req: ChatCompletionRequest | CompletionRequest) -> list[list[int]]:
        if isinstance(req, ChatCompletionRequest):
            return [self.chat_prompt(req)]
        raw = req.prompt
        single = isinstance(raw, str) or (bool(raw) and isinstance(raw[0], int))
        prompts = [self.encode(p) for p in ([raw] if single else raw)]
        if not prompts or not all(prompts):
            raise BadRequest("prompt is empty")
        return prompts

    def _openai_envelope(self, req: ChatCompletionRequest | CompletionRequest, *, chunk: bool) -> dict:
        chat = isinstance(req, ChatCompletionRequest)
        kind = ("chat.completion" if chat else "text_completion") + (".chunk" if chunk and chat else "")
        prefix = "chatcmpl" if chat else "cmpl"
        model = req.model or self.served_model_name
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model}

    @staticmethod
    def _usage(prompts: Sequence[list[int]], completion_tokens: int) -> dict:
        prompt_tokens = sum(map(len, prompts))
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    async def openai(self, req: ChatCompletionRequest | CompletionRequest) -> dict:
        chat = isinstance(req, ChatCompletionRequest)
        prompts = self._openai_prompts(req)
        params = req.sampling_params(req.max_new_tokens)
        results = await self.run(prompts, [params] * len(prompts))
        choices = []
        for k, c in enumerate(c for group in results for c in group):
            text = self.completion_text(c, params)
            choice = {
                "index": k,
                "finish_reason": c.finish_reason["type"],
                "logprobs": None,
                "matched_stop": c.finish_reason.get("matched"),
            }
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            choices.append(choice)
        completion_tokens = sum(len(c.output_ids) for group in results for c in group)
        return {
            **self._openai_envelope(req, chunk=False),
            "choices": choices,
            "usage": self._usage(prompts, completion_tokens),
        }

    def openai_stream(self, req: ChatCompletionRequest | CompletionRequest) -> AsyncIterator[bytes]:
        """OpenAI's stream: chunks with each choice's new text (chat: a first one with the role), a last one per
        choice with its finish_reason, usage if stream_options.include_usage, then [DONE]."""
        chat = isinstance(req, ChatCompletionRequest)
        prompts = self._openai_prompts(req)
        params = req.sampling_params(req.max_new_tokens)
        updates = self.progress(prompts, [params] * len(prompts))
        envelope = self._openai_envelope(req, chunk=True)
        return self._openai_chunks(req, chat, prompts, params, updates, envelope)

    async def _openai_chunks(self, req, chat, prompts, params, updates, envelope) -> AsyncIterator[bytes]:
        sent: dict[int, str] = {}
        tokens: dict[int, int] = {}
        try:
            async for k, completion in updates:
                if chat and k not in sent:
                    yield _sse({**envelope, "choices": [{"index": k, "delta": {"role": "assistant", "content": ""}}]})
                text, before = self.completion_text(completion, params), sent.get(k, "")
                delta = text[len(before) :] if text.startswith(before) else ""
                sent[k], tokens[k] = (text if text.startswith(before) else before), len(completion.output_ids)
                reason = completion.finish_reason
                if not delta and reason is None:
                    continue
                choice = {"index": k, "finish_reason": reason and reason["type"]}
                choice.update({"delta": {"content": delta}} if chat else {"text": delta, "logprobs": None})
                if reason is not None:
                    choice["matched_stop"] = reason.get("matched")
                yield _sse({**envelope, "choices": [choice]})
            if req.stream_options is not None and req.stream_options.include_usage:
                usage = self._usage(prompts, sum(tokens.values()))
                yield _sse({**envelope, "choices": [], "usage": usage})
        except Exception as error:  # noqa: BLE001 - the stream has started: report in-band, as SGLang does
            _log.exception("OpenAI stream failed")
            yield _sse({"error": {"message": f"{type(error).__name__}: {error}", "type": "server_error", "code": 500}})
        finally:
            await updates.aclose()  # a client that went away: its samples are aborted
        yield _DONE

    # ------------------------------------------------------------------------------------------ status

    def model_info(self) -> dict:
        cfg = self.engine.cfg
        return {
            "model_path": self.model_path,
            "tokenizer_path": self.tokenizer_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": self.weight_version,
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": cfg.model_type,
            "architectures": cfg.to_hf()["architectures"],
        }

    def load(self) -> list[dict]:
        """SGLang's /get_load: one entry per data-parallel rank (one here)."""
        engine = self.engine
        running, waiting = engine.running_samples, engine.waiting_samples
        return [
            {
                "dp_rank": 0,
                "num_reqs": running + waiting,
                "num_waiting_reqs": waiting,
                "num_tokens": engine.live_tokens(),
                "num_pending_tokens": 0,
                "ts_tic": time.perf_counter(),
            }
        ]

    def server_info(self) -> dict:
        engine = self.engine
        return {
            "model_path": self.model_path,
            "tokenizer_path": self.tokenizer_path,
            "served_model_name": self.served_model_name,
            "weight_version": self.weight_version,
            "context_length": engine.max_seq_len,
            "max_running_requests": engine.max_running_requests,
            "max_queued_requests": self.scheduler.max_queued_requests,
            "chunked_prefill_size": engine.chunked_prefill_size,
            "num_continuous_decode_steps": engine.chunk_steps,
            "schedule_policy": engine.scheduling,
            "disable_radix_cache": engine.prefix.capacity == 0,
            "prefix_cache_tokens": engine.prefix.capacity * engine.prefix.block_size,
            "dp_size": 1,
            "tp_size": int(engine.mesh.shape.get("tensor", 1)),
            "mesh": dict(engine.mesh.shape),
            "dtype": engine.cfg.dtype,
            "param_dtype": engine.cfg.param_dtype,
            "internal_states": [
                {
                    "engine_compiles": engine.compiles,
                    "engine_compile_seconds": engine.compile_seconds,
                    "engine_steps": engine.steps,
                    "jobs_served": self.scheduler.jobs_served,
                    "samples_aborted": self.scheduler.samples_aborted,
                    "running_samples": engine.running_samples,
                    "waiting_samples": engine.waiting_samples,
                    "prefix_cache_hit_tokens": engine.prefix.hit_tokens,
                    "prefix_cache_blocks": engine.prefix.cached_blocks,
                    "prefix_cache_evicted_blocks": engine.prefix.evicted_blocks,
                }
            ],
            "version": fr_jax.__version__,
            "backend": "fr_jax",
        }


# ---------------------------------------------------------------------------------------------- the app


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message}}, status_code=status)


def _validation_message(error: RequestValidationError) -> str:
    """One line per problem, naming the field; union alternatives that merely failed to match are left out."""
    problems = error.errors()
    value_errors = [p for p in problems if p.get("type") == "value_error"]
    lines = []
    for p in value_errors or problems:
        parts = [str(part) for part in p.get("loc", ()) if part != "body"]
        loc = ".".join(part for part in parts if not any(c in part for c in "[("))  # drop pydantic's type names
        msg = str(p.get("msg", "")).removeprefix("Value error, ")
        line = f"{loc}: {msg}" if loc else msg
        if line not in lines:
            lines.append(line)
    return "; ".join(lines)


def create_app(server: RolloutServer) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        server.scheduler.stop()

    app = FastAPI(title="fr_jax rollout server (SGLang protocol)", lifespan=lifespan)
    app.state.rollout = server

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        return _error(400, _validation_message(error))

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, error: BadRequest):
        return _error(400, str(error))

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, error: QueueFull):
        return _error(503, str(error))

    @app.exception_handler(Exception)
    async def server_fault(request: Request, error: Exception):
        _log.exception("%s failed", request.url.path)
        return _error(500, f"{type(error).__name__}: {error}")

    def event_stream(chunks: AsyncIterator[bytes]) -> StreamingResponse:
        return StreamingResponse(chunks, media_type="text/event-stream")

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/health_generate")
    async def health_generate():
        await server.run([[0]], [SamplingParams(max_new_tokens=1, temperature=0.0)])
        return Response(status_code=200)

    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(req: GenerateReqInput):
        try:
            return event_stream(server.generate_stream(req)) if req.stream else await server.generate(req)
        except ValueError as error:  # per-prompt fields that disagree with the number of prompts
            raise BadRequest(str(error)) from error

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(req: UpdateWeightFromDiskReqInput):
        success, message = await server.update_weights_from_disk(req)
        # SGLang's disk path drains the running requests (or aborts them) and reports no paused ones
        return JSONResponse(
            {"success": success, "message": message, "num_paused_requests": 0}, status_code=200 if success else 400
        )

    @app.get("/model_info")
    @app.get("/get_model_info")
    async def model_info():
        return server.model_info()

    @app.get("/get_weight_version")
    @app.get("/weight_version")
    async def weight_version():
        return {"weight_version": server.weight_version}

    @app.get("/server_info")
    @app.get("/get_server_info")
    async def server_info():
        return server.server_info()

    @app.get("/get_load")
    async def get_load():
        return server.load()

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        await asyncio.wrap_future(server.scheduler.call(lambda engine: engine.flush_cache()))
        return Response(content="Cache flushed.\n", status_code=200)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": server.served_model_name,
                    "object": "model",
                    "owned_by": "fr_jax",
                    "root": server.model_path,
                    "max_model_len": server.engine.max_seq_len,
                }
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        return event_stream(server.openai_stream(req)) if req.stream else await server.openai(req)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        return event_stream(server.openai_stream(req)) if req.stream else await server.openai(req)

    return app
