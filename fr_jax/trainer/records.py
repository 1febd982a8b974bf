"""Rollout records: one JSON line per sample, written off the training thread (format: docs/records.md).

The GRPO loop hands `RecordWriter.write_round` the round's samples as plain dicts, the evaluation hands
`write_eval` its samples; a background thread encodes them (dataclasses such as the sandbox client's `Evaluation`
and `WorkflowRun` or a `ParsedDesign` become their fields), moves each prompt's text into the run's prompts table
(one file per distinct prompt, written once) and writes one gzipped JSONL file per call, atomically (temporary
file, fsync, rename: a reader never sees half a file). The queue between them is small: when it is full the caller
waits, so nothing is ever dropped. A failed write is raised by the next call (or by `close`), never swallowed.

What is kept follows the policy (`monitor.rollouts`): `all`, `off`, or `sample:K`, which keeps whole groups,
ceil(K / group size) of them per round, chosen by a generator seeded with (seed, round); a group is kept whole so
its variance, its advantages and any identical completions stay visible. Evaluations are written whole unless the
policy is `off`.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import math
import os
import pathlib
import queue
import random
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

FORMAT_VERSION = 1
ROLLOUTS_DIR = "rollouts"
EVAL_RECORDS_DIR = pathlib.Path("eval") / "records"
PROMPTS_DIR = "prompts"

# The fields of a record in the order they are written (docs/records.md). The caller gives REQUIRED_FIELDS and
# any of the others it has (absent ones are written as null); the writer sets format_version, kind, round, method
# (and split, for an evaluation) and replaces `prompt` (text) by `prompt_sha`.
FIELDS = (
    "format_version",
    "kind",
    "round",
    "method",
    "split",
    "task_id",
    "dataset",
    "mode",
    "group",
    "sample",
    "prompt_sha",
    "completion",
    "design",
    "solution",
    "weight_version",
    "seed",
    "finish_reason",
    "response_tokens",
    "well_formed",
    "passed",
    "total",
    "worker_calls",
    "worker_tokens",
    "sandbox",
    "workflow",
    "reward",
    "advantage",
    "group_has_variance",
)
REQUIRED_FIELDS = frozenset({"task_id", "group", "sample", "completion", "reward"})
STAMPED_FIELDS = frozenset({"format_version", "kind", "round", "method", "prompt_sha"})  # set by the writer
_GIVEN_FIELDS = frozenset(FIELDS) - STAMPED_FIELDS | {"prompt"}
_AFTER_ROUND = re.compile(r"(?:.*_)?round_(\d{5,})\.jsonl\.gz")  # a round's file, or an eval run after it


class RecordError(ValueError):
    """Records that cannot be written or read as they are (the message names the record and the field)."""


@dataclasses.dataclass(frozen=True)
class RecordPolicy:
    """Which samples are written: every one (`all`), none (`off`), or `sample:K` whole groups (module docstring)."""

    keep: str  # all | sample | off
    samples: int = 0  # K of sample:K

    @classmethod
    def parse(cls, text: str) -> RecordPolicy:
        if text in ("all", "off"):
            return cls(text)
        match = re.fullmatch(r"sample:(\d+)", text)
        if match and int(match.group(1)) >= 1:
            return cls("sample", int(match.group(1)))
        raise RecordError(f"rollout record policy {text!r} is not one of all, off, sample:K (K >= 1, e.g. sample:32)")

    def select(self, records: Sequence[Mapping[str, Any]], *, seed: int, round_index: int) -> list[Mapping[str, Any]]:
        """The records this policy keeps of one round, in their order."""
        if self.keep != "sample":
            return list(records) if self.keep == "all" else []
        groups: dict[Any, int] = {}
        for record in records:
            groups[record["group"]] = groups.get(record["group"], 0) + 1
        size = max(groups.values(), default=1)
        wanted = min(len(groups), math.ceil(self.samples / size))
        kept = set(random.Random(f"{seed}/{round_index}").sample(sorted(groups), wanted))
        return [record for record in records if record["group"] in kept]


def rollouts_path(run_dir: str | os.PathLike, round_index: int) -> pathlib.Path:
    return pathlib.Path(run_dir) / ROLLOUTS_DIR / f"round_{round_index:05d}.jsonl.gz"


def eval_records_path(
    run_dir: str | os.PathLike, split: str, method: str, round_index: int | None = None
) -> pathlib.Path:
    """<run_dir>/eval/records/<split>_<method>.jsonl.gz; an evaluation inside a GRPO run adds _round_NNNNN."""
    for name, value in (("split", split), ("method", method)):
        if not re.fullmatch(r"[A-Za-z0-9._-]+", value):
            raise RecordError(
                f"eval record {name} {value!r} must be letters, digits, '.', '_' or '-' (it names a file)"
            )
    suffix = "" if round_index is None else f"_round_{round_index:05d}"
    return pathlib.Path(run_dir) / EVAL_RECORDS_DIR / f"{split}_{method}{suffix}.jsonl.gz"


def prompt_sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    """json's fallback: dataclasses as their fields, numpy scalars and arrays as Python numbers and lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"a record holds a {type(value).__name__}, which has no JSON form")


