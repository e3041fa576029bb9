"""Corpus preparation: sources -> documents -> train/val/test split -> tokens (cached) -> packed rows.

- A *source* is one text file (``.txt`` or ``.txt.gz``); its name is the file name without those suffixes.
- *Documents*: a source is cut into paragraphs at blank lines and at ``%`` lines (the fortune-file
  separator); consecutive paragraphs are grouped until a document holds at least ``doc_chars``
  characters. A paragraph that alone runs past ``2 * doc_chars`` (a file of one gloss per line has
  no blank lines) is cut at line boundaries. Documents, not rows, are split, so no text is shared
  between train, validation and test.
- *Split*: per source, a fixed permutation (seed 0, independent of the training seeds) puts
  ``ceil(val_frac * n)`` documents in validation, ``ceil(test_frac * n)`` in test, the rest in train.
- *Tokens*: each document is tokenized and followed by the end-of-text id; per (source, split) the
  documents are concatenated in their original order, with document start offsets kept. The result
  is one ``.npz`` file (the *prepared token file*) in the cache folder, named by a hash of the input
  files' bytes, the tokenizer files and the settings above; ``--corpus FILE.npz`` reads one directly.
- *Rows*: ``seq_len + 1`` consecutive tokens of one (source, split) stream (the tail that does not
  fill a row is dropped), so a row never mixes sources or splits; each row carries its source id.
"""
import dataclasses
import glob
import gzip
import hashlib
import json
import math
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .settings import EMBEDDED_DIR  # noqa: F401  (the default corpus; re-exported)

SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1
_SUFFIXES = (".txt.gz", ".txt")


# -- sources and documents ----------------------------------------------------------------------
def find_sources(paths: Sequence[str]) -> Dict[str, str]:
    """Map source name -> file path; folders are expanded to their *.txt and *.txt.gz files."""
    files: List[str] = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(f for s in _SUFFIXES for f in glob.glob(os.path.join(path, "*" + s)))
            if not found:
                raise FileNotFoundError(f"corpus folder {path} has no *.txt or *.txt.gz files")
            files.extend(found)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"corpus path {path} does not exist")
    sources: Dict[str, str] = {}
    for f in files:
        base = os.path.basename(f)
        name = next((base[: -len(s)] for s in _SUFFIXES if base.endswith(s)), None)
        if name is None:
            raise ValueError(f"corpus file {f}: expected a .txt or .txt.gz file")
        if name in sources:
            raise ValueError(f"two corpus files give the source name {name!r}: {sources[name]} and {f}")
        sources[name] = f
    return dict(sorted(sources.items()))


