"""SFT data: chat records -> tokens with assistant-only loss -> packed rows -> per-process batches (grain).

Records are {"messages": [{"role": ..., "content": ...}, ...]}, one JSON object per line. Validation and
tokenization happen once at start-up (SFT sets are thousands of conversations, seconds of work), so every
malformed or over-long record is counted and named by line before the first step, never found mid-run.

Batches are built from `shards` disjoint record shards; process p owns shards p, p+P, p+2P, ... Each shard is a
grain pipeline (shuffle per epoch from a seed, repeat, first-fit packing) whose iterator state is checkpointed.
Because the shard count, not the process count, defines the stream, the global batch at step s is the same for
1 or N processes, and a run can resume on another process count.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

import grain
import grain.experimental
import jinja2
import numpy as np
from tqdm import tqdm

from fr_jax.data.tasks import MBPP_ID_RANGES, default_data_dir

_log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class ChatRecord:
    messages: tuple[dict[str, str], ...]
    origin: str  # "file:line", for error messages


@dataclasses.dataclass
class ReadReport:
    """What reading a file kept and what it dropped (and why, by line)."""

    kept: int = 0
    malformed: list[str] = dataclasses.field(default_factory=list)  # "file:line: reason"
    too_long: list[str] = dataclasses.field(default_factory=list)
    truncated: int = 0

    def summary(self) -> str:
        return (
            f"{self.kept} kept, {len(self.malformed)} malformed skipped, {len(self.too_long)} too long skipped, "
            f"{self.truncated} truncated"
        )


def check_messages(obj: Any) -> tuple[dict[str, str], ...]:
    """The messages of one record, or ValueError saying what is wrong with it."""
    if not isinstance(obj, dict) or "messages" not in obj:
        raise ValueError('expected an object with a "messages" list')
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be an object with string fields role and content")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}].role={m['role']!r}; allowed: {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("no assistant message, so nothing to learn")
    return tuple(out)


def read_chat_jsonl(
    path: str | os.PathLike, *, on_malformed: str = "stop", report: ReadReport | None = None
) -> list[ChatRecord]:
    """Chat records of a JSONL file. A bad line stops with its line number, or is skipped and counted in `report`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SFT data file not found: {path}")
    report = report if report is not None else ReadReport()
    records = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            origin = f"{path}:{line_no}"
            try:
                records.append(ChatRecord(check_messages(json.loads(line)), origin))
            except ValueError as err:  # json.JSONDecodeError is a ValueError
                if on_malformed == "stop":
                    raise ValueError(
                        f"{origin}: malformed record: {err} (set sft.data.on_malformed=skip to skip such records)"
                    ) from None
                report.malformed.append(f"{origin}: {err}")
    return records


def mbpp_chat_records(data_dir: str | os.PathLike | None = None, split: str = "train") -> list[dict]:
    """MBPP reference solutions of one split as single-turn chats: the task and its tests -> the code."""
    if split not in MBPP_ID_RANGES:
        raise ValueError(f"MBPP split {split!r}; known: {sorted(MBPP_ID_RANGES)}")
    path = pathlib.Path(data_dir if data_dir is not None else default_data_dir()) / "mbpp.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (sft.data.data_dir, or $FR_JAX_DATA, names the data folder)")
    chats = []
    for line in path.read_text().splitlines():
        task = json.loads(line)
        if task["task_id"] not in MBPP_ID_RANGES[split]:
            continue
        tests = "\n".join(task["test_list"])
        code = task["code"].replace("\r\n", "\n").strip()
        chats.append(
            {
                "messages": [
                    {"role": "user", "content": f"{task['text']}\nYour code should pass these tests:\n{tests}"},
                    {"role": "assistant", "content": f"```python\n{code}\n```"},
                ],
                "task_id": task["task_id"],
            }
        )
    return chats


REASONING_PROBE = "<think>\nfr_jax reasoning probe\n</think>\n\nfr_jax answer probe"


def check_keeps_reasoning(tokenizer) -> None:
    """Refuse a chat template that drops an assistant turn's reasoning (R1-Distill's own template keeps only what
    follows </think>): SFT on distilled reasoning would silently train on the answers alone."""
    probe = [{"role": "user", "content": "probe"}, {"role": "assistant", "content": REASONING_PROBE}]
    rendered = tokenizer.apply_chat_template(probe, tokenize=False)
    if "fr_jax reasoning probe" not in rendered:
        raise ValueError(
            "the chat template drops the reasoning (<think>...</think>) of assistant turns, so SFT would train on the "
            "answers alone; set model.chat_template to one that keeps it (built-in: deepseek-r1-keep-reasoning, "
            "chatml) or to a Jinja file"
        )


