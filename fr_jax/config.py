"""The typed config tree: YAML plus `key.sub=value` overrides, validated by pydantic into frozen objects.

Every section forbids unknown keys, so a typo fails at start-up with the key's dotted path and the keys that
are allowed, instead of silently running with a default. One `stage:` field picks the training stage; each
stage reads its own section (`sft:` or `grpo:`).
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any, Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fr_jax.parallel.rules import Rules, with_overrides


class Device(NamedTuple):
    """What fr_jax.plan needs to know of a chip, with the vendor page its figures come from."""

    memory_bytes: int  # per chip
    kind: Literal["gpu", "tpu", "cpu"]  # GPU: JAX preallocates a fraction per process; TPU: one process per chip
    chips_per_host: int  # a local rollout server sees one host's chips
    source: str


_GB, _GIB = 10**9, 2**30  # a vendor's "GB" is read as 10^9 bytes, the smaller reading: the plan errs on the safe side
PLAN_DEVICES = {
    "tpu-v4": Device(32 * _GIB, "tpu", 4, "cloud.google.com/tpu/docs/v4: HBM2 32 GiB per chip; 4 chips per host"),
    "tpu-v5e": Device(16 * _GB, "tpu", 8, "cloud.google.com/tpu/docs/v5e: HBM 16 GB per chip; 8 chips per host"),
    "tpu-v5p": Device(95 * _GB, "tpu", 4, "cloud.google.com/tpu/docs/v5p: HBM2e 95 GB per chip; 4 chips per host"),
    "tpu-v6e": Device(32 * _GB, "tpu", 8, "cloud.google.com/tpu/docs/v6e: HBM 32 GB per chip; 8 chips per host"),
    "a100-40g": Device(40 * _GB, "gpu", 8, "nvidia.com/en-us/data-center/a100: A100 40GB HBM2; DGX A100: 8 GPUs"),
    "a100-80g": Device(80 * _GB, "gpu", 8, "nvidia.com/en-us/data-center/a100: A100 80GB HBM2e; DGX A100: 8 GPUs"),
    "h100": Device(80 * _GB, "gpu", 8, "nvidia.com/en-us/data-center/h100: H100 SXM 80GB HBM3; DGX H100: 8 GPUs"),
    "h200": Device(141 * _GB, "gpu", 8, "nvidia.com/en-us/data-center/h200: H200 SXM 141GB HBM3e; DGX H200: 8 GPUs"),
    "b200": Device(180 * _GB, "gpu", 8, "docs.nvidia.com/dgx/dgxb200-user-guide: 8 B200 GPUs, 1,440 GB in all"),
    "cpu": Device(24 * _GIB, "cpu", 1, "this project's 2-core development machine: 24 GiB of RAM"),
}


class ConfigError(ValueError):
    """A config the run cannot use; the message names the offending key."""


class Section(BaseModel):
    # strict: YAML already gives typed values, so `true` for a number or 3 for a string is a mistake, not a coercion
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, strict=True)


def check_external_url(section, prefix: str):
    """A service the run does not start (launch: none) needs its url (or, for a fleet, its urls), and a service it
    starts has none."""
    urls = getattr(section, "urls", [])
    if section.url is not None and urls:
        raise ValueError(f"give {prefix}.url or {prefix}.urls, not both")
    if (section.launch == "none") != (section.url is not None or bool(urls)):
        raise ValueError(f"{prefix}.url is required with {prefix}.launch 'none', and only then")
    return section


def service_urls(section) -> list[str]:
    """The URLs of a service the run does not start: its url, or its fleet's urls."""
    return [section.url] if section.url is not None else list(section.urls)


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-5 (no dot) as a float, as YAML 1.2 and every user expect."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:\d[\d_]*)?(?:\.[\d_]*)?[eE][-+]?\d+$|^[-+]?\d[\d_]*\.[\d_]*$|^[-+]?\.\d[\d_]*$"
        r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


def read_yaml(text: str):
    return yaml.load(text, Loader=_YamlLoader)


