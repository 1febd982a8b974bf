"""GGUF -> Hugging Face conversion: the real SmolLM2 file through transformers, an exact round trip of a tiny random
Llama written as a GGUF the way llama.cpp lays it out, the atomic cache, and the errors for bad input."""

import json
import pathlib
import subprocess
import sys
import time

import gguf
import numpy as np
import pytest
import torch
import transformers
from transformers.convert_slow_tokenizer import bytes_to_unicode

from fr_jax.models import gguf as gguf_convert
from fr_jax.models.tokenizer import FINGERPRINT_FILE, cached_dir, load_tokenizer, publish_dir

REPO = pathlib.Path(__file__).resolve().parents[2]

TINY = dict(
    vocab_size=262,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)
CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k row order (the layout gguf.unpermute_rotary must undo)."""
    return (
        weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


@pytest.fixture(scope="module")
def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(config).eval()


def write_tiny_gguf(path, model, *, arch="llama", extra_tensors=(), pre="smollm"):
    """Write `model` as an F32 GGUF with llama.cpp's tensor names, q/k row order and tokenizer metadata."""
    cfg = model.config
    gguf_names = {
        hf.format(i=i): name.format(i=i)
        for name, hf in gguf_convert.TENSOR_NAMES.items()
        for i in range(cfg.num_hidden_layers)
    }
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(TINY["rope_theta"])
    writer.add_layer_norm_rms_eps(TINY["rms_norm_eps"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    tokens = CONTROL_TOKENS + list(bytes_to_unicode().values()) + ["".join(merge) for merge in MERGES]
    assert len(tokens) == cfg.vocab_size
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    writer.add_token_merges([" ".join(merge) for merge in MERGES])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)
    for hf_name, weight in model.state_dict().items():
        weight = weight.numpy()
        if ".q_proj." in hf_name:
            weight = llama_cpp_permute(weight, cfg.num_attention_heads)
        elif ".k_proj." in hf_name:
            weight = llama_cpp_permute(weight, cfg.num_key_value_heads)
        writer.add_tensor(gguf_names[hf_name], np.ascontiguousarray(weight))
    for name, weight in extra_tensors:
        writer.add_tensor(name, weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_smollm2_greedy_continuation_names_paris(smollm2_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(smollm2_dir)
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    continuation = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])
    assert "Paris" in continuation, continuation


def test_smollm2_rotary_rows_are_in_huggingface_order(smollm2_dir):
    """On the real file: putting q/k rows back into llama.cpp's order must make the model much worse at real text."""
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(smollm2_dir)
    ids = tokenizer(
        "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after the "
        "engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.",
        return_tensors="pt",
    )["input_ids"]
    with torch.no_grad():
        converted_loss = model(ids, labels=ids).loss.item()
        cfg = model.config
        for layer in model.model.layers:
            for proj, heads in (
                (layer.self_attn.q_proj, cfg.num_attention_heads),
                (layer.self_attn.k_proj, cfg.num_key_value_heads),
            ):
                proj.weight.copy_(torch.from_numpy(llama_cpp_permute(proj.weight.numpy(), heads)))
        llama_cpp_order_loss = model(ids, labels=ids).loss.item()
    assert converted_loss < 3.0 and llama_cpp_order_loss > converted_loss + 1.0, (converted_loss, llama_cpp_order_loss)


def test_smollm2_config_comes_from_gguf_metadata(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    reader = gguf_convert.open_gguf(gguf_convert.smollm2_gguf_path())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["torch_dtype"] == "float32"
    assert config["hidden_size"] == gguf_convert.metadata(reader, "llama.embedding_length") == 576
    assert config["num_hidden_layers"] == gguf_convert.metadata(reader, "llama.block_count") == 30
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert config["vocab_size"] == len(gguf_convert.metadata(reader, "tokenizer.ggml.tokens")) == 49152
    assert (config["rope_theta"], config["rms_norm_eps"], config["max_position_embeddings"]) == (100000.0, 1e-5, 8192)
    assert config["tie_word_embeddings"] is True  # the GGUF has no output.weight


def test_smollm2_tokenizer_matches_gguf_vocabulary(smollm2_dir):
    tokenizer = load_tokenizer(smollm2_dir)
    reader = gguf_convert.open_gguf(gguf_convert.smollm2_gguf_path())
    tokens = gguf_convert.metadata(reader, "tokenizer.ggml.tokens")
    token_types = gguf_convert.metadata(reader, "tokenizer.ggml.token_type")
    assert tokenizer.convert_ids_to_tokens(list(range(len(tokens)))) == tokens
    # Every ordinary token whose bytes are valid UTF-8 must encode back to exactly itself (BPE merges + pre-tokenizer).
    texts = {i: tokenizer.convert_tokens_to_string([token]) for i, token in enumerate(tokens)}
    ordinary = [i for i, text in texts.items() if token_types[i] == gguf.TokenType.NORMAL and "\ufffd" not in text]
    assert len(ordinary) > 48000
    encoded = tokenizer([texts[i] for i in ordinary], add_special_tokens=False)["input_ids"]
    assert [ids for ids in encoded] == [[i] for i in ordinary]
    # llama.cpp's "smollm" pre-tokenizer splits digits one by one
    assert tokenizer.convert_ids_to_tokens(tokenizer("in 2024", add_special_tokens=False)["input_ids"]) == [
        "in",
        "Ġ",
        "2",
        "0",
        "2",
        "4",
    ]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    assert tokenizer.decode(tokenizer("naïve café — ok", add_special_tokens=False)["input_ids"]) == "naïve café — ok"


def test_smollm2_chat_template_renders_chatml(smollm2_dir):
    tokenizer = load_tokenizer(smollm2_dir)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert rendered.startswith("<|im_start|>system\n")
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_dict=True
    )
    assert ids["input_ids"][0] == tokenizer.convert_tokens_to_ids("<|im_start|>") == 1


def test_smollm2_cache_is_reused(smollm2_dir):
    weights = smollm2_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    start = time.perf_counter()
    assert gguf_convert.smollm2_hf_dir(smollm2_dir.parent) == smollm2_dir
    assert time.perf_counter() - start < 1.0
    assert weights.stat().st_mtime_ns == before


def test_tiny_llama_round_trip_is_exact(tiny_llama, tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_llama)
    out = gguf_convert.convert_gguf_to_hf(path, tmp_path / "hf")
    converted = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert (
        converted.config.tie_word_embeddings is False
        and converted.config.rope_parameters["rope_theta"] == TINY["rope_theta"]
    )
    ids = torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = tiny_llama(ids).logits, converted(ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)

    tokenizer = load_tokenizer(out)
    assert tokenizer.convert_ids_to_tokens(tokenizer(" the", add_special_tokens=False)["input_ids"]) == ["Ġthe"]
    assert tokenizer.convert_tokens_to_ids(CONTROL_TOKENS) == [0, 1, 2]
    assert tokenizer("<|im_start|>x<|im_end|>", add_special_tokens=False)["input_ids"][::2] == [1, 2]
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_unpermute_rotary_inverts_llama_cpp_layout():
    weight = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)
    assert not np.array_equal(llama_cpp_permute(weight, 4), weight)
    np.testing.assert_array_equal(gguf_convert.unpermute_rotary(llama_cpp_permute(weight, 4), 4), weight)
    with pytest.raises(ValueError, match="cannot split 30 rows into 4 heads"):
        gguf_convert.unpermute_rotary(np.zeros((30, 2), np.float32), 4)


