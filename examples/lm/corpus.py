"""Corpus plumbing shared by ``prepare`` and ``data``: checksums, text cleaning, the document-level
split, folders of ``.txt`` documents and the corpus manifest.

A corpus root (``--out``, default ``data/lm``) holds::

    docs/<source>/<name>.txt     one cleaned document per file (absent with --data: the files stay put)
    split.json                   document id -> "train" | "valid" | "test", with the salt and ratios
    manifest.json                sources, archive checksums, documents (path, sha256, token counts)
    tokenizers/<name>/...        gpt2/{encoder.json,vocab.bpe}; bpe<V>/tokenizer.json
    tokens_<tokenizer>/<split>.pt  the tokenised split (see ``data.load_corpus``)
    downloads/                   the fetched registry archives (verified, kept as a cache)

Notation: D documents, id a document id ("<source>/<name>", a relative path without ``.txt``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection, Iterable
from pathlib import Path

SPLITS = ("train", "valid", "test")
DEFAULT_SALT = "memory-plugins-lm-v1"
MANIFEST = "manifest.json"
SPLIT_FILE = "split.json"


class ChecksumError(ValueError):
    """A file's sha256 is not the recorded one (corrupt download, other version, edited file)."""


class CorpusError(ValueError):
    """Bad corpus input: missing or empty folder, unusable document, missing prepare step."""