class ModelSection(Section):
    """Where the network comes from: exactly one of `pretrained`, `config_json`, `architecture`."""

    pretrained: str | None = None  # an HF model dir (config.json + safetensors), or a demo model name ("smollm2")
    config_json: str | None = None  # architecture from an HF config.json, random init
    architecture: dict[str, Any] | None = None  # architecture inline (HF config.json keys), random init
    tokenizer: str | None = None  # HF dir with tokenizer files, a demo name, or "qwen"; default: the pretrained dir
    # the chat template for SFT, GRPO prompts and serving: a built-in name (fr_jax/models/chat_templates: chatml,
    # deepseek-r1-keep-reasoning) or a Jinja file; null: the tokenizer's own
    chat_template: str | None = None
    init_seed: int = 0
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # stored (master) parameter dtype
    remat: Literal["none", "full", "dots"] = "none"
    # query rows per attention block when training: a block's [rows, seq] scores are recomputed for the backward
    # pass instead of kept, so attention memory grows with seq x chunk, not seq^2 (0: one block; set it for 16k)
    attention_chunk: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("pretrained", "config_json", "architecture") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of model.pretrained, model.config_json, model.architecture (got {given or 'none'})"
            )
        return self


class MeshSection(Section):
    """Mesh axis sizes; one of them may be -1, meaning all the devices the others leave."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    # logical axis -> mesh axis, axes or null (replicated): overrides of fr_jax.parallel.rules.DEFAULT_RULES for this
    # run, e.g. {embed: null, mlp: [fsdp, tensor]}; sharding variants without code edits
    rules: dict[str, str | list[str] | None] = Field(default_factory=dict, strict=False)

    @model_validator(mode="after")
    def _sizes(self):
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for name, size in sizes.items():
            if size == 0 or size < -1:
                raise ValueError(f"mesh.{name}={size}: must be a positive integer or -1 (the rest)")
        if sum(s == -1 for s in sizes.values()) > 1:
            raise ValueError(f"mesh: only one axis may be -1, got {sizes}")
        self.sharding_rules()  # unknown logical or mesh axes are named now
        return self

    def sharding_rules(self) -> Rules:
        """The logical-axis table of this run: the default one with `rules` applied."""
        return with_overrides(self.rules)


class DistributedSection(Section):
    """Multi-process start-up; unset fields fall back to FR_JAX_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID."""

    coordinator: str | None = None  # host:port of process 0
    num_processes: int | None = Field(None, ge=1)
    process_id: int | None = Field(None, ge=0)
    local_device_count: int | None = Field(None, ge=1)  # CPU only: fake devices per process


class OptimSection(Section):
    """AdamW with linear warmup then cosine decay to `min_lr_ratio * learning_rate`, after global-norm clipping."""

    learning_rate: float = Field(1e-5, gt=0)
    warmup_steps: int = Field(0, ge=0)
    decay: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    no_decay: tuple[str, ...] = Field(
        ("norm", "bias"), strict=False
    )  # parameters whose path contains one of these get no weight decay
    b1: float = Field(0.9, ge=0, lt=1)
    b2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    clip_grad_norm: float | None = Field(1.0, gt=0)  # null: no clipping


class TrainSection(Section):
    steps: int = Field(..., ge=1)
    batch_size: int = Field(..., ge=1)  # rows (packed sequences) per optimizer step, over all processes
    micro_batches: int = Field(1, ge=1)  # gradient accumulation: batch_size is split into this many
    seed: int = 0
    eval_every: int = Field(0, ge=0)  # 0: evaluate only before and after training
    eval_batches: int = Field(4, ge=0)  # SFT: held-out batches per evaluation; 0 (SFT and GRPO): no evaluation
    export_hf: bool = True  # write <run_dir>/hf with fr_jax.models.hf.save_pretrained at the end

    @model_validator(mode="after")
    def _divisible(self):
        if self.batch_size % self.micro_batches:
            raise ValueError(
                f"train.batch_size={self.batch_size} is not divisible by train.micro_batches={self.micro_batches}"
            )
        return self


def storage_location(value: str) -> str:
    """A place checkpoints or TensorBoard events can go: a local path (file:///x is read as /x) or gs://bucket/path.
    Only these: orbax writes arrays through tensorstore's file or gcs driver, chosen by the path (an s3:// path would
    go to the file driver), and etils.epath, which writes the rest, knows no memory:// or other fsspec schemes."""
    scheme, sep, rest = value.partition("://")
    if not sep:
        return value
    if scheme == "file" and rest.startswith("/"):
        return rest
    if scheme == "gs" and rest.split("/")[0]:
        return value
    raise ValueError(f"{value!r} is neither a local path nor gs://bucket/path (file:///abs/path reads as a local path)")


