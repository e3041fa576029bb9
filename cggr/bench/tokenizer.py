"""Tokenizers for the benchmark, all offline.

``load_tokenizer(spec)``:
- ``"bytes"``: UTF-8 bytes (ids 0-255) plus an end-of-text id 256; needs no files, so the default
  embedded corpus runs anywhere.
- a folder with ``vocab.json`` + ``merges.txt`` (GPT-2 style byte-level BPE, e.g. /work/shared/tokenizer/gpt2);
- a folder with ``tokenizer.json`` (a Hugging Face model or tokenizer folder), or that file itself.

Every tokenizer has an ``identity`` string (a hash of its files) that keys the tokenization cache.
"""
import hashlib
import json
import os
from typing import List, Sequence

import numpy as np

# End-of-text tokens tried, in order, when the tokenizer folder does not name its eos token.
_EOT_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


def _hash_files(paths: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            digest.update(os.path.basename(path).encode())
            digest.update(f.read())
    return digest.hexdigest()[:16]


class ByteTokenizer:
    name = "bytes"
    identity = "bytes-v1"
    vocab_size = 257
    eot_id = 256

    def encode_batch(self, texts: List[str]) -> List[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) for t in texts]


class HFTokenizer:
    """A ``tokenizers`` tokenizer (Rust, batch-parallel) with its end-of-text id."""

    def __init__(self, tokenizer, name: str, identity: str, eot_token: str):
        self._tok = tokenizer
        self.name = name
        self.identity = identity
        eot = tokenizer.token_to_id(eot_token)
        if eot is None:
            raise ValueError(f"tokenizer {name}: end-of-text token {eot_token!r} is not in the vocabulary")
        self.eot_id = int(eot)
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))

    def encode_batch(self, texts: List[str]) -> List[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64) for e in self._tok.encode_batch(texts)]


def _eot_token(folder: str, vocab: dict) -> str:
    config = os.path.join(folder, "tokenizer_config.json")
    if os.path.exists(config):
        with open(config, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token")
        if isinstance(eos, dict):  # older configs store AddedToken dicts
            eos = eos.get("content")
        if eos:
            return eos
    for candidate in _EOT_CANDIDATES:
        if candidate in vocab:
            return candidate
    raise ValueError(f"tokenizer in {folder}: no eos_token in tokenizer_config.json and none of "
                     f"{_EOT_CANDIDATES} in the vocabulary")


def load_tokenizer(spec: str):
    if spec == "bytes":
        return ByteTokenizer()
    if os.path.isfile(spec) and spec.endswith(".json"):
        folder, tokenizer_json = os.path.dirname(spec) or ".", spec
    elif os.path.isdir(spec):
        folder, tokenizer_json = spec, os.path.join(spec, "tokenizer.json")
    else:
        raise FileNotFoundError(f"--tokenizer {spec!r}: not 'bytes', a folder, nor a tokenizer.json file")
    vocab_file, merges_file = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    if os.path.exists(tokenizer_json):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(tokenizer_json)
        return HFTokenizer(tok, tokenizer_json, _hash_files([tokenizer_json]),
                           _eot_token(folder, tok.get_vocab(with_added_tokens=True)))
    if os.path.exists(vocab_file) and os.path.exists(merges_file):
        from tokenizers import ByteLevelBPETokenizer

        tok = ByteLevelBPETokenizer(vocab_file, merges_file)
        return HFTokenizer(tok, folder, _hash_files([vocab_file, merges_file]),
                           _eot_token(folder, tok.get_vocab(with_added_tokens=True)))
    raise FileNotFoundError(f"--tokenizer {spec!r}: the folder has neither tokenizer.json nor vocab.json + merges.txt")