def read_text(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read()


def split_documents(text: str, doc_chars: int) -> List[str]:
    docs: List[str] = []
    current: List[str] = []
    size = 0

    def flush():
        nonlocal current, size
        if size > 0 and "".join(current).strip():
            docs.append("".join(current).strip("\n") + "\n")
        current, size = [], 0

    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped in ("", "%"):  # paragraph boundary: the only place a document may normally end
            if size >= doc_chars:
                flush()  # the boundary line itself is dropped
            elif current:  # kept inside a document: a fortune file keeps its % separators
                current.append(line)
                size += len(line)
            continue
        current.append(line)
        size += len(line)
        if size >= 2 * doc_chars:  # a paragraph without boundaries: cut at this line
            flush()
    flush()
    return docs


def assign_splits(n_docs: int, val_frac: float, test_frac: float) -> np.ndarray:
    """Split label per document (0 train, 1 val, 2 test) from a permutation that never depends on the run seed."""
    n_val, n_test = math.ceil(val_frac * n_docs), math.ceil(test_frac * n_docs)
    if n_docs - n_val - n_test < 1:
        raise ValueError(f"{n_docs} documents cannot give {n_val} validation, {n_test} test and >= 1 training "
                         "documents; use a smaller --doc-chars or more text")
    labels = np.zeros(n_docs, dtype=np.int8)
    perm = np.random.default_rng(0).permutation(n_docs)
    labels[perm[:n_val]] = 1
    labels[perm[n_val:n_val + n_test]] = 2
    return labels


# -- tokenized corpus ---------------------------------------------------------------------------
@dataclasses.dataclass
class Corpus:
    """Token streams per (source, split) with document start offsets."""
    sources: List[str]
    tokens: Dict[Tuple[str, str], np.ndarray]
    doc_starts: Dict[Tuple[str, str], np.ndarray]
    eot_id: int
    vocab_size: int
    tokenizer: str
    path: str

    def stream(self, source: str, split: str) -> np.ndarray:
        return self.tokens[(source, split)]


def _cache_key(sources: Dict[str, str], tokenizer, doc_chars: int, val_frac: float, test_frac: float) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"v": FORMAT_VERSION, "tok": tokenizer.identity, "doc_chars": doc_chars,
                              "val": val_frac, "test": test_frac}, sort_keys=True).encode())
    for name, path in sources.items():
        digest.update(name.encode())
        with open(path, "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()[:20]


def prepare_corpus(paths: Sequence[str], tokenizer, cache_dir: str, doc_chars: int = 2000,
                   val_frac: float = 0.05, test_frac: float = 0.05, log=print) -> Corpus:
    """Tokenize (or read from the cache) the sources under ``paths``; returns the loaded Corpus."""
    sources = find_sources(paths)
    key = _cache_key(sources, tokenizer, doc_chars, val_frac, test_frac)
    path = os.path.join(cache_dir, f"tokens-{key}.npz")
    if os.path.exists(path):
        log(f"tokens: cached {path}")
        return load_token_file(path)
    arrays = {}
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    for name, file in sources.items():
        docs = split_documents(read_text(file), doc_chars)
        labels = assign_splits(len(docs), val_frac, test_frac)
        encoded = tokenizer.encode_batch(docs)
        for split_id, split in enumerate(SPLITS):
            chosen = [np.append(ids, tokenizer.eot_id) for ids, lab in zip(encoded, labels) if lab == split_id]
            lengths = np.array([len(c) for c in chosen], dtype=np.int64)
            arrays[f"tokens/{name}/{split}"] = np.concatenate(chosen).astype(dtype)
            arrays[f"starts/{name}/{split}"] = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        log(f"tokens: {name}: {len(docs)} documents, "
            + ", ".join(f"{s} {len(arrays[f'tokens/{name}/{s}']):,}" for s in SPLITS))
    meta = {"version": FORMAT_VERSION, "sources": list(sources), "eot_id": tokenizer.eot_id,
            "vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.name, "tokenizer_identity": tokenizer.identity,
            "doc_chars": doc_chars, "val_frac": val_frac, "test_frac": test_frac}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + f".tmp{os.getpid()}.npz"  # written whole, then renamed: a killed run leaves no half file
    np.savez_compressed(tmp, **arrays)  # ~2.4x smaller (22M GPT-2 tokens: 20 MB), small enough to carry
    os.replace(tmp, path)
    log(f"tokens: wrote {path}")
    return load_token_file(path)


def load_token_file(path: str) -> Corpus:
    with np.load(path) as data:
        meta = json.loads(bytes(data["meta"]).decode())
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: token file format {meta.get('version')}, expected {FORMAT_VERSION}")
        tokens = {(s, sp): data[f"tokens/{s}/{sp}"] for s in meta["sources"] for sp in SPLITS}
        starts = {(s, sp): data[f"starts/{s}/{sp}"] for s in meta["sources"] for sp in SPLITS}
    return Corpus(meta["sources"], tokens, starts, meta["eot_id"], meta["vocab_size"], meta["tokenizer"], path)


# -- rows ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class RowSet:
    """Rows of ``row_len`` tokens, each tagged with the index of its source in ``sources``."""
    rows: np.ndarray        # [n, row_len] int64
    source_ids: np.ndarray  # [n] int64
    sources: List[str]

    def __len__(self):
        return len(self.rows)

    def of_source(self, source: str) -> "RowSet":
        keep = self.source_ids == self.sources.index(source)
        return RowSet(self.rows[keep], self.source_ids[keep], self.sources)


def pack_rows(tokens: np.ndarray, row_len: int) -> np.ndarray:
    n = len(tokens) // row_len
    return tokens[: n * row_len].astype(np.int64).reshape(n, row_len)


def build_rows(corpus: Corpus, split: str, sources: Sequence[str], row_len: int) -> RowSet:
    """Rows of the given sources (source ids index ``corpus.sources``, so they agree across row sets)."""
    rows, ids = [], []
    for name in sources:
        packed = pack_rows(corpus.stream(name, split), row_len)
        rows.append(packed)
        ids.append(np.full(len(packed), corpus.sources.index(name), dtype=np.int64))
    return RowSet(np.concatenate(rows), np.concatenate(ids), list(corpus.sources))


def _document_spans(corpus: Corpus, source: str, split: str):
    tokens, starts = corpus.stream(source, split), corpus.doc_starts[(source, split)]
    return tokens, starts, np.append(starts[1:], len(tokens))


def _choose_documents(n: int, frac: float, what: str, seed: int) -> np.ndarray:
    k = math.ceil(frac * n)
    if not 0 < k < n:
        raise ValueError(f"{what}: {n} documents cannot be cut into {frac:.0%} and the rest")
    chosen = np.zeros(n, dtype=bool)
    chosen[np.random.default_rng(seed).permutation(n)[:k]] = True
    return chosen


def _gather(tokens, starts, ends, mask):
    return np.concatenate([tokens[s:e] for s, e, m in zip(starts, ends, mask) if m])


def split_documents_of_stream(corpus: Corpus, source: str, split: str, frac: float) -> Tuple[np.ndarray, np.ndarray]:
    """Cut one token stream by whole documents: a fixed random ``frac`` of them, and the rest (both in order)."""
    tokens, starts, ends = _document_spans(corpus, source, split)
    chosen = _choose_documents(len(starts), frac, f"{source}/{split}", 1)
    return _gather(tokens, starts, ends, chosen), _gather(tokens, starts, ends, ~chosen)


def split_reference_slice(corpus: Corpus, source: str, frac: float, holdout_frac: float) -> Tuple[np.ndarray, np.ndarray]:
    """The documents ``split_documents_of_stream(corpus, source, 'train', frac)`` chooses (the clean slice),
    cut again by whole documents: the reference model's training tokens, and a fixed random
    ``holdout_frac`` of them that it never trains on (calibration of its domain threshold)."""
    tokens, starts, ends = _document_spans(corpus, source, "train")
    chosen = _choose_documents(len(starts), frac, f"{source}/train", 1)
    idx = np.flatnonzero(chosen)
    held = np.zeros(len(starts), dtype=bool)
    held[idx[_choose_documents(len(idx), holdout_frac, f"{source}/train clean slice", 2)]] = True
    return _gather(tokens, starts, ends, chosen & ~held), _gather(tokens, starts, ends, held)


def rows_from_tokens(tokens: np.ndarray, source_id: int, sources: List[str], row_len: int) -> RowSet:
    packed = pack_rows(tokens, row_len)
    return RowSet(packed, np.full(len(packed), source_id, dtype=np.int64), list(sources))


def concat_rows(parts: Sequence[RowSet]) -> RowSet:
    return RowSet(np.concatenate([p.rows for p in parts]), np.concatenate([p.source_ids for p in parts]),
                  list(parts[0].sources))


def eval_rows(corpus: Corpus, split: str, row_len: int, max_rows: int,
              sources: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
    """Per source, at most ``max_rows`` rows spread evenly over the split (the same rows for every run)."""
    out = {}
    for name in sources or corpus.sources:
        packed = pack_rows(corpus.stream(name, split), row_len)
        if len(packed) == 0:
            raise ValueError(f"{name}/{split} has fewer than {row_len} tokens: lower --seq-len")
        if len(packed) > max_rows:
            packed = packed[np.linspace(0, len(packed) - 1, max_rows).round().astype(np.int64)]
        out[name] = packed
    return out


# -- data order ---------------------------------------------------------------------------------
def batch_order(n_rows: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Endless row-index batches: a fresh permutation per pass, drawn from ``seed`` alone.

    Every configuration run with the same seed and row set sees exactly the same batches in the same
    order. The last partial batch of a pass is dropped so every step has ``batch_size`` rows.
    """
    if n_rows < batch_size:
        raise ValueError(f"{n_rows} training rows cannot fill a batch of {batch_size}: lower --batch-size or --seq-len")
    rng = np.random.default_rng([seed, 0x5EED])
    while True:
        perm = rng.permutation(n_rows)
        for i in range(0, n_rows - batch_size + 1, batch_size):
            yield perm[i:i + batch_size]