class CheckpointSection(Section):
    every_steps: int = Field(100, ge=1)
    keep: int = Field(2, ge=1)
    async_save: bool = True
    # where the checkpoints go: a local path or gs://bucket/path (a TPU pod's hosts all write there); null:
    # <run_dir>/checkpoints. Several processes on several hosts need a place they all reach.
    dir: str | None = None

    @field_validator("dir")
    @classmethod
    def _location(cls, v):
        return None if v is None else storage_location(v)


class WandbSection(Section):
    """Weights & Biases beside TensorBoard (`pip install -e .[wandb]`): the same scalars, the text samples and the
    resolved config. offline mode writes under <run_dir>/wandb for a later `wandb sync`."""

    enabled: bool = False
    project: str = "fr_jax"
    entity: str | None = None  # a team or user; null: the API key's default
    name: str | None = None  # the run's display name; null: the run directory's name
    mode: Literal["online", "offline"] = "online"


class MonitorSection(Section):
    tensorboard: bool = True
    # where TensorBoard's event files go: a local path or gs://bucket/path (`tensorboard --logdir` reads both);
    # null: <run_dir>/tensorboard
    tensorboard_dir: str | None = None
    wandb: WandbSection = WandbSection()
    progress_bar: bool = True
    peak_tflops_per_device: float | None = Field(None, gt=0)  # null: measured once at start with a matmul
    # rollout records (docs/records.md): every sample, `sample:K` (whole groups, about K samples a round), or off
    rollouts: str = Field("all", pattern=r"^(all|off|sample:[1-9][0-9]*)$")

    @field_validator("rollouts", mode="before")
    @classmethod
    def _off(cls, value):
        return "off" if value is False else value  # YAML reads a bare `off` as false

    @field_validator("tensorboard_dir")
    @classmethod
    def _location(cls, v):
        return None if v is None else storage_location(v)


class SFTDataSection(Section):
    """Chat records ({"messages": [...]}) from JSONL files, or MBPP reference solutions turned into chats."""

    source: Literal["jsonl", "mbpp"] = "jsonl"
    train_file: str | None = None  # JSONL (source=jsonl)
    eval_file: str | None = None  # JSONL held-out split (source=jsonl); null: no evaluation
    data_dir: str | None = None  # source=mbpp: folder with mbpp.jsonl; default: the data fr_jax ships ($FR_JAX_DATA)
    max_seq_len: int = Field(..., ge=8)  # packed row length in tokens
    on_malformed: Literal["skip", "stop"] = "stop"
    too_long: Literal["skip", "truncate"] = "skip"  # a conversation longer than max_seq_len
    shuffle_seed: int = 0
    shards: int | None = Field(None, ge=1)  # record shards; null: one per process. Fixing it fixes the batch stream
    packing_bins: int = Field(64, ge=1)  # rows packed at once (first-fit); more bins, less padding

    @model_validator(mode="after")
    def _files(self):
        if self.source == "jsonl" and self.train_file is None:
            raise ValueError("sft.data.train_file is required when sft.data.source is 'jsonl'")
        if self.source == "mbpp" and (self.train_file or self.eval_file):
            raise ValueError(
                "sft.data.train_file/eval_file are not used with sft.data.source 'mbpp' (it uses data_dir)"
            )
        return self


class SFTSection(Section):
    data: SFTDataSection


class TaskSetSection(Section):
    """A task set: a benchmark of fr_jax.data.tasks, or your own JSONL (dataset: jsonl; fr_jax.data.task_file)."""

    # humaneval | mbpp | mbpp-sanitized | aflow-mbpp | bigcodebench | bigcodebench-instruct | jsonl
    dataset: str = "mbpp"
    file: str | None = None  # dataset jsonl: one task per line, each with a "split"
    data_dir: str | None = None  # the data sets' folder; default: the data fr_jax ships ($FR_JAX_DATA)

    @model_validator(mode="after")
    def _file(self):
        if (self.dataset == "jsonl") != (self.file is not None):
            raise ValueError("file is required with dataset 'jsonl', and only then")
        return self


