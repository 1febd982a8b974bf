"""What the SFT stage makes of an sft.jsonl: the flow tests check that records train as they are written."""

import transformers

from fr_jax.data.sft import ReadReport, read_chat_jsonl, tokenize_records


def tokenize_sft_file(path, tokenizer_dir, max_seq_len: int) -> tuple[ReadReport, list[dict]]:
    """fr_jax.data.sft's reading and tokenizing of `path` (too-long rows skipped, a malformed one stops it)."""
    report = ReadReport()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    examples = tokenize_records(
        tokenizer, read_chat_jsonl(path), max_seq_len=max_seq_len, too_long="skip", on_malformed="stop", report=report
    )
    # what the trainer packs: next-token pairs within max_seq_len, each with a token to learn from
    assert all(len(e["inputs"]) == len(e["targets"]) <= max_seq_len and e["loss_mask"].any() for e in examples)
    return report, examples
