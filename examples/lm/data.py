"""Loading a prepared corpus and streaming it segment by segment.

    docs = load_corpus("data/lm", "train", "gpt2")          # [Document(id, tokens (L,) int32)]
    stream = DocumentStream(docs, batch_size=B, seg_len=n, train=True, seed=0, bos=50256)
    for seg in stream:                                       # Segment
        memory.reset(seg.doc_start)                          # (B,) bool: new document in that lane
        inputs, targets = seg.inputs_and_targets()           # (B, n), (B, n); targets -100 where invalid

The stream (``Document``, ``Segment``, ``DocumentStream`` and its semantics: lanes, ``doc_start``,
``valid``, short documents) lives in the library, :mod:`memory_plugins.data`; here it raises
:class:`CorpusError`, like the rest of the corpus code. Notation: B lanes, n segment length, L tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from memory_plugins import data as _stream
from memory_plugins.data import IGNORE, Document, Segment  # noqa: F401  (re-exported)

from .corpus import (
    SPLITS,
    ChecksumError,
    CorpusError,
    document_path,
    read_document,
    read_manifest,
    read_split,
    sha256_bytes,
)
from .tokenizer import check_name, fingerprint, load_tokenizer

CACHE_FORMAT = 1
_ENCODE_CHUNK = 32  # documents per encode_batch call: bounds the tokenizer's memory


# -- tokenised splits --------------------------------------------------------------------------------


def _cache_key(manifest: dict, root: Path, tokenizer: str, ids: Sequence[str]) -> str:
    """Digest of what a cached split depends on: cache format, tokenizer files, documents' texts."""
    docs = manifest["documents"]
    parts = [str(CACHE_FORMAT), tokenizer, fingerprint(root, tokenizer, manifest)]
    parts += [f"{i}:{docs[i]['sha256']}" for i in ids]
    return sha256_bytes("\n".join(parts).encode())


def tokenize_documents(root: str | Path, ids: Sequence[str], tokenizer: str, manifest: dict | None = None) -> dict:
    """Tokenise documents ``ids`` of the corpus at ``root``; each text must still have the sha256
    recorded at prepare time. Returns {"ids", "offsets" (D + 1,) int64, "tokens" (ΣL,) int32}."""
    root = Path(root)
    manifest = read_manifest(root) if manifest is None else manifest
    tok = load_tokenizer(root, tokenizer, manifest)
    if tok.get_vocab_size() > 2**31 - 1:
        raise CorpusError(f"tokenizer {tokenizer}: V = {tok.get_vocab_size()} does not fit int32")
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    pieces, lengths = [], []
    for start in range(0, len(ids), _ENCODE_CHUNK):
        chunk = ids[start : start + _ENCODE_CHUNK]
        texts = []
        for doc_id in chunk:
            text = read_document(document_path(root, manifest, doc_id))
            recorded = manifest["documents"][doc_id]["sha256"]
            if sha256_bytes(text.encode()) != recorded:
                raise ChecksumError(
                    f"document {doc_id!r} ({document_path(root, manifest, doc_id)}) changed since prepare "
                    f"(sha256 of its cleaned text is not {recorded}); rerun `python -m examples.lm.prepare`"
                )
            texts.append(text)
        for enc in encode(texts, add_special_tokens=False):
            pieces.append(torch.tensor(enc.ids, dtype=torch.int32, device="cpu"))
            lengths.append(len(enc.ids))
    offsets = torch.zeros(len(ids) + 1, dtype=torch.int64, device="cpu")
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64, device="cpu").cumsum(0)
    flat = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int32, device="cpu")
    return {"ids": list(ids), "offsets": offsets, "tokens": flat}


def load_corpus(root: str | Path, split: str, tokenizer: str = "gpt2", *, build: bool = True) -> list[Document]:
    """The documents of ``split`` ("train", "valid" or "test") of the prepared corpus at ``root``,
    tokenised with ``tokenizer`` ("gpt2" or "bpe<V>"), sorted by id.

    Reads ``<root>/tokens_<tokenizer>/<split>.pt``; when it is missing or stale (documents, split or
    tokenizer files changed) it is rebuilt and saved, or with ``build=False`` that is an error.
    """
    if split not in SPLITS:
        raise CorpusError(f"load_corpus: split must be one of {SPLITS}, got {split!r}")
    check_name(tokenizer)
    root = Path(root)
    manifest = read_manifest(root)
    ids = sorted(i for i, s in read_split(root).items() if s == split)
    key = _cache_key(manifest, root, tokenizer, ids)
    path = root / f"tokens_{tokenizer}" / f"{split}.pt"
    data = torch.load(path, weights_only=True, map_location="cpu") if path.is_file() else None
    if data is None or data.get("key") != key:
        if not build:
            state = "missing" if data is None else "stale (documents, split or tokenizer changed)"
            raise CorpusError(f"load_corpus: {path} is {state}; call with build=True or rerun prepare")
        data = tokenize_documents(root, ids, tokenizer, manifest)
        data["key"] = key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".pt.tmp")
        torch.save(data, tmp)
        tmp.replace(path)
    offsets, flat = data["offsets"].tolist(), data["tokens"]
    return [Document(doc_id, flat[offsets[i] : offsets[i + 1]]) for i, doc_id in enumerate(data["ids"])]


class DocumentStream(_stream.DocumentStream):
    """:class:`memory_plugins.data.DocumentStream` raising :class:`CorpusError` about the documents."""

    error = CorpusError
