"""The one client GRPO uses to sample and to push weights, against real SGLang or fr_jax's server alike.

`RolloutClient.generate` posts SGLang's /generate with return_logprob, retries transport errors and 5xx answers
(never a 4xx: a bad request stays bad), validates every answer with the protocol models, and returns per prompt
its n samples with ids, per-token log-probs and text. A sample whose finish reason is neither "stop" nor
"length", or whose ids, log-probs and token count disagree, raises RolloutError instead of reaching the loss.

`sync_weights` writes the trainer's parameters as an HF directory, asks the server to load it with
/update_weights_from_disk and a weight_version, checks that the server now reports that version, and logs the
seconds per GB of the round trip.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time
from collections.abc import Sequence

import httpx
import jax

from fr_jax.models.hf import save_pretrained
from fr_jax.rollout.protocol import GenerateOutput, ModelInfo, SamplingParams, UpdateWeightFromDiskReqOutput

_log = logging.getLogger(__name__)


class RolloutError(RuntimeError):
    """The server answered, but not with usable rollouts (an error status, an aborted or inconsistent sample)."""


@dataclasses.dataclass(frozen=True)
class Rollout:
    """One sample. logprobs[i] is the log-prob of output_ids[i] (the server's convention: log_softmax(logits / T)
    before top-k/top-p/min-p); a matched stop token is the last of output_ids; text has SGLang's stop trimming."""

    output_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str  # "stop" | "length"
    matched_stop: int | str | None
    prompt_tokens: int
    weight_version: str | None


@dataclasses.dataclass(frozen=True)
class WeightSync:
    weight_version: str
    gigabytes: float
    write_s: float
    load_s: float

    @property
    def seconds_per_gb(self) -> float:
        return (self.write_s + self.load_s) / max(self.gigabytes, 1e-9)


