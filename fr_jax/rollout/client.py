"""The one client GRPO uses to sample and to push weights, against real SGLang or fr_jax's server alike.

`RolloutClient.generate` posts SGLang's /generate with return_logprob, retries transport errors and 5xx answers
(never a 4xx: a bad request stays bad), validates every answer with the protocol models, and returns per prompt
its n samples with ids, per-token log-probs and text. A sample whose finish reason is neither "stop" nor
"length", or whose ids, log-probs and token count disagree, raises RolloutError instead of reaching the loss.

`sync_weights` writes the trainer's parameters as an HF directory, asks every server to load it with
/update_weights_from_disk and a weight_version, checks that each now reports that version, and logs the seconds per
GB of the round trip.

A fleet (`RolloutFleet`) is several servers behind sglang-router: generation goes to the router, which spreads it
and re-sends the requests of a server that dies to another; weights go to every server directly, since the router
does not forward them. The router takes one sampling_params per request, so a client made with `concurrency > 1`
sends each prompt as its own request, that many at a time (a sample's seed makes its result the same on any
server).
"""

from __future__ import annotations

import concurrent.futures
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


@dataclasses.dataclass(frozen=True)
class Compiles:
    """Programs a rollout engine compiled, and the seconds of the calls that compiled them."""

    programs: int
    seconds: float

    def __add__(self, other: Compiles) -> Compiles:
        return Compiles(self.programs + other.programs, self.seconds + other.seconds)

    def __sub__(self, earlier: Compiles) -> Compiles:
        return Compiles(self.programs - earlier.programs, self.seconds - earlier.seconds)


class RolloutClient:
    """HTTP client of a rollout server at `base_url` (e.g. "http://127.0.0.1:30000"); `concurrency > 1`: each
    prompt of a generate call is its own request, that many in flight (in front of a router)."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 3600.0,
        max_retries: int = 3,
        retry_backoff_s: float = 2.0,
        concurrency: int = 1,
    ):
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self.concurrency = concurrency
        limits = httpx.Limits(max_connections=max(100, concurrency), max_keepalive_connections=max(20, concurrency))
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, limits=limits)

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
        inputs = [p if isinstance(p, str) else list(map(int, p)) for p in prompts]
        if self.concurrency > 1:
            bodies = [
                {key: [x], "sampling_params": dumped[i if per_prompt else 0], "return_logprob": True}
                for i, x in enumerate(inputs)
            ]
            with concurrent.futures.ThreadPoolExecutor(min(self.concurrency, len(bodies))) as pool:
                answered = list(pool.map(self._generate, bodies))
            answers = [a for one in answered for a in (one if isinstance(one, list) else [one])]
        else:
            body = {key: inputs, "sampling_params": dumped if per_prompt else dumped[0], "return_logprob": True}
            answers = self._generate(body)
        if not isinstance(answers, list) or len(answers) != len(prompts) * n:
            count = len(answers) if isinstance(answers, list) else type(answers).__name__
            raise RolloutError(f"/generate answered {count} outputs for {len(prompts)} prompts x n={n}")
        rollouts = [_rollout(GenerateOutput.model_validate(a), k) for k, a in enumerate(answers)]
        return [rollouts[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _generate(self, body: dict) -> list | dict:
        return self._request("POST", "/generate", json=body).json()

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

    def compiles(self) -> Compiles | None:
        """What fr_jax's server has compiled since it started (/server_info); None from a server that does not
        count it (SGLang) or cannot say."""
        try:
            states = self._request("GET", "/server_info").json().get("internal_states") or [{}]
        except RolloutError:
            return None
        if any("engine_compiles" not in state for state in states):
            return None
        return sum((Compiles(s["engine_compiles"], s["engine_compile_seconds"]) for s in states), Compiles(0, 0.0))

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


@dataclasses.dataclass
class RolloutFleet:
    """Where generation goes (the router, or the only server) and every server that must hold the weights."""

    client: RolloutClient
    workers: list[RolloutClient]

    def load(self, model_path, *, weight_version: str) -> None:
        """Every server loads `model_path` as `weight_version` and reports it (load_weights)."""
        load_weights(self.workers, model_path, weight_version=weight_version)

    def compiles(self) -> Compiles | None:
        """What every server compiled together, so a round's time can say whether it paid compiles; None when a
        server does not count it."""
        counts = [worker.compiles() for worker in self.workers]
        return None if None in counts else sum(counts, Compiles(0, 0.0))


def load_weights(workers: Sequence[RolloutClient], model_path, *, weight_version: str) -> None:
    """Every server loads the HF checkpoint at `model_path` (all at once) and must then report `weight_version`.
    One RolloutError names every server that did not, so no round samples from a fleet on mixed versions."""

    def load(worker: RolloutClient) -> None:
        worker.update_weights_from_disk(model_path, weight_version=weight_version)
        served = worker.weight_version()
        if served != weight_version:
            raise RolloutError(f"it reports weight_version {served!r} after loading")

    with concurrent.futures.ThreadPoolExecutor(len(workers)) as pool:
        futures = [(w.base_url, pool.submit(load, w)) for w in workers]
        failed = [(url, f.exception()) for url, f in futures if f.exception() is not None]
    if failed:
        reasons = "; ".join(f"{url}: {err}" for url, err in failed)
        raise RolloutError(
            f"weight_version {weight_version!r} ({model_path}) did not load on {len(failed)} of {len(workers)} "
            f"rollout server(s), so no round starts on mixed versions: {reasons}"
        )


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


def sync_weights(
    workers: RolloutClient | Sequence[RolloutClient], model, out_dir, *, weight_version: str, max_shard_size="2GB"
) -> WeightSync:
    """Push `model`'s parameters to the server (or every server of a fleet): save_pretrained to `out_dir` (a fast
    local path), have each load it, and check each reports `weight_version`. Every process calls this (saving
    gathers shards); only process 0 talks to the servers."""
    out_dir = pathlib.Path(out_dir)
    started = time.perf_counter()
    save_pretrained(model, out_dir, max_shard_size=max_shard_size)
    written = time.perf_counter()
    gigabytes = sum(p.stat().st_size for p in out_dir.glob("*.safetensors")) / 1e9 if jax.process_index() == 0 else 0
    if jax.process_index() == 0:
        servers = [workers] if isinstance(workers, RolloutClient) else list(workers)
        load_weights(servers, out_dir, weight_version=weight_version)
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