def tokenize_chat(tokenizer, messages: Sequence[dict[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, assistant mask) of a conversation rendered with the tokenizer's chat template.

    The mask covers each assistant reply and the template's end-of-turn after it, found as the text between
    the prompt rendered up to that reply (with the generation prompt) and the conversation rendered through it.
    This needs a template whose renderings of prefixes are prefixes of the whole, and that keeps each reply
    verbatim (R1-style templates drop the <think> part of replies: that would silently train on less); both
    are checked.
    """

    def render(msgs, **kw) -> str:
        try:
            return tokenizer.apply_chat_template(list(msgs), tokenize=False, **kw)
        except jinja2.TemplateError as err:
            raise ValueError(f"chat template failed: {err}") from None

    text = render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render(messages[:i], add_generation_prompt=True))
        through = render(messages[: i + 1])
        if not text.startswith(through) or start > len(through):
            raise ValueError(
                "the chat template renders a conversation prefix differently from the whole "
                "conversation, so assistant tokens cannot be located"
            )
        if m["content"] not in through[start:]:
            raise ValueError(f"the chat template does not keep assistant message {i} verbatim")
        spans.append((start, len(through)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int32)
    starts = np.asarray([s for s, _ in enc["offset_mapping"]], np.int64)
    mask = np.zeros(len(ids), bool)
    for lo, hi in spans:
        mask |= (starts >= lo) & (starts < hi)
    return ids, mask


def to_example(ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Next-token example: predict ids[1:] from ids[:-1], with loss where the predicted token is the assistant's."""
    return {"inputs": ids[:-1], "targets": ids[1:], "loss_mask": mask[1:].astype(np.float32)}


def tokenize_records(
    tokenizer,
    records: Iterable[ChatRecord],
    *,
    max_seq_len: int,
    too_long: str,
    on_malformed: str,
    report: ReadReport,
    desc: str = "tokenizing",
) -> list[dict[str, np.ndarray]]:
    examples = []
    records = list(records)
    for rec in tqdm(records, desc=desc, unit="chat", disable=None, leave=False):
        try:
            ids, mask = tokenize_chat(tokenizer, rec.messages)
        except ValueError as err:
            if on_malformed == "stop":
                raise ValueError(f"{rec.origin}: {err}") from None
            report.malformed.append(f"{rec.origin}: {err}")
            continue
        if len(ids) - 1 > max_seq_len:
            if too_long == "skip":
                report.too_long.append(f"{rec.origin}: {len(ids)} tokens")
                continue
            ids, mask = ids[: max_seq_len + 1], mask[: max_seq_len + 1]
            report.truncated += 1
        if not mask[1:].any():
            report.too_long.append(f"{rec.origin}: no assistant token within max_seq_len")
            continue
        examples.append(to_example(ids, mask))
    report.kept += len(examples)
    return examples


def _packed_rows(
    examples: list[dict], *, seq_len: int, packing_bins: int, seed: int, shuffle: bool, repeat: bool
) -> grain.IterDataset:
    ds = grain.MapDataset.source(examples)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat(None)
    return grain.experimental.FirstFitPackIterDataset(
        ds.to_iter_dataset(),
        length_struct={"inputs": seq_len, "targets": seq_len, "loss_mask": seq_len},
        num_packing_bins=packing_bins,
        seed=seed,
        shuffle_bins=shuffle,
    )


def _as_batch(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "input_ids": rows["inputs"],
        "targets": rows["targets"],
        "loss_mask": rows["loss_mask"],
        "segment_ids": rows["inputs_segment_ids"],
        "positions": rows["inputs_positions"],
    }


class PackedBatches:
    """This process's part of each global batch: arrays [micro_batches, local_rows / micro_batches, seq_len].

    Along the row axis the layout is shard-major within each micro-batch (shard s's rows of micro-batch m
    precede shard s+1's), the order in which processes hold rows of the global batch.
    """

    def __init__(
        self,
        examples_by_shard: dict[int, list[dict]],
        *,
        rows_per_shard: int,
        micro_batches: int,
        seq_len: int,
        packing_bins: int,
        seed: int,
    ):
        if rows_per_shard % micro_batches:
            raise ValueError(f"rows per shard {rows_per_shard} not divisible by micro_batches {micro_batches}")
        empty = [s for s, ex in examples_by_shard.items() if not ex]
        if empty:
            raise ValueError(f"data shards {empty} have no usable records")
        self.micro_batches = micro_batches
        self._iters = {
            s: iter(
                _packed_rows(
                    ex,
                    seq_len=seq_len,
                    packing_bins=max(packing_bins, rows_per_shard),
                    seed=seed,
                    shuffle=True,
                    repeat=True,
                ).batch(rows_per_shard)
            )
            for s, ex in sorted(examples_by_shard.items())
        }

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [_as_batch(next(it)) for it in self._iters.values()]
        m = self.micro_batches
        return {k: np.concatenate([p[k].reshape(m, -1, *p[k].shape[1:]) for p in parts], axis=1) for k in BATCH_KEYS}

    def get_state(self) -> dict[str, Any]:
        return {"shards": {str(s): it.get_state() for s, it in self._iters.items()}}

    def set_state(self, states: Sequence[dict[str, Any]]) -> None:
        """Restore from the states saved by every process of the earlier run (any process count)."""
        saved = {}
        for state in states:
            saved.update(state["shards"])
        missing = [s for s in self._iters if str(s) not in saved]
        if missing:
            raise ValueError(
                f"checkpoint has no data state for shards {missing} (saved: {sorted(saved)}); "
                "sft.data.shards must match the run that wrote it"
            )
        for s, it in self._iters.items():
            it.set_state(saved[str(s)])


def fixed_batches(
    examples: list[dict], *, rows: int, micro_batches: int, seq_len: int, packing_bins: int, max_batches: int
) -> list[dict[str, np.ndarray]]:
    """Up to `max_batches` global batches of the examples in order (evaluation: same rows every time).

    A partial last batch is padded with empty rows (segment 0, no loss).
    """
    it = iter(
        _packed_rows(
            examples, seq_len=seq_len, packing_bins=max(packing_bins, rows), seed=0, shuffle=False, repeat=False
        )
    )
    batches = []
    rows_left = list(it)
    for b in range(max_batches):
        chunk = rows_left[b * rows : (b + 1) * rows]
        if not chunk:
            break
        stacked = {k: np.stack([r[k] for r in chunk]) for k in chunk[0]}
        batch = _as_batch(stacked)
        pad = rows - len(chunk)
        batch = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}
        batches.append({k: v.reshape(micro_batches, -1, *v.shape[1:]) for k, v in batch.items()})
    return batches


@dataclasses.dataclass
class SFTData:
    train: PackedBatches
    eval_batches: list[dict[str, np.ndarray]]  # global batches; each process slices its rows
    train_report: ReadReport
    eval_report: ReadReport


def load_records(data_cfg, split: str, report: ReadReport) -> list[ChatRecord]:
    """Chat records of the train or eval split as the config describes them ([] for a missing eval split)."""
    if data_cfg.source == "mbpp":
        chats = mbpp_chat_records(data_cfg.data_dir, "train" if split == "train" else "validation")
        return [ChatRecord(check_messages(c), f"mbpp task {c['task_id']}") for c in chats]
    path = data_cfg.train_file if split == "train" else data_cfg.eval_file
    if path is None:
        return []
    return read_chat_jsonl(path, on_malformed=data_cfg.on_malformed, report=report)


def build_sft_data(
    data_cfg,
    tokenizer,
    *,
    batch_size: int,
    micro_batches: int,
    eval_batches: int,
    process_index: int,
    process_count: int,
) -> SFTData:
    """The train stream for this process (its shards) and the fixed evaluation batches (global)."""
    shards = data_cfg.shards or process_count
    if shards % process_count:
        raise ValueError(f"sft.data.shards={shards} is not a multiple of the process count {process_count}")
    if batch_size % (shards * micro_batches):
        raise ValueError(
            f"train.batch_size={batch_size} must be divisible by sft.data.shards x train.micro_batches "
            f"= {shards} x {micro_batches}"
        )
    common = dict(max_seq_len=data_cfg.max_seq_len, too_long=data_cfg.too_long, on_malformed=data_cfg.on_malformed)
    train_report, eval_report = ReadReport(), ReadReport()
    records = load_records(data_cfg, "train", train_report)
    mine = range(process_index, shards, process_count)
    by_shard = {
        s: tokenize_records(tokenizer, records[s::shards], report=train_report, desc=f"tokenizing shard {s}", **common)
        for s in mine
    }
    eval_examples = []
    if eval_batches:
        eval_records = load_records(data_cfg, "eval", eval_report)
        eval_examples = tokenize_records(tokenizer, eval_records, report=eval_report, desc="tokenizing eval", **common)
    for name, report in (("train", train_report), ("eval", eval_report)):
        _log.info("SFT %s data: %s", name, report.summary())
        for line in (report.malformed + report.too_long)[:10]:
            _log.warning("SFT %s: skipped %s", name, line)
    train = PackedBatches(
        by_shard,
        rows_per_shard=batch_size // shards,
        micro_batches=micro_batches,
        seq_len=data_cfg.max_seq_len,
        packing_bins=data_cfg.packing_bins,
        seed=data_cfg.shuffle_seed,
    )
    evals = (
        fixed_batches(
            eval_examples,
            rows=batch_size,
            micro_batches=micro_batches,
            seq_len=data_cfg.max_seq_len,
            packing_bins=data_cfg.packing_bins,
            max_batches=eval_batches,
        )
        if eval_examples
        else []
    )
    return SFTData(train, evals, train_report, eval_report)
