"""Tokenizers for the tiny models, made here: a byte-level BPE CLIP tokenizer and a Unigram T5
tokenizer, each over a few hundred tokens, saved in Hugging Face's formats so that the pipelines
load them with `from_pretrained` like real ones."""

from __future__ import annotations

import json
import string
from pathlib import Path

from transformers import CLIPTokenizer, T5TokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode  # CLIP/GPT-2 byte table

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
# A few merges so that the BPE path is exercised; each pair's product is added to the vocab.
_TINY_MERGES: tuple[tuple[str, str], ...] = (
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "n"),
    ("o", "n</w>"),
    ("i", "n"),
    ("e", "r</w>"),
)
# OpenCLIP ViT-bigG's tokenizer (SDXL's / SD3's tokenizer_2) pads with "!" instead of <|endoftext|>.
OPEN_CLIP_PAD_TOKEN = "!"

T5_PAD_TOKEN = "<pad>"
T5_EOS_TOKEN = "</s>"
T5_UNK_TOKEN = "<unk>"
T5_SPACE = "\u2581"  # SentencePiece's word-start marker "▁"
# Whole-word pieces, so that the usual captions are one piece per word (as in real T5).
_TINY_T5_WORDS: tuple[str, ...] = ("a", "an", "the", "of", "in", "on", "and", "with", "photo", "cat", "dog")
# Log-probability scores of the Unigram pieces: a known word beats its spelled-out characters.
_T5_WORD_SCORE, _T5_SPACE_SCORE, _T5_WORD_START_CHAR_SCORE, _T5_CHAR_SCORE = -2.0, -3.0, -6.0, -7.0
T5_MODEL_MAX_LENGTH = 512  # google/t5-v1_1-xxl's tokenizer_config; pipelines pass max_sequence_length
T5_HIDDEN_SIZE = 128  # the tiny T5 encoder's d_model: SD3's / FLUX's joint_attention_dim


def tiny_clip_vocab() -> tuple[dict[str, int], list[str]]:
    """Build a tiny byte-level BPE vocabulary in CLIP's layout.

    Returns `(vocab, merges)`: vocab maps the 256 byte symbols, then the same symbols with
    `"</w>"`, then one token per merge, then `<|startoftext|>` and `<|endoftext|>` to ids
    0..len-1 (the order of OpenAI CLIP's `bpe_simple_vocab_16e6`); merges are `"a b"` lines.
    """
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols]
    tokens += [a + b for a, b in _TINY_MERGES]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: idx for idx, token in enumerate(tokens)}
    merges = [f"{a} {b}" for a, b in _TINY_MERGES]
    return vocab, merges


def write_tiny_clip_tokenizer_files(folder: Path) -> Path:
    """Write `vocab.json` and `merges.txt` (with the `#version: 0.2` header) into `folder`.

    Format: Hugging Face CLIPTokenizer's vocab/merges files. Returns `folder`.
    """
    vocab, merges = tiny_clip_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def tiny_t5_vocab() -> list[tuple[str, float]]:
    """Build a tiny SentencePiece-Unigram vocabulary in T5's layout.

    Returns `[(piece, log_prob_score), ...]` whose index is the token id: `<pad>`=0, `</s>`=1,
    `<unk>`=2 (T5's fixed special ids), then `"▁"`, then for every printable ASCII character
    `c` (letters, digits, punctuation) the word-start piece `"▁" + c` and the bare `c`, then one
    `"▁" + word` piece per word of `_TINY_T5_WORDS`. Any other character encodes to `<unk>`.
    There are no `<extra_id_*>` sentinels (only T5's span-corruption pre-training uses them).
    """
    vocab = [(T5_PAD_TOKEN, 0.0), (T5_EOS_TOKEN, 0.0), (T5_UNK_TOKEN, 0.0), (T5_SPACE, _T5_SPACE_SCORE)]
    for char in string.ascii_letters + string.digits + string.punctuation:
        vocab.append((T5_SPACE + char, _T5_WORD_START_CHAR_SCORE))
        vocab.append((char, _T5_CHAR_SCORE))
    vocab += [(T5_SPACE + word, _T5_WORD_SCORE) for word in _TINY_T5_WORDS]
    return vocab


def tiny_t5_tokenizer() -> T5TokenizerFast:
    """A T5 tokenizer (`tokenizers` Unigram backend) over `tiny_t5_vocab()`.

    Same pipeline as google/t5-v1_1's fast tokenizer, without the NFKC normalizer:
    whitespace split, Metaspace `"▁"` prefix, Unigram pieces, `</s>` appended; pads with
    `<pad>` (id 0); `model_max_length` 512. `save_pretrained` writes `tokenizer.json` and
    `tokenizer_config.json`, which `T5TokenizerFast.from_pretrained` loads back identically
    (no sentencepiece `spiece.model` is needed).
    """
    return T5TokenizerFast(
        vocab=tiny_t5_vocab(),
        eos_token=T5_EOS_TOKEN,
        unk_token=T5_UNK_TOKEN,
        pad_token=T5_PAD_TOKEN,
        extra_ids=0,
        model_max_length=T5_MODEL_MAX_LENGTH,
    )


def clip_tokenizers(work_dir: Path, *names: str, pad_tokens: tuple[str, ...] = ()) -> list[CLIPTokenizer]:
    """One tiny CLIP tokenizer per subfolder name (written under `work_dir`), 77 tokens long.

    `pad_tokens[i]` (default `<|endoftext|>`) is the pad token of the i-th tokenizer.
    """
    tokenizers = []
    for index, name in enumerate(names):
        pad_token = pad_tokens[index] if index < len(pad_tokens) else EOS_TOKEN
        folder = write_tiny_clip_tokenizer_files(work_dir / name)
        tokenizers.append(CLIPTokenizer.from_pretrained(folder, model_max_length=77, pad_token=pad_token))
    return tokenizers