def _check(records: Sequence[Mapping[str, Any]], where: str) -> None:
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise RecordError(f"{where} record {i} is a {type(record).__name__}, not a dict")
        keys = record.keys()
        missing, unknown = REQUIRED_FIELDS - keys, keys - _GIVEN_FIELDS
        if missing or unknown:
            raise RecordError(
                f"{where} record {i} ({record.get('task_id', '?')}): "
                + (f"missing fields {sorted(missing)} " if missing else "")
                + (f"unknown fields {sorted(unknown)} " if unknown else "")
                + "(the fields are listed in docs/records.md)"
            )
        reward = record["reward"]
        if not isinstance(reward, Mapping) or "total" not in reward:
            raise RecordError(f"{where} record {i} ({record['task_id']}): reward must be a dict with a 'total'")


@dataclasses.dataclass
class _Job:
    path: pathlib.Path
    records: list[Mapping[str, Any]]
    stamp: dict[str, Any]


class RecordWriter:
    """Writes records in a background thread (module docstring). Only the process that scores samples uses one.

    `start_round`: a run resumed after round s removes the record files of rounds (and evaluations) after s, written
    by the attempt that died after its last checkpoint, so the records read as one uninterrupted run, like
    metrics.jsonl."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        policy: str | RecordPolicy = "all",
        *,
        seed: int = 0,
        max_pending: int = 2,
        start_round: int | None = None,
    ):
        self.run_dir = pathlib.Path(run_dir)
        self.policy = policy if isinstance(policy, RecordPolicy) else RecordPolicy.parse(policy)
        self.seed = seed
        self._prompts_dir = self.run_dir / PROMPTS_DIR
        self._known_prompts: set[str] = set()
        self._error: BaseException | None = None
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_pending)
        self._thread: threading.Thread | None = None
        if self.policy.keep == "off":
            return
        rollouts = self.run_dir / ROLLOUTS_DIR
        for folder in (rollouts, self.run_dir / EVAL_RECORDS_DIR, self._prompts_dir):
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.glob(".*.partial"):  # a writer killed mid-file
                stale.unlink()
        if start_round is not None:
            for path in [*rollouts.iterdir(), *(self.run_dir / EVAL_RECORDS_DIR).iterdir()]:
                match = _AFTER_ROUND.fullmatch(path.name)
                if match and int(match.group(1)) > start_round:
                    path.unlink()
        self._known_prompts = {path.stem for path in self._prompts_dir.glob("*.txt")}
        self._thread = threading.Thread(target=self._drain, name="fr_jax-records", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------- the caller

    def write_round(self, round_index: int, records: Sequence[Mapping[str, Any]]) -> None:
        """The samples of GRPO round `round_index` (the metrics step, 1-based), or the policy's share of them.
        The writer owns the dicts from now on: do not change them afterwards."""
        if self._thread is None:
            return
        _check(records, f"round {round_index}")
        kept = self.policy.select(records, seed=self.seed, round_index=round_index)
        stamp = {"kind": "grpo", "round": round_index, "method": None}
        self._put(_Job(rollouts_path(self.run_dir, round_index), kept, stamp))

    def write_eval(
        self, split: str, method: str, records: Sequence[Mapping[str, Any]], *, round_index: int | None = None
    ) -> None:
        """Every sample of one evaluation of `method` (direct, workflow, direct_worker, ...) on `split`;
        `round_index`: the GRPO round after which it ran (0: before training), None for a standalone evaluation."""
        if self._thread is None:
            return
        path = eval_records_path(self.run_dir, split, method, round_index)
        _check(records, f"eval {split}/{method}")
        self._put(_Job(path, list(records), {"kind": "eval", "round": round_index, "method": method, "split": split}))

    def close(self) -> None:
        """Wait until everything handed over is on disk; raise if a write failed."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self._raise_failure()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _put(self, job: _Job) -> None:
        self._raise_failure()
        self._queue.put(job)  # blocks while max_pending jobs wait: the caller slows down, nothing is dropped

    def _raise_failure(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RecordError(f"writing rollout records failed: {type(error).__name__}: {error}") from error

    # ------------------------------------------------------------------------------------- the background

    def _drain(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                self._write(job)
            except BaseException as error:  # kept for the caller's next call: a lost record must be loud
                self._error = self._error or error

    def _write(self, job: _Job) -> None:
        lines = []
        for record in job.records:
            out = dict.fromkeys(FIELDS)
            out.update(record)
            out.update(job.stamp)
            out["format_version"] = FORMAT_VERSION
            text = out.pop("prompt", None)
            if text is not None:
                out["prompt_sha"] = self._store_prompt(text)
            lines.append(json.dumps(out, default=_plain, ensure_ascii=False))
        _atomic_write(job.path, gzip.compress(("\n".join(lines) + "\n" if lines else "").encode(), mtime=0))

    def _store_prompt(self, text: str) -> str:
        sha = prompt_sha(text)
        if sha not in self._known_prompts:
            _atomic_write(self._prompts_dir / f"{sha}.txt", text.encode())
            self._known_prompts.add(sha)
        return sha


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    partial.replace(path)


# ---------------------------------------------------------------------------------------------- reading


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of one file, in order (prompts stay as `prompt_sha`: see read_prompts)."""
    path = pathlib.Path(path)
    records = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise RecordError(f"{path}:{line_no}: not a JSON record ({err})") from None
            version = record.get("format_version")
            if version != FORMAT_VERSION:
                raise RecordError(
                    f"{path}:{line_no}: record format version {version!r}; this fr_jax reads version "
                    f"{FORMAT_VERSION} (docs/records.md)"
                )
            records.append(record)
    return records


def record_files(run_dir: str | os.PathLike) -> list[pathlib.Path]:
    """A run's record files: the GRPO rounds in order, then the evaluations by name."""
    run_dir = pathlib.Path(run_dir)
    rounds = sorted((run_dir / ROLLOUTS_DIR).glob("round_*.jsonl.gz"))
    return rounds + sorted((run_dir / EVAL_RECORDS_DIR).glob("*.jsonl.gz"))


def read_prompts(run_dir: str | os.PathLike, shas: Iterable[str] | None = None) -> dict[str, str]:
    """The prompts table: sha -> prompt text (those in `shas`, or all)."""
    folder = pathlib.Path(run_dir) / PROMPTS_DIR
    paths = folder.glob("*.txt") if shas is None else (folder / f"{sha}.txt" for sha in set(shas))
    return {path.stem: path.read_text(encoding="utf-8") for path in paths if path.is_file()}
