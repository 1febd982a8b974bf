"""model.chat_template: reasoning kept or the SFT stage refused, the checkpoint's own vocabulary, and a template
that travels with the tokenizer to the rollout server and the export."""

import pathlib

import pytest

from fr_jax.config import ConfigError, parse_config
from fr_jax.data.sft import REASONING_PROBE, check_keeps_reasoning, tokenize_chat
from fr_jax.models.loading import load_tokenizer
from fr_jax.models.tokenizer import CHAT_TEMPLATES_DIR, chat_template_text
from fr_jax.trainer.runtime import start_runtime
from fr_jax.trainer.sft import run_sft

R1_LIKE = pathlib.Path(__file__).resolve().parents[1] / "support" / "r1_distill_like.jinja"
CHAT = [{"role": "user", "content": "Sort a list."}, {"role": "assistant", "content": REASONING_PROBE}]


def sft_config(tmp_path, **model):
    return parse_config(
        {
            "stage": "sft",
            "run_dir": str(tmp_path / "run"),
            "model": {"pretrained": "smollm2", **model},
            "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
            "train": {"steps": 1, "batch_size": 8},
            "sft": {"data": {"source": "mbpp", "max_seq_len": 64, "too_long": "truncate"}},
        }
    )


def test_a_template_that_drops_reasoning_stops_sft_naming_the_key(tmp_path, smollm2_dir):
    with pytest.raises(ConfigError, match=r"^model.chat_template: the chat template drops the reasoning"):
        run_sft(start_runtime(sft_config(tmp_path, chat_template=str(R1_LIKE))))
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before any training


def test_the_built_in_keeps_reasoning_in_the_loss(smollm2_dir):
    section = sft_config(pathlib.Path("/tmp"), chat_template="deepseek-r1-keep-reasoning").model
    tokenizer = load_tokenizer(section)
    check_keeps_reasoning(tokenizer)
    ids, mask = tokenize_chat(tokenizer, CHAT)
    trained = tokenizer.decode(ids[mask])
    assert "fr_jax reasoning probe" in trained and "fr_jax answer probe" in trained and "Sort a list" not in trained
    r1_like = load_tokenizer(section.model_copy(update={"chat_template": str(R1_LIKE)}))
    with pytest.raises(ValueError, match="drops the reasoning"):
        check_keeps_reasoning(r1_like)


def test_templates_by_name_or_file_and_unknown_ones_are_named(tmp_path):
    assert chat_template_text("chatml") == (CHAT_TEMPLATES_DIR / "chatml.jinja").read_text()
    assert chat_template_text(str(R1_LIKE)) == R1_LIKE.read_text()
    with pytest.raises(FileNotFoundError, match=r"'nope' is neither a built-in one \(\['chatml', 'deepseek"):
        chat_template_text("nope")


def test_a_different_vocabulary_is_never_slipped_in(tmp_path, smollm2_dir, qwen_tok):
    with pytest.raises(ConfigError, match=r"model.tokenizer='qwen' does not match model.pretrained's own tokenizer"):
        load_tokenizer(sft_config(tmp_path, tokenizer="qwen").model)
    same = load_tokenizer(sft_config(tmp_path, tokenizer=str(smollm2_dir)).model)
    assert len(same) == len(load_tokenizer(sft_config(tmp_path).model))


def test_the_template_travels_with_the_saved_tokenizer(tmp_path, smollm2_dir):
    tokenizer = load_tokenizer(sft_config(tmp_path, chat_template="chatml").model)
    tokenizer.save_pretrained(tmp_path / "hf")  # what the rollout server and the export read
    again = load_tokenizer(
        parse_config(
            {
                **sft_config(tmp_path).model_dump(),
                "model": {"pretrained": str(smollm2_dir), "tokenizer": str(tmp_path / "hf")},
            }
        ).model
    )
    assert again.chat_template == chat_template_text("chatml")
    rendered = again.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nSort a list.<|im_end|>\n<|im_start|>assistant\n"