# -- checksums ---------------------------------------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | Path, expected: str | Collection[str], what: str) -> str:
    """Return the sha256 of ``path`` if it is ``expected`` (one hex digest or a set of accepted ones);
    raise :class:`ChecksumError` naming ``what``, the file, both digests and the remedy otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ChecksumError(f"{what}: {path} does not exist (run `python -m examples.lm.prepare` to create it)")
    allowed = {expected} if isinstance(expected, str) else set(expected)
    actual = sha256_file(path)
    if actual not in allowed:
        raise ChecksumError(
            f"{what}: {path} has sha256 {actual}, expected {' or '.join(sorted(allowed))}: the file is "
            "corrupt, truncated or another version; delete it and rerun `python -m examples.lm.prepare`"
        )
    return actual


# -- cleaning ----------------------------------------------------------------------------------------

# Project Gutenberg wrappers: the text lies between the START and END markers; older files end their
# header with the "small print" block instead of a START marker.
_HEADER_END = re.compile(
    r"^[ \t]*(\*{3}[ \t]*START OF (THE|THIS) PROJECT GUTENBERG\b.*"
    r"|\*END\*[ \t]*THE SMALL PRINT.*)$",
    re.IGNORECASE | re.MULTILINE,
)
_FOOTER_START = re.compile(
    r"^[ \t]*(\*{3}[ \t]*END OF (THE|THIS) PROJECT GUTENBERG\b|END OF (THE )?PROJECT GUTENBERG('S)?\b).*$",
    re.IGNORECASE | re.MULTILINE,
)
_BLANK_RUN = re.compile(r"\n{3,}")


def normalise_newlines(text: str) -> str:
    """``\\r\\n`` and lone ``\\r`` become ``\\n``; a leading byte-order mark is dropped."""
    return text.replace("\r\n", "\n").replace("\r", "\n").removeprefix("\ufeff")


def clean_text(text: str) -> str:
    """A document's text without licence boilerplate, with normalised newlines.

    Drops everything up to a Project Gutenberg START marker (or the old "*END*THE SMALL PRINT" line)
    and from an END marker / "End of the Project Gutenberg ..." line on; removes trailing spaces on
    each line and blank lines at both ends; ends with one newline ("" for an empty text). The text is
    otherwise kept as it is. Idempotent: cleaning a cleaned text changes nothing.
    """
    text = normalise_newlines(text)
    header = None
    for header in _HEADER_END.finditer(text):
        pass  # the last header marker: the licence preamble can itself quote the marker style
    if header is not None:
        text = text[header.end() :]
    footer = _FOOTER_START.search(text)
    if footer is not None:
        text = text[: footer.start()]
    text = "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")
    return text + "\n" if text else ""


def collapse_blank_lines(text: str) -> str:
    """Runs of three or more newlines become one blank line (used for text rebuilt from markup)."""
    return _BLANK_RUN.sub("\n\n", text)


def slug(name: str) -> str:
    """A file-name-safe lower-case name: runs of other characters than ``a-z0-9`` become ``_``."""
    out = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    if not out:
        raise CorpusError(f"slug: name {name!r} has no letter or digit to build a file name from")
    return out


# -- the split ---------------------------------------------------------------------------------------


def _unit_hash(salt: str, doc_id: str) -> float:
    """A uniform number in [0, 1) fixed by (salt, id): the first 8 bytes of sha256("salt\\0id")."""
    digest = hashlib.sha256(f"{salt}\0{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(
    ids: Iterable[str], *, valid: float = 0.05, test: float = 0.05, salt: str = DEFAULT_SALT
) -> dict[str, str]:
    """Assign each document id to "train", "valid" or "test", by document.

    Each id draws u = hash(salt, id) in [0, 1): u < ``valid`` → valid, u < ``valid + test`` → test,
    else train. A document's split depends only on its own id and the salt, so the same ids give the
    same split and adding or removing documents moves no other document. Exception, to guarantee
    three non-empty splits: a split left empty by the draw takes one document from train (or, when
    train has a single document, from the other split), the one with the smallest u' =
    hash(salt + "/fill-<split>", id); only this fallback can depend on which other documents exist.

    Needs at least 3 distinct ids; ``valid`` and ``test`` in (0, 1) with ``valid + test < 1``.
    """
    ids = list(ids)
    for name, ratio in (("valid", valid), ("test", test)):
        if not 0.0 < ratio < 1.0:
            raise CorpusError(f"split_documents: {name} ratio must be in (0, 1), got {ratio!r}")
    if valid + test >= 1.0:
        raise CorpusError(f"split_documents: valid + test must be < 1 to leave a train split, got {valid} + {test}")
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise CorpusError(f"split_documents: document ids must be unique, repeated: {dup}")
    if len(ids) < 3:
        raise CorpusError(f"split_documents: need at least 3 documents for train/valid/test, got {len(ids)}: {ids}")
    members: dict[str, list[str]] = {s: [] for s in SPLITS}
    for doc_id in ids:
        u = _unit_hash(salt, doc_id)
        members["valid" if u < valid else "test" if u < valid + test else "train"].append(doc_id)
    for target in ("train", "valid", "test"):
        if members[target]:
            continue
        donors = [s for s in ("train", "valid", "test") if s != target and len(members[s]) >= 2]
        donor = donors[0]  # 3+ documents over 3 splits, one empty: some split holds >= 2
        pick = min(members[donor], key=lambda i: _unit_hash(f"{salt}/fill-{target}", i))
        members[donor].remove(pick)
        members[target].append(pick)
    return {doc_id: s for s in SPLITS for doc_id in members[s]}


# -- folders of documents ----------------------------------------------------------------------------


def collect_folder(folder: str | Path, *, parameter: str = "--data") -> dict[str, Path]:
    """Every ``*.txt`` file under ``folder`` (recursively), as {id: path} with id the relative path
    without ``.txt`` ("/"-separated), sorted by id. A missing folder or one without ``.txt`` files is
    a :class:`CorpusError` naming ``parameter`` and the folder."""
    root = Path(folder)
    if not root.is_dir():
        raise CorpusError(f"{parameter}: folder {str(root)!r} does not exist (expected a folder of .txt documents)")
    files = sorted(p for p in root.rglob("*.txt") if p.is_file())
    if not files:
        raise CorpusError(
            f"{parameter}: folder {str(root)!r} holds no .txt file (searched recursively); "
            "expected one document per .txt file"
        )
    return {p.relative_to(root).with_suffix("").as_posix(): p for p in files}


def read_document(path: str | Path) -> str:
    """A document file as cleaned text (UTF-8; a file that is not UTF-8 is a clear error)."""
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(f"document {str(path)!r} is not UTF-8 text ({err}); convert it to UTF-8") from None
    return clean_text(raw)


# -- manifest and split files ------------------------------------------------------------------------


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (a temporary file renamed over the target)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise CorpusError(
            f"root: {str(root)!r} has no {MANIFEST}: not a prepared corpus; run "
            f"`python -m examples.lm.prepare --out {root}` (or with --data DIR) first"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def read_split(root: str | Path) -> dict[str, str]:
    path = Path(root) / SPLIT_FILE
    if not path.is_file():
        raise CorpusError(f"root: {str(root)!r} has no {SPLIT_FILE}; run `python -m examples.lm.prepare --out {root}`")
    return json.loads(path.read_text(encoding="utf-8"))["documents"]


def document_path(root: str | Path, manifest: dict, doc_id: str) -> Path:
    """Where document ``doc_id`` lives: under the manifest's ``docs_root`` (relative to ``root`` for a
    built corpus, absolute for ``--data``)."""
    docs_root = Path(manifest["docs_root"])
    if not docs_root.is_absolute():
        docs_root = Path(root) / docs_root
    return docs_root / f"{doc_id}.txt"