class GRPODataSection(TaskSetSection):
    """The GRPO run's coding tasks: its training and held-out splits and their filters."""

    train_split: str = "train"
    eval_split: str = "validation"  # held out: pass@1 before and after training
    max_prompt_tokens: int = Field(512, ge=8)  # tasks whose prompt (chat template applied) is longer are skipped
    max_reference_lines: int | None = Field(None, ge=1)  # keep tasks whose reference solution is this short (easy)
    train_limit: int | None = Field(None, ge=1)  # the first tasks of the split (after the filters above)
    eval_limit: int | None = Field(None, ge=1)
    shuffle_seed: int = 0


class GRPOPromptSection(Section):
    system: str | None = None  # a system message; null: the chat template's default
    instruction: str = "Write the function in a ```python code block."
    show_public_tests: bool = True  # the task's public tests go into the prompt (MBPP's usual prompt)
    chat_template: bool = True  # false: the user text alone (a tokenizer without a chat template)


class GRPORolloutSection(Section):
    """The rollout server, or a fleet of them behind sglang-router (SGLang protocol), and how it samples."""

    launch: Literal["local", "sglang", "none"] = "local"  # none: a server already running at `url` (or `urls`)
    url: str | None = None
    urls: list[str] = Field(default_factory=list, strict=False)  # launch none: a fleet of running servers
    replicas: int = Field(1, ge=1)  # launch local: this many fr_jax.serve servers, used as a fleet
    # sglang-router: started by the run on loopback in front of the workers, generation goes through it (several
    # workers need it); weights always go to every worker. router_policy is its --policy
    router: Literal["none", "sglang-router"] = "none"
    router_policy: Literal["cache_aware", "round_robin", "random", "power_of_two"] = "cache_aware"
    n: int = Field(4, ge=2)  # samples per prompt (a GRPO group)
    prompts_per_step: int = Field(4, ge=1)  # groups per rollout batch
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = -1
    stop: tuple[str, ...] = Field((), strict=False)  # stop strings (kept in the text)
    max_running_requests: int = Field(64, ge=1)  # local/sglang launch: rows per engine batch
    scheduling: Literal["continuous", "static"] = "continuous"  # local launch: static batches are the baseline
    decode_steps: int | None = Field(None, ge=1)  # local launch: decode steps per scheduling round (null: the server's)
    mesh: str = "1,1,-1"  # local launch: data,fsdp,tensor of the server's own devices
    startup_timeout_s: float = Field(600.0, gt=0)
    sync_dir: str | None = None  # where weights are written for the server; null: /dev/shm (else <run_dir>)
    seed_requests: bool = True  # a sampling_seed per sample, from the run's rng (reproducible, also after resume)
    max_retries: int = Field(3, ge=0)

    @model_validator(mode="after")
    def _url(self):
        check_external_url(self, "grpo.rollout")
        if self.replicas > 1 and self.launch != "local":
            raise ValueError(
                "grpo.rollout.replicas > 1 needs grpo.rollout.launch 'local' (running servers: grpo.rollout.urls)"
            )
        if self.servers > 1 and self.router == "none":
            raise ValueError(
                f"grpo.rollout has {self.servers} servers (replicas/urls): set grpo.rollout.router to 'sglang-router',"
                " which spreads the generation sent to one URL"
            )
        return self

    @property
    def servers(self) -> int:
        """How many rollout servers the run samples from."""
        return len(service_urls(self)) if self.launch == "none" else self.replicas


class GRPOSandboxSection(Section):
    launch: Literal["local", "none"] = "local"  # none: a sandbox_service already running at `url` (or `urls`)
    url: str | None = None
    urls: list[str] = Field(default_factory=list, strict=False)  # launch none: a fleet (fr_jax.sandbox.fleet)
    replicas: int = Field(1, ge=1)  # local launch: this many services, used as a fleet
    workers: int | None = Field(None, ge=1)  # local launch: concurrent jailed runs (default: 2 per core)
    insecure: bool = False  # local launch: run without isolation when the jail cannot be set up
    timeout_s: float = Field(5.0, gt=0, le=60)  # per test
    memory_limit_mb: int = Field(1024, ge=64)
    reward_tests: Literal["hidden", "public"] = "hidden"  # which tests of a training task score its reward
    max_retries: int = Field(2, ge=0)  # re-sends of programs the sandbox could not judge
    # local launch: extra interpreters by name (`--python NAME=PATH`), e.g. {bcb: <venv>/bin/python} from
    # `scripts/setup.sh --bcb` for BigCodeBench's libraries
    pythons: dict[str, str] = Field(default_factory=dict, strict=False)
    python: str | None = None  # the named python the solutions and tests run with (null: the service's default)

    @model_validator(mode="after")
    def _url(self):
        return check_external_url(self, "grpo.sandbox")