class RolloutClient:
    """HTTP client of a rollout server at `base_url` (e.g. "http://127.0.0.1:30000")."""

    def __init__(self, base_url: str, *, timeout: float = 3600.0, max_retries: int = 3, retry_backoff_s: float = 2.0):
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RolloutClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ transport

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        """The response, retrying connection failures and 5xx; a 4xx raises at once with the server's message."""
        for attempt in range(self.max_retries + 1):
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as error:
                problem = f"{type(error).__name__}: {error}"
            else:
                if response.status_code < 400:
                    return response
                problem = f"HTTP {response.status_code}: {_error_message(response)}"
                if response.status_code < 500:
                    raise RolloutError(f"{method} {self.base_url}{path} was refused ({problem})")
            if attempt < self.max_retries:
                wait = self.retry_backoff_s * 2**attempt
                _log.warning(
                    "%s %s failed (%s); retry %d/%d in %.0fs",
                    method,
                    path,
                    problem,
                    attempt + 1,
                    self.max_retries,
                    wait,
                )
                time.sleep(wait)
        raise RolloutError(f"{method} {self.base_url}{path} failed after {self.max_retries + 1} attempts ({problem})")

    # ----------------------------------------------------------------------------------------- sampling

    def generate(
        self,
        prompts: Sequence[Sequence[int]] | Sequence[str],
        sampling_params: SamplingParams | dict | Sequence[SamplingParams | dict] | None = None,
    ) -> list[list[Rollout]]:
        """For each prompt (token ids, or text the server tokenizes), its n samples.

        sampling_params: one set for every prompt, or one per prompt (SGLang requires the same n in all of them).
        """
        if not prompts:
            return []
        per_prompt = isinstance(sampling_params, Sequence) and not isinstance(sampling_params, (str, bytes))
        params = [_sampling(p) for p in (sampling_params if per_prompt else [sampling_params])]
        if per_prompt and len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling_params for {len(prompts)} prompts")
        n = params[0].n
        if any(p.n != n for p in params):
            raise ValueError(f"every prompt must ask for the same n, got {sorted({p.n for p in params})}")
        dumped = [p.model_dump(exclude_defaults=True) for p in params]
        key = "text" if isinstance(prompts[0], str) else "input_ids"
        body = {
            key: [p if isinstance(p, str) else list(map(int, p)) for p in prompts],
            "sampling_params": dumped if per_prompt else dumped[0],
            "return_logprob": True,
        }
        answers = self._request("POST", "/generate", json=body).json()
        if not isinstance(answers, list) or len(answers) != len(prompts) * n:
            count = len(answers) if isinstance(answers, list) else type(answers).__name__
            raise RolloutError(f"/generate answered {count} outputs for {len(prompts)} prompts x n={n}")
        rollouts = [_rollout(GenerateOutput.model_validate(a), k) for k, a in enumerate(answers)]
        return [rollouts[i * n : (i + 1) * n] for i in range(len(prompts))]

    # ------------------------------------------------------------------------------------------ control

    def health(self) -> bool:
        try:
            return self._http.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    def wait_healthy(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.health():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no healthy server at {self.base_url} within {timeout:.0f}s")
            time.sleep(0.5)

    def model_info(self) -> ModelInfo:
        return ModelInfo.model_validate(self._request("GET", "/model_info").json())

    def weight_version(self) -> str | None:
        """The served weight version: /model_info (SGLang >= 0.5.x), else the older /get_weight_version."""
        info = self._request("GET", "/model_info").json()
        if "weight_version" in info:
            return info["weight_version"]
        return self._request("GET", "/get_weight_version").json()["weight_version"]

    def flush_cache(self) -> None:
        self._request("POST", "/flush_cache")

    def update_weights_from_disk(
        self, model_path, *, weight_version: str | None = None, load_format: str | None = None, flush_cache: bool = True
    ) -> str:
        """Ask the server to load the HF checkpoint at `model_path`; returns its message, raises if it refused."""
        body = {
            "model_path": str(model_path),
            "load_format": load_format,
            "flush_cache": flush_cache,
            "weight_version": weight_version,
        }
        try:
            response = self._http.post("/update_weights_from_disk", json=body)
        except httpx.TransportError as error:
            raise RolloutError(f"/update_weights_from_disk at {self.base_url}: {error}") from error
        if response.status_code >= 500:
            raise RolloutError(
                f"/update_weights_from_disk failed: HTTP {response.status_code}: {_error_message(response)}"
            )
        out = UpdateWeightFromDiskReqOutput.model_validate(response.json())
        if not out.success:
            raise RolloutError(f"the server refused the weights at {model_path}: {out.message}")
        return out.message


def _sampling(params: SamplingParams | dict | None) -> SamplingParams:
    return params if isinstance(params, SamplingParams) else SamplingParams(**(params or {}))


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        for key in ("message", "detail"):
            if key in body:
                return str(body[key])
    return str(body)[:500]


def _rollout(out: GenerateOutput, index: int) -> Rollout:
    meta = out.meta_info
    reason = meta.finish_reason
    if reason is None or reason.type not in ("stop", "length"):
        raise RolloutError(f"output {index} ({meta.id}) did not finish normally: finish_reason={reason}")
    if meta.output_token_logprobs is None:
        raise RolloutError(f"output {index} ({meta.id}) has no output_token_logprobs")
    logprobs = [float(lp) for lp, _, _ in meta.output_token_logprobs]
    ids = [int(t) for _, t, _ in meta.output_token_logprobs]
    if out.output_ids is not None and out.output_ids != ids:
        raise RolloutError(f"output {index} ({meta.id}): output_ids and the ids of output_token_logprobs differ")
    if len(ids) != meta.completion_tokens:
        raise RolloutError(
            f"output {index} ({meta.id}): {len(ids)} log-probs for completion_tokens={meta.completion_tokens}"
        )
    return Rollout(
        output_ids=ids,
        logprobs=logprobs,
        text=out.text,
        finish_reason=reason.type,
        matched_stop=reason.matched,
        prompt_tokens=meta.prompt_tokens,
        weight_version=meta.weight_version,
    )


def sync_weights(client: RolloutClient, model, out_dir, *, weight_version: str, max_shard_size="2GB") -> WeightSync:
    """Push `model`'s parameters to the server: save_pretrained to `out_dir` (a fast local path), have the server
    load it, and check it reports `weight_version`. Every process calls this (saving gathers shards); only
    process 0 talks to the server."""
    out_dir = pathlib.Path(out_dir)
    started = time.perf_counter()
    save_pretrained(model, out_dir, max_shard_size=max_shard_size)
    written = time.perf_counter()
    gigabytes = sum(p.stat().st_size for p in out_dir.glob("*.safetensors")) / 1e9 if jax.process_index() == 0 else 0
    if jax.process_index() == 0:
        client.update_weights_from_disk(out_dir, weight_version=weight_version)
        served = client.weight_version()
        if served != weight_version:
            raise RolloutError(
                f"after loading {out_dir} the server reports weight_version {served!r}, not {weight_version!r}"
            )
    sync = WeightSync(weight_version, gigabytes, written - started, time.perf_counter() - written)
    _log.info(
        "weights %s synced: %.3f GB, write %.2fs + load %.2fs = %.2f s/GB",
        weight_version,
        sync.gigabytes,
        sync.write_s,
        sync.load_s,
        sync.seconds_per_gb,
    )
    return sync
