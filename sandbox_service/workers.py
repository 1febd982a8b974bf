"""The worker LLMs that workflows may call: an allowlist fixed when the service starts, never a URL from a request.

Configured by `python -m sandbox_service --worker NAME=URL[,model=M] --workers-file F`, or, without those flags,
by the environment the service starts with (specs as for --worker):
  SANDBOX_WORKERS="local=http://127.0.0.1:30000/v1,model=smollm2;big=http://10.0.0.5:8000/v1"
  SANDBOX_WORKERS_FILE=workers.json     # {"local": {"url": "http://127.0.0.1:30000/v1", "model": "...",
                                        #            "api_key_env": "OPENAI_API_KEY"}, ...}
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

WORKERS_ENV, WORKERS_FILE_ENV = "SANDBOX_WORKERS", "SANDBOX_WORKERS_FILE"
_WORKER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class WorkerEndpoint(BaseModel):
    """An OpenAI-compatible server the workflows of this service may call, by `name` only."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    url: str = Field(description="base URL ending in /v1; requests go to {url}/chat/completions")
    model: str | None = Field(None, description="the `model` field sent (default: the name)")
    api_key_env: str | None = Field(None, description="environment variable holding a bearer token, if any")

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not _WORKER_NAME.match(name):
            raise ValueError(f"worker name {name!r} must be 1-64 characters of letters, digits, '_', '.', '-'")
        return name

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        if not re.match(r"^https?://[^/\s]+", url):
            raise ValueError(f"worker url {url!r} must start with http:// or https://")
        return url.rstrip("/")


def parse_worker_spec(spec: str) -> WorkerEndpoint:
    """'name=URL[,model=M][,api_key_env=VAR]' -> WorkerEndpoint; ValueError names what is wrong."""
    head, *options = spec.strip().split(",")
    name, sep, url = head.partition("=")
    if not sep:
        raise ValueError(f"worker spec {spec!r}: expected name=URL[,model=M][,api_key_env=VAR]")
    fields: dict[str, str] = {"name": name.strip(), "url": url.strip()}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key.strip() not in ("model", "api_key_env"):
            raise ValueError(f"worker spec {spec!r}: unknown option {option!r} (known: model=, api_key_env=)")
        fields[key.strip()] = value.strip()
    try:
        return WorkerEndpoint(**fields)
    except ValidationError as e:
        raise ValueError(f"worker spec {spec!r}: {'; '.join(err['msg'] for err in e.errors())}") from None


def load_workers(specs: Sequence[str] = (), file: Path | None = None) -> dict[str, WorkerEndpoint]:
    """The allowlist from specs and/or a JSON file {name: {url, model?, api_key_env?}}; duplicates are errors."""
    endpoints = [parse_worker_spec(spec) for spec in specs if spec.strip()]
    if file is not None:
        try:
            document = json.loads(Path(file).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"worker file {file}: {e}") from None
        if not isinstance(document, dict):
            raise ValueError(f"worker file {file}: expected an object {{name: {{url, model?, api_key_env?}}}}")
        for name, entry in document.items():
            if not isinstance(entry, dict):
                raise ValueError(f"worker file {file}: entry {name!r} must be an object with a url")
            try:
                endpoints.append(WorkerEndpoint(name=name, **entry))
            except ValidationError as e:
                problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
                raise ValueError(f"worker file {file}: entry {name!r}: {problems}") from None
            except TypeError as e:
                raise ValueError(f"worker file {file}: entry {name!r}: {e}") from None
    workers: dict[str, WorkerEndpoint] = {}
    for endpoint in endpoints:
        if endpoint.name in workers:
            raise ValueError(f"worker {endpoint.name!r} is configured twice")
        workers[endpoint.name] = endpoint
    return workers


def workers_from_env(environ: Mapping[str, str] = os.environ) -> dict[str, WorkerEndpoint]:
    specs = re.split(r"[;\s]+", environ.get(WORKERS_ENV, ""))
    file = environ.get(WORKERS_FILE_ENV)
    return load_workers(specs, Path(file) if file else None)