class GRPOEvalSection(Section):
    """Held-out evaluation (before and after training, every train.eval_every rounds, and python -m fr_jax.eval)."""

    n: int = Field(1, ge=1)  # samples per task
    k: tuple[int, ...] = Field((1,), strict=False)  # pass@k reported for each k <= n
    temperature: float = Field(0.0, ge=0)  # 0: greedy (then n must be 1)
    max_new_tokens: int | None = Field(None, ge=1)  # null: grpo.rollout.max_new_tokens

    @model_validator(mode="after")
    def _samples(self):
        if self.temperature == 0 and self.n > 1:
            raise ValueError("grpo.eval.n > 1 needs grpo.eval.temperature > 0 (greedy samples are all the same)")
        if not self.k or any(k < 1 or k > self.n for k in self.k):
            raise ValueError(f"grpo.eval.k={list(self.k)}: each k must be in [1, grpo.eval.n={self.n}]")
        return self


class GRPOWorkflowSection(Section):
    """grpo.mode: workflow (fr_jax.flow.mode): the policy writes a workflow, the sandbox runs it, its operators call
    the worker LLM named `worker` on the sandbox's allowlist. Used by no other mode."""

    worker: str = "local"
    # an OpenAI-compatible base URL (.../v1) that a sandbox launched here allowlists as `worker`, or "rollout": the
    # rollout server itself (the policy is then its own worker)
    worker_url: str | None = None
    worker_model: str | None = None  # the `model` field sent to the worker (default: the name)
    worker_api_key_env: str | None = None  # a hosted worker (gpt-4o-mini): the variable holding its API key
    max_tokens: int = Field(512, ge=1)  # per worker call
    temperature: float = Field(0.0, ge=0, le=2)  # of the worker: 0 keeps the reward of a design deterministic
    top_p: float = Field(1.0, gt=0, le=1)
    max_operator_calls: int = Field(20, ge=1)  # budgets of one workflow run; the first call past one ends it
    max_worker_tokens: int = Field(32_000, ge=1)
    wall_s: float = Field(120.0, gt=0)


AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k3")


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