def test_cli_converts_a_given_gguf(tiny_llama, tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_llama)
    command = [sys.executable, "-m", "fr_jax.models.gguf", "--gguf", str(path), "--out", str(tmp_path / "cli")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "dequantize GGUF" in result.stderr  # the progress bar
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["num_hidden_layers"] == TINY["num_hidden_layers"]
    assert (tmp_path / "cli" / "model.safetensors").is_file() and (tmp_path / "cli" / "tokenizer.json").is_file()
    again = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert again.returncode == 2 and "cli already exists and is not empty" in again.stderr.splitlines()[-1]


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        gguf_convert.convert_gguf_to_hf(tmp_path / "nope.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_gguf_file_is_rejected(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"definitely not a gguf file" * 10)
    with pytest.raises(ValueError, match="junk.gguf is not a readable GGUF file"):
        gguf_convert.convert_gguf_to_hf(tmp_path / "junk.gguf", tmp_path / "out")


def test_other_architecture_is_rejected(tiny_llama, tmp_path):
    path = write_tiny_gguf(tmp_path / "qwen.gguf", tiny_llama, arch="qwen2")
    with pytest.raises(ValueError, match="architecture 'qwen2' is not supported"):
        gguf_convert.convert_gguf_to_hf(path, tmp_path / "out")


def test_unknown_tensor_fails_and_leaves_nothing_behind(tiny_llama, tmp_path):
    bias = ("blk.0.attn_q.bias", np.zeros(TINY["hidden_size"], np.float32))
    path = write_tiny_gguf(tmp_path / "bias.gguf", tiny_llama, extra_tensors=[bias])
    with pytest.raises(ValueError, match="unknown GGUF tensor name 'blk.0.attn_q.bias'"):
        gguf_convert.convert_gguf_to_hf(path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bias.gguf"]  # no output, no temp dir


def test_missing_metadata_key_is_named(tiny_llama, tmp_path):
    reader = gguf_convert.open_gguf(write_tiny_gguf(tmp_path / "t.gguf", tiny_llama))
    with pytest.raises(KeyError, match="t.gguf: GGUF metadata has no 'llama.expert_count'"):
        gguf_convert.metadata(reader, "llama.expert_count")
    assert gguf_convert.metadata(reader, "llama.expert_count", None) is None


def test_unknown_pre_tokenizer_is_rejected(tiny_llama, tmp_path):
    path = write_tiny_gguf(tmp_path / "pre.gguf", tiny_llama, pre="mystery-pre")
    with pytest.raises(ValueError, match="tokenizer.ggml.pre='mystery-pre' is not supported"):
        gguf_convert.convert_gguf_to_hf(path, tmp_path / "out")


def test_existing_output_dir_is_not_overwritten(tiny_llama, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="out already exists"):
        gguf_convert.convert_gguf_to_hf(write_tiny_gguf(tmp_path / "t.gguf", tiny_llama), tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_cached_dir_builds_once_and_rebuilds_when_stale(tmp_path):
    builds = []

    def build(out):
        builds.append(out)
        (out / "data.txt").write_text(f"build {len(builds)}")

    target = tmp_path / "cache" / "thing"
    assert cached_dir(target, {"v": 1}, build) == target
    assert cached_dir(target, {"v": 1}, build) == target
    assert len(builds) == 1 and (target / "data.txt").read_text() == "build 1"
    assert json.loads((target / FINGERPRINT_FILE).read_text()) == {"v": 1}
    cached_dir(target, {"v": 2}, build)
    assert len(builds) == 2 and (target / "data.txt").read_text() == "build 2"
    assert sorted(p.name for p in target.parent.iterdir()) == ["thing"]  # temp and old copies removed


def test_cached_dir_keeps_a_copy_published_concurrently(tmp_path):
    target = tmp_path / "thing"

    def build_theirs(out):
        (out / "data.txt").write_text("theirs")
        (out / FINGERPRINT_FILE).write_text(json.dumps({"v": 1}))

    def build_while_another_process_publishes(out):
        (out / "data.txt").write_text("ours")
        publish_dir(target, build_theirs)

    cached_dir(target, {"v": 1}, build_while_another_process_publishes)
    assert (target / "data.txt").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing"]


def test_failed_build_leaves_no_directory(tmp_path):
    def failing_build(out):
        (out / "partial.bin").write_bytes(b"half")
        raise RuntimeError("killed halfway")

    with pytest.raises(RuntimeError, match="killed halfway"):
        cached_dir(tmp_path / "thing", {"v": 1}, failing_build)
    assert list(tmp_path.iterdir()) == []
