"""The SFT data pipeline: chat template + assistant-only loss, malformed records, packing, sharding, state."""

import copy
import json

import numpy as np
import pytest

from fr_jax.config import SFTDataSection
from fr_jax.data.sft import (
    PackedBatches,
    ReadReport,
    build_sft_data,
    mbpp_chat_records,
    read_chat_jsonl,
    tokenize_chat,
    tokenize_records,
)
from fr_jax.models.tokenizer import load_tokenizer

CHAT = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "Add two numbers."},
    {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
    {"role": "user", "content": "Now subtract."},
    {"role": "assistant", "content": "def sub(a, b):\n    return a - b"},
]


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module", params=["smollm2", "qwen"])
def tokenizer(request, smollm2_tokenizer, qwen_tok):
    return smollm2_tokenizer if request.param == "smollm2" else qwen_tok


def test_loss_mask_covers_exactly_the_assistant_turns(tokenizer):
    ids, mask = tokenize_chat(tokenizer, CHAT)
    assert len(ids) == len(mask) and mask.any() and not mask.all()
    # the masked tokens, run by run, are each assistant reply followed by the end-of-turn token
    runs, current = [], []
    for token, on in zip(ids, mask):
        if on:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    eot = tokenizer.eos_token
    assert [r.strip() for r in runs] == [CHAT[2]["content"] + eot, CHAT[4]["content"] + eot]
    # nothing of the user turns or the system prompt is trained on
    assert "Add two numbers" not in tokenizer.decode(ids[mask]) and "You write Python" not in tokenizer.decode(
        ids[mask]
    )
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(CHAT, tokenize=False)