class GRPOLossConfig(Section):
    """grpo.loss: every knob of the GRPO loss (fr_jax.rl.grpo; docs/rl.md). Frozen and hashable, so it can be a
    static argument of `jax.jit`."""

    clip_low: float = 0.2  # ratio may fall to 1 - clip_low before a negative-advantage token stops pushing
    clip_high: float = 0.28  # ratio may rise to 1 + clip_high before a positive-advantage token stops pushing
    dual_clip: float | None = None  # c > 1: bounds the loss of a negative-advantage token at c * |A|
    logratio_clamp: float = 20.0  # |log ratio| is clamped before exp, so one wild token cannot overflow
    agg: str = "token-mean"  # one of AGGREGATIONS
    beta: float = 0.0  # KL coefficient; 0 means the reference model is never run (see `needs_reference`)
    kl_estimator: str = "k3"  # one of KL_ESTIMATORS
    is_cap: float | None = 2.0  # truncated importance-sampling cap for rollout/trainer mismatch; None = off
    norm_adv_by_std: bool = True  # False = Dr.GRPO (no std division)
    eps: float = 1e-6
    max_gen_len: int | None = None  # the constant L of seq-mean-token-sum-norm (a GRPO run: max_new_tokens)

    @model_validator(mode="after")
    def _ranges(self):
        if not 0.0 <= self.clip_low < 1.0:
            raise ValueError(f"GRPOLossConfig.clip_low must be in [0, 1), got {self.clip_low}")
        if self.clip_high < 0.0:
            raise ValueError(f"GRPOLossConfig.clip_high must be >= 0, got {self.clip_high}")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"GRPOLossConfig.dual_clip must be > 1 (or None), got {self.dual_clip}")
        if self.logratio_clamp <= 0.0:
            raise ValueError(f"GRPOLossConfig.logratio_clamp must be > 0, got {self.logratio_clamp}")
        check_choice("GRPOLossConfig.agg", self.agg, AGGREGATIONS)
        check_choice("GRPOLossConfig.kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        if self.beta < 0.0:
            raise ValueError(f"GRPOLossConfig.beta must be >= 0, got {self.beta}")
        if self.is_cap is not None and self.is_cap <= 0.0:
            raise ValueError(f"GRPOLossConfig.is_cap must be > 0 (or None), got {self.is_cap}")
        if self.eps <= 0.0:
            raise ValueError(f"GRPOLossConfig.eps must be > 0, got {self.eps}")
        if self.agg == "seq-mean-token-sum-norm" and not (self.max_gen_len and self.max_gen_len > 0):
            raise ValueError("GRPOLossConfig.max_gen_len must be a positive int when agg='seq-mean-token-sum-norm'")
        return self


class RewardConfig(Section):
    """grpo.reward: weights and normalisers of the multi-purpose reward (fr_jax.rl.reward). Defaults: performance
    dominates; see docs/rl.md for the arithmetic."""

    w_performance: float = 1.0
    w_complexity: float = 0.05
    w_efficiency: float = 0.05
    w_format: float = 0.2
    all_pass_bonus: float = 0.0  # added to performance when every test passes
    max_operator_calls: int = 10  # the FlowReasoner prompt's "graph complexity should not exceed 10"
    max_code_tokens: int = 1024  # plain-code answers: length (in tokens) at which the complexity penalty saturates
    max_worker_calls: int = 20  # efficiency saturates at this many worker-LLM calls per query ...
    max_worker_tokens: int = 32_000  # ... this many worker tokens (prompt + completion) ...
    max_latency_s: float = 120.0  # ... and this much wall-clock time for the workflow's run

    @model_validator(mode="after")
    def _ranges(self):
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name.startswith("max_") and value <= 0:
                raise ValueError(f"RewardConfig.{name} must be > 0, got {value}")
            if (name.startswith("w_") or name == "all_pass_bonus") and value < 0:
                raise ValueError(f"RewardConfig.{name} must be >= 0, got {value}")
        return self


class GRPOSection(Section):
    """GRPO with the multi-purpose reward. train.steps counts rounds (rollout batches); train.batch_size counts
    rows (samples) per optimizer step, so a round makes ppo_epochs x prompts_per_step x n / batch_size steps."""

    mode: str = "direct"  # what the policy writes: direct, or workflow (fr_jax.cli.MODES)
    data: GRPODataSection = GRPODataSection()
    prompt: GRPOPromptSection = GRPOPromptSection()
    rollout: GRPORolloutSection = GRPORolloutSection()
    sandbox: GRPOSandboxSection = GRPOSandboxSection()
    eval: GRPOEvalSection = GRPOEvalSection()
    loss: GRPOLossConfig = GRPOLossConfig()
    reward: RewardConfig = RewardConfig()
    ppo_epochs: int = Field(1, ge=1)  # passes over each rollout batch
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal and sample more prompts
    max_sampling_rounds: int = Field(4, ge=1)  # dynamic sampling: rollout calls per round at most
    overlong_buffer: int = Field(0, ge=0)  # DAPO overlong penalty over the last this-many tokens (0: off)
    samples_every: int = Field(5, ge=0)  # rounds between sample prompts/completions in TensorBoard (0: never)
    samples_shown: int = Field(2, ge=1)
    workflow: GRPOWorkflowSection = GRPOWorkflowSection()

    @model_validator(mode="before")
    @classmethod
    def _dr_grpo_length(cls, values):
        """Dr.GRPO's constant L (loss.max_gen_len) defaults to rollout.max_new_tokens."""
        if isinstance(values, dict) and isinstance(values.get("loss"), dict):
            loss = values["loss"]
            if loss.get("agg") == "seq-mean-token-sum-norm" and loss.get("max_gen_len") is None:
                rollout = values.get("rollout") or {}
                max_new = rollout.get("max_new_tokens", GRPORolloutSection.model_fields["max_new_tokens"].default)
                values = {**values, "loss": {**loss, "max_gen_len": max_new}}
        return values

    @model_validator(mode="after")
    def _workflow_worker(self):
        if self.mode == "workflow" and self.sandbox.launch == "local" and self.workflow.worker_url is None:
            raise ValueError(
                "grpo.workflow.worker_url is required with grpo.mode 'workflow' and grpo.sandbox.launch "
                "'local': the sandbox launched here must allowlist the worker (a URL, or 'rollout')"
            )
        return self


class PlanSection(Section):
    """What python -m fr_jax.plan plans for (it never changes how a run trains)."""

    device: str = "h100"  # a key of PLAN_DEVICES
    num_devices: int | None = Field(None, ge=1)  # devices the mesh spans; null: those visible now
    # GPU: the fraction of each GPU one JAX process takes (what XLA_CLIENT_MEM_FRACTION sets); null: that variable (or
    # the older XLA_PYTHON_CLIENT_MEM_FRACTION) where the plan runs, else JAX's default 0.75
    gpu_mem_fraction: float | None = Field(None, gt=0, le=1)

    @field_validator("device")
    @classmethod
    def _known_device(cls, v):
        if v not in PLAN_DEVICES:
            raise ValueError(f"unknown device {v!r}; known: {sorted(PLAN_DEVICES)}")
        return v


class Config(Section):
    stage: Literal["sft", "grpo"]
    run_dir: str
    model: ModelSection
    mesh: MeshSection = MeshSection()
    distributed: DistributedSection = DistributedSection()
    optim: OptimSection = OptimSection()
    train: TrainSection
    checkpoint: CheckpointSection = CheckpointSection()
    monitor: MonitorSection = MonitorSection()
    plan: PlanSection = PlanSection()
    sft: SFTSection | None = None
    grpo: GRPOSection | None = None

    @model_validator(mode="after")
    def _stage_section(self):
        if self.stage not in type(self).model_fields:
            raise ValueError(f"stage: {self.stage!r} is not available in this version")
        if getattr(self, self.stage) is None:
            raise ValueError(f"stage: {self.stage!r} needs a `{self.stage}:` section")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_errors(err: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<top level>"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, e["loc"][:-1])
            lines.append(f"{key}: unknown key; allowed here: {', '.join(allowed)}")
        elif e["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "value_error" and (not e["loc"] or key in msg):
                lines.append(msg)  # a cross-field check whose message already names its keys
                continue
            got = f" (got {e['input']!r})" if e["type"] not in ("model_type", "value_error", "assertion_error") else ""
            lines.append(f"{key}: {msg}{got}")
    return "invalid config:\n  " + "\n  ".join(lines)


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the section at `loc` (for 'unknown key' messages)."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        sub = _section_type(field.annotation) if field else None
        if sub is None:
            return []
        model = sub
    return sorted(model.model_fields)


def _section_type(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Set `a.b.c=value` (value parsed as YAML) in a nested dict, creating sections as needed."""
    tree = dict(tree)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        *parents, leaf = key.split(".")
        node = tree
        for i, part in enumerate(parents):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parents[: i + 1])} is a value, not a section")
            node[part] = child = dict(child)
            node = child
        node[leaf] = read_yaml(raw) if raw else None
    return tree


def parse_config(tree: dict, model: type[BaseModel] = Config) -> Config:
    if not isinstance(tree, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(tree).__name__}")
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, model)) from None


def _yaml_position(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    return f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""


def _yaml_problem(err: yaml.YAMLError) -> str:
    """The parser's own words without its multi-line excerpt of the file."""
    parts = [getattr(err, "context", None), getattr(err, "problem", None)]
    return ", ".join(p for p in parts if p) or str(err).splitlines()[0]


def stage_of(path: str | os.PathLike) -> str | None:
    """The `stage:` a config file names, read before validating it (None when unreadable: load_config names why)."""
    try:
        tree = read_yaml(pathlib.Path(path).read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return tree.get("stage") if isinstance(tree, dict) else None


def load_config(path: str | os.PathLike, overrides: list[str] = (), model: type[BaseModel] = Config) -> Config:
    """Read a YAML config, apply overrides, validate (as `model`: another CLI's config tree may use the same
    machinery). Errors name the key and what is allowed."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = read_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}{_yaml_position(err)}: not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return parse_config(apply_overrides(tree, list(overrides)), model)
