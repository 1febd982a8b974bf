"""The embedded rollout server: fr_jax's engine behind SGLang's native HTTP protocol (plus OpenAI-compatible routes).

One scheduler thread owns the engine. HTTP handlers turn requests into engine jobs and queue them; the scheduler
takes the oldest job, waits `batch_wait_s` for concurrent ones, and runs every queued job that fits in
`max_running_requests` rows as one batch (first come, first served: a batch always starts at the queue head).
Weight updates load the new checkpoint beside the running batch and swap it in between batches.

Endpoints (SGLang's names): POST /generate, POST /update_weights_from_disk, GET /health, /health_generate,
/model_info (+ /get_model_info), /get_weight_version (+ /weight_version), /server_info, GET|POST /flush_cache,
GET /v1/models, POST /v1/chat/completions, /v1/completions. Errors are {"error": {"message": ...}} with status 400
for a bad request (SGLang's shape) and 500 for a server fault.

Not served (each refused by name, see protocol.py): streaming, prompt log-probs (meta_info has no
input_token_logprobs), top log-probs, penalties, grammars, multimodal input, LoRA. meta_info.cached_tokens is 0.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import pathlib
import threading
import time
import uuid
from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

import fr_jax
from fr_jax.models.config import ModelConfig
from fr_jax.models.decoder import Decoder
from fr_jax.models.hf import load_pretrained
from fr_jax.models.tokenizer import load_tokenizer
from fr_jax.rollout.engine import Completion, Engine, GenerationRequest, SamplingOptions
from fr_jax.rollout.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateReqInput,
    SamplingParams,
    UpdateWeightFromDiskReqInput,
)

_log = logging.getLogger(__name__)

LOAD_FORMATS = (None, "auto", "safetensors")


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


# ---------------------------------------------------------------------------------------------- scheduler


@dataclasses.dataclass
class _Job:
    requests: list[GenerationRequest]
    future: concurrent.futures.Future
    rows: int


class Scheduler:
    """Drains the job queue into engine batches on one thread, oldest job first."""

    def __init__(self, engine: Engine, *, max_running_requests: int, batch_wait_s: float = 0.01):
        self.engine = engine
        self.max_rows = max_running_requests
        self.batch_wait_s = batch_wait_s
        self._queue: collections.deque[_Job] = collections.deque()
        self._ready = threading.Condition()
        self._stopped = False
        self.batches = 0  # engine batches run so far
        self.rows_served = 0
        self._thread = threading.Thread(target=self._run, name="rollout-scheduler", daemon=True)
        self._thread.start()

    def submit(self, requests: list[GenerationRequest]) -> concurrent.futures.Future:
        job = _Job(requests, concurrent.futures.Future(), sum(r.n for r in requests))
        with self._ready:
            if self._stopped:
                raise RuntimeError("the scheduler is stopped")
            self._queue.append(job)
            self._ready.notify()
        return job.future

    def queued_rows(self) -> int:
        with self._ready:
            return sum(job.rows for job in self._queue)

    def stop(self) -> None:
        with self._ready:
            self._stopped = True
            self._ready.notify()
        self._thread.join()

    def _take_batch(self) -> list[_Job] | None:
        with self._ready:
            while not self._queue and not self._stopped:
                self._ready.wait()
            if self._stopped:
                return None
        time.sleep(self.batch_wait_s)  # let requests sent together (one client's concurrent calls) join this batch
        with self._ready:
            batch = [self._queue.popleft()]
            rows = batch[0].rows
            while self._queue and rows + self._queue[0].rows <= self.max_rows:
                rows += self._queue[0].rows
                batch.append(self._queue.popleft())
            return batch

    def _run(self) -> None:
        while (batch := self._take_batch()) is not None:
            batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
            self.batches += 1
            self.rows_served += sum(job.rows for job in batch)
            try:
                results = self.engine.generate([r for job in batch for r in job.requests])
            except Exception as error:  # noqa: BLE001 - every waiting caller must hear about it
                for job in batch:
                    job.future.set_exception(error)
                continue
            start = 0
            for job in batch:
                job.future.set_result(results[start : start + len(job.requests)])
                start += len(job.requests)
        with self._ready:
            for job in self._queue:
                job.future.cancel()


# ------------------------------------------------------------------------------------------------ server


class RolloutServer:
    """The engine, its tokenizer and the served checkpoint's identity (path, weight version)."""

    def __init__(
        self,
        engine: Engine,
        tokenizer,
        *,
        model_path: str,
        served_model_name: str | None = None,
        tokenizer_path: str | None = None,
        max_running_requests: int = 64,
        batch_wait_s: float = 0.01,
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_path = str(model_path)
        self.tokenizer_path = str(tokenizer_path or model_path)
        self.served_model_name = served_model_name or self.model_path
        self.scheduler = Scheduler(engine, max_running_requests=max_running_requests, batch_wait_s=batch_wait_s)
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
        max_running_requests: int = 64,
        seed: int = 0,
        weight_version: str = "default",
        **server_kwargs,
    ) -> RolloutServer:
        """Load an HF checkpoint directory (weights sharded over `mesh`) and its tokenizer, ready to serve."""
        overrides = {k: v for k, v in (("param_dtype", param_dtype), ("dtype", dtype)) if v is not None}
        model = load_pretrained(model_dir, mesh=mesh, **overrides)
        tokenizer = load_tokenizer(tokenizer_path or model_dir)
        engine = Engine(
            model,
            mesh=mesh,
            eos_token_ids=eos_token_ids(model_dir, tokenizer),
            detokenize=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
            max_seq_len=context_length,
            max_batch_rows=max_running_requests,
            seed=seed,
            weight_version=weight_version,
        )
        return cls(
            engine,
            tokenizer,
            model_path=str(model_dir),
            tokenizer_path=tokenizer_path,
            max_running_requests=max_running_requests,
            **server_kwargs,
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

    async def run(self, prompts: Sequence[list[int]], params: Sequence[SamplingParams]) -> list[list[Completion]]:
        requests = [
            GenerationRequest(tuple(ids), self.sampling_options(p, len(ids)), p.n) for ids, p in zip(prompts, params)
        ]
        try:
            self.engine.check(requests)  # a bad request must fail alone, not the batch it would join
        except ValueError as error:
            raise BadRequest(str(error)) from error
        return await asyncio.wrap_future(self.scheduler.submit(requests))

    def completion_text(self, completion: Completion, params: SamplingParams) -> str:
        """The decoded output with SGLang's trimming: a matched stop token or stop string is cut unless no_stop_trim."""
        ids = completion.output_ids
        matched = completion.finish_reason.get("matched")
        if isinstance(matched, int) and not params.no_stop_trim:
            ids = ids[:-1]
        text = self.tokenizer.decode(
            ids,
            skip_special_tokens=params.skip_special_tokens,
            spaces_between_special_tokens=params.spaces_between_special_tokens,
        )
        if isinstance(matched, str) and not params.no_stop_trim and matched in text:
            text = text[: text.index(matched)]
        return text

    async def generate(self, req: GenerateReqInput) -> dict | list[dict]:
        started = time.perf_counter()
        prompts = [self.encode(p) for p in req.prompts()]
        n = req.parallel_sample_num
        params = (
            req.sampling_params
            if isinstance(req.sampling_params, list)
            else [req.sampling_params or SamplingParams()] * len(prompts)
        )
        if len(params) != len(prompts):
            raise BadRequest(f"sampling_params has {len(params)} entries for {len(prompts)} prompts")
        return_logprob = req.per_prompt("return_logprob", False)
        rids = self._rids(req.rid, len(prompts), n)
        results = await self.run(prompts, params)
        latency = time.perf_counter() - started
        outputs = []
        for i, completions in enumerate(results):
            for j, c in enumerate(completions):
                meta = {
                    "id": rids[i * n + j],
                    "finish_reason": c.finish_reason,
                    "prompt_tokens": c.prompt_tokens,
                    "weight_version": c.weight_version,
                    "completion_tokens": len(c.output_ids),
                    "cached_tokens": 0,
                    "e2e_latency": latency,
                }
                if return_logprob[i]:
                    texts = (
                        [self.tokenizer.decode([t]) for t in c.output_ids]
                        if req.return_text_in_logprobs
                        else [None] * len(c.output_ids)
                    )
                    meta["output_token_logprobs"] = [[lp, t, s] for lp, t, s in zip(c.logprobs, c.output_ids, texts)]
                outputs.append(
                    {"text": self.completion_text(c, params[i]), "output_ids": c.output_ids, "meta_info": meta}
                )
        return outputs[0] if req.is_single else outputs

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
        if req.load_format not in LOAD_FORMATS:
            return False, f"load_format={req.load_format!r} is not supported (supported: auto, safetensors)"
        started = time.perf_counter()
        async with self._update_lock:
            try:
                model = await asyncio.to_thread(self._load_model, req.model_path)
                # waits for the running batch; its samples keep the version that generated them
                await asyncio.to_thread(self.engine.swap_state, model, req.weight_version)
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

    async def openai(self, req: ChatCompletionRequest | CompletionRequest) -> dict:
        chat = isinstance(req, ChatCompletionRequest)
        if chat:
            prompts = [self.chat_prompt(req)]
        else:
            raw = req.prompt
            single = isinstance(raw, str) or (bool(raw) and isinstance(raw[0], int))
            prompts = [self.encode(p) for p in ([raw] if single else raw)]
            if not prompts or not all(prompts):
                raise BadRequest("prompt is empty")
        params = req.sampling_params(req.max_new_tokens)
        results = await self.run(prompts, [params] * len(prompts))
        choices, completion_tokens = [], 0
        for i, completions in enumerate(results):
            for j, c in enumerate(completions):
                text = self.completion_text(c, params)
                reason = c.finish_reason
                choice = {
                    "index": i * req.n + j,
                    "finish_reason": reason["type"],
                    "logprobs": None,
                    "matched_stop": reason.get("matched"),
                }
                choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
                choices.append(choice)
                completion_tokens += len(c.output_ids)
        prompt_tokens = sum(map(len, prompts))
        return {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": req.model or self.served_model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

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

    @app.exception_handler(Exception)
    async def server_fault(request: Request, error: Exception):
        _log.exception("%s failed", request.url.path)
        return _error(500, f"{type(error).__name__}: {error}")

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
            return await server.generate(req)
        except ValueError as error:  # per-prompt fields that disagree with the number of prompts
            raise BadRequest(str(error)) from error

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(req: UpdateWeightFromDiskReqInput):
        success, message = await server.update_weights_from_disk(req)
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
        engine = server.engine
        return {
            "model_path": server.model_path,
            "served_model_name": server.served_model_name,
            "weight_version": server.weight_version,
            "context_length": engine.max_seq_len,
            "max_running_requests": server.scheduler.max_rows,
            "mesh": dict(engine.mesh.shape),
            "dtype": engine.cfg.dtype,
            "param_dtype": engine.cfg.param_dtype,
            "engine_compiles": engine.compiles,
            "queued_rows": server.scheduler.queued_rows(),
            "batches": server.scheduler.batches,
            "rows_served": server.scheduler.rows_served,
            "version": fr_jax.__version__,
            "backend": "fr_jax",
        }

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        # there is no prefix cache to flush: each batch prefills its own prompts
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
        return await server.openai(req)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        return await server.openai(req)

    return app