def test_template_that_rewrites_replies_is_refused(smollm2_tokenizer):
    """An R1-style template that drops the <think> part of replies would silently train on less: refused."""
    r1_like = copy.copy(smollm2_tokenizer)
    r1_like.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{{ m['content'].split('</think>')[-1] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>plan</think>answer"}]
    with pytest.raises(ValueError, match="does not keep assistant message 1 verbatim"):
        tokenize_chat(r1_like, chat)
    ids, mask = tokenize_chat(r1_like, [chat[0], {"role": "assistant", "content": "answer"}])
    assert r1_like.decode(ids[mask]).strip() == "answer<|im_end|>"


def test_malformed_records_are_reported_by_line(tmp_path):
    good = json.dumps({"messages": CHAT[1:3]})
    path = tmp_path / "data.jsonl"
    path.write_text(
        "\n".join(
            [
                good,
                "{not json",
                good,
                json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
                json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
                "",
                good,
            ]
        )
        + "\n"
    )
    with pytest.raises(ValueError, match=r"data.jsonl:2: malformed record.*on_malformed=skip"):
        read_chat_jsonl(path, on_malformed="stop")
    report = ReadReport()
    records = read_chat_jsonl(path, on_malformed="skip", report=report)
    assert [r.origin.rsplit(":", 1)[1] for r in records] == ["1", "3", "7"]
    assert [m.split(": ", 1)[0].rsplit(":", 1)[1] for m in report.malformed] == ["2", "4", "5"]
    assert "no assistant message" in report.malformed[1] and "role='robot'" in report.malformed[2]


def test_too_long_records_are_skipped_or_truncated(smollm2_tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    long_reply = "x = 1\n" * 200
    path.write_text(
        "\n".join(
            json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": c}]})
            for c in ["y = 2", long_reply]
        )
        + "\n"
    )
    records = read_chat_jsonl(path)
    skip, trunc = ReadReport(), ReadReport()
    kept = tokenize_records(
        smollm2_tokenizer, records, max_seq_len=64, too_long="skip", on_malformed="stop", report=skip
    )
    assert len(kept) == 1 and len(skip.too_long) == 1 and "d.jsonl:2" in skip.too_long[0]
    kept = tokenize_records(
        smollm2_tokenizer, records, max_seq_len=64, too_long="truncate", on_malformed="stop", report=trunc
    )
    assert len(kept) == 2 and trunc.truncated == 1 and len(kept[1]["inputs"]) == 64


def test_mbpp_chat_records():
    train = mbpp_chat_records(split="train")
    assert len(train) == 374
    assert all(601 <= r["task_id"] <= 974 for r in train)
    first = train[0]["messages"]
    assert [m["role"] for m in first] == ["user", "assistant"]
    assert "assert " in first[0]["content"] and first[1]["content"].startswith("```python\n")
    assert "\r" not in first[1]["content"]
    assert len(mbpp_chat_records(split="validation")) == 90


def _data(tokenizer, **kw):
    cfg = SFTDataSection(
        source="mbpp",
        max_seq_len=256,
        packing_bins=8,
        **{k: v for k, v in kw.items() if k in ("shards", "shuffle_seed")},
    )
    args = dict(batch_size=8, micro_batches=2, eval_batches=1, process_index=0, process_count=1)
    args.update({k: v for k, v in kw.items() if k in ("process_index", "process_count")})
    return build_sft_data(cfg, tokenizer, **args)


def test_packed_batches_layout_and_masks(smollm2_tokenizer):
    data = _data(smollm2_tokenizer)
    batches = [next(data.train) for _ in range(4)]
    assert {k: v.shape for k, v in batches[0].items()} == {k: (2, 4, 256) for k in batches[0]}
    assert max(b["segment_ids"].max() for b in batches) >= 2  # conversations share rows
    for batch in batches:
        seg, pos, mask = batch["segment_ids"], batch["positions"], batch["loss_mask"]
        for row_seg, row_pos in zip(seg.reshape(-1, 256), pos.reshape(-1, 256)):
            for s in set(row_seg) - {0}:
                np.testing.assert_array_equal(row_pos[row_seg == s], np.arange((row_seg == s).sum()))  # from 0
        assert not mask[seg == 0].any()  # padding never carries loss
        # targets are the next input token within a segment
        same = (seg[..., 1:] == seg[..., :-1]) & (seg[..., 1:] != 0)
        np.testing.assert_array_equal(batch["targets"][..., :-1][same], batch["input_ids"][..., 1:][same])
    assert len(data.eval_batches) == 1 and data.eval_batches[0]["loss_mask"].sum() > 0


def test_shuffle_is_seeded_and_state_restores(smollm2_tokenizer):
    a, b = _data(smollm2_tokenizer), _data(smollm2_tokenizer)
    c = _data(smollm2_tokenizer, shuffle_seed=1)
    first_a, first_b, first_c = next(a.train), next(b.train), next(c.train)
    np.testing.assert_array_equal(first_a["input_ids"], first_b["input_ids"])
    assert not np.array_equal(first_a["input_ids"], first_c["input_ids"])
    state = json.loads(json.dumps(a.train.get_state()))  # as it goes through a checkpoint
    expected = [next(a.train) for _ in range(3)]
    b.train.set_state([state])
    for want in expected:
        got = next(b.train)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_process_shards_assemble_the_single_process_batch(smollm2_tokenizer):
    """With shards fixed, process p of 2 holds its rows of the same global batch one process builds alone."""
    whole = _data(smollm2_tokenizer, shards=2)
    parts = [_data(smollm2_tokenizer, shards=2, process_index=p, process_count=2) for p in range(2)]
    for _ in range(2):
        batch = next(whole.train)
        local = [next(p.train) for p in parts]
        for k in batch:
            np.testing.assert_array_equal(batch[k], np.concatenate([part[k] for part in local], axis=1))
    # a checkpoint written by the two processes restores the one-process run (and vice versa)
    whole.train.set_state([p.train.get_state() for p in parts])
    np.testing.assert_array_equal(
        next(whole.train)["input_ids"], np.concatenate([next(p.train)["input_ids"] for p in parts], axis=1)
    )
    with pytest.raises(ValueError, match=r"no data state for shards \[1\]"):
        whole.train.set_state([parts[0].train.get_state()])


def test_bad_shard_and_batch_settings_are_refused(smollm2_tokenizer):
    with pytest.raises(ValueError, match="sft.data.shards=3 is not a multiple of the process count 2"):
        _data(smollm2_tokenizer, shards=3, process_count=2)
    with pytest.raises(ValueError, match="must be divisible by sft.data.shards x train.micro_batches"):
        _data(smollm2_tokenizer, shards=8)
    with pytest.raises(ValueError, match="have no usable records"):
        PackedBatches({0: []}, rows_per_shard=2, micro_batches=1, seq_len=16, packing_bins=2, seed=0)
