"""The real 49,408-token CLIP BPE tokenizer, built offline.

open_clip_torch ships CLIP's BPE merge list (``bpe_simple_vocab_16e6.txt.gz``). CLIP's vocabulary is
fully determined by it: the 256 byte symbols, the same with the end-of-word marker ``</w>``, one
token per merge (the first 48,894 merges), then ``<|startoftext|>`` and ``<|endoftext|>``. We write
that as ``vocab.json`` + ``merges.txt`` so :class:`transformers.CLIPTokenizer` loads it from disk.
"""
from __future__ import annotations

import gzip
import json
import os

NUM_MERGES = 49152 - 256 - 2  # merges used by CLIP; with 2×256 byte tokens and 2 specials → 49,408


def _byte_symbols():
    """Reversible map byte → printable unicode character (GPT-2/CLIP byte-level BPE convention)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def bpe_path() -> str:
    import open_clip

    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"open_clip_torch does not ship {path}; cannot build the CLIP tokenizer offline")
    return path


def write_clip_tokenizer(out_dir: str, model_max_length: int = 77) -> str:
    """Write vocab.json, merges.txt and the tokenizer configs into ``out_dir``; return ``out_dir``."""
    with gzip.open(bpe_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
    symbols = list(_byte_symbols().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.write("\n".join(" ".join(m) for m in merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, f, indent=2)
    return out_dir


def load_clip_tokenizer(cache_dir: str, model_max_length: int = 77):
    from transformers import CLIPTokenizer

    if not os.path.isfile(os.path.join(cache_dir, "vocab.json")):
        write_clip_tokenizer(cache_dir, model_max_length)
    return CLIPTokenizer.from_pretrained(cache_dir, local_files_only=True)


def cached_clip_tokenizer_dir() -> str:
    """:func:`write_clip_tokenizer`'s files, written once into the temp directory and shared by every
    process (written to a sibling and renamed, so a reader never sees half a tokenizer)."""
    import tempfile

    d = os.path.join(tempfile.gettempdir(), "nemo_aligner_draft_clip_tokenizer")
    if not os.path.isfile(os.path.join(d, "merges.txt")):
        tmp = tempfile.mkdtemp(dir=tempfile.gettempdir())
        write_clip_tokenizer(tmp)
        try:
            os.replace(tmp, d)
        except OSError:  # another process wrote it first
            pass
    return d
