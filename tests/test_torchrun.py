"""Both benchmarks under ``torchrun --nproc_per_node 2`` (gloo, CPU) on tiny configurations.

torchrun starts fresh interpreters, so a small launcher script registers the tiny preset (the same
ones the single-process tests use) and calls the benchmark's ``main``. Checked: the run completes,
rank 0 alone printed and wrote the outputs, and the two ranks trained on disjoint data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .test_lm_benchmark import _write_corpus

REPO = Path(__file__).resolve().parents[1]

LM_LAUNCHER = """
import sys
sys.path.insert(0, {repo!r})
from examples.lm import benchmark
from tests.test_lm_benchmark import TINY
benchmark.PRESETS["tiny"] = TINY
sys.exit(benchmark.main(sys.argv[1:]))
"""

SORTING_LAUNCHER = """
import sys
sys.path.insert(0, {repo!r})
from examples.sorting import benchmark
benchmark.PRESETS["tiny"] = benchmark.Preset(
    lengths=(48,), segment=32, memories=("none", "compressive"), dim=16, depth=1, heads=2, batch=4, n_train=64,
    n_valid=8, n_test=8, epochs=0.5, warmup=2, evals=1)  # 8 steps of 4 sequences per rank
sys.argv[0] = "benchmark"
benchmark.main()
"""


def torchrun(tmp_path: Path, launcher: str, args: list[str]) -> str:
    """Run ``launcher`` under ``torchrun --nproc_per_node 2``; returns the merged stdout of both ranks."""
    script = tmp_path / "launch.py"
    script.write_text(launcher.format(repo=str(REPO)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *args]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1",
                               "CUDA_VISIBLE_DEVICES": ""})  # gloo on the CPU, on a GPU host too
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def disjoint(by_rank: list[list]) -> None:
    assert len(by_rank) == 2 and all(by_rank), by_rank
    assert not set(by_rank[0]) & set(by_rank[1]), f"ranks trained on shared data: {set(by_rank[0]) & set(by_rank[1])}"


@pytest.mark.slow
def test_lm_benchmark_under_torchrun(tmp_path: Path) -> None:
    _write_corpus(tmp_path / "docs")
    out = tmp_path / "runs"
    stdout = torchrun(tmp_path, LM_LAUNCHER, ["--preset", "tiny", "--data", str(tmp_path / "docs"), "--tokenizer",
                                              "bpe300", "--out", str(out), "--memories", "xl", "continuous",
                                              "--threads", "1"])
    assert stdout.count("preset tiny:") == 1 and "2 processes (DDP)" in stdout  # rank 0 alone logs
    for memory in ("xl", "continuous"):
        assert stdout.count(f"{memory:>18}: test ppl") == 1, stdout
        result = json.loads((out / memory / "result.json").read_text())
        assert result["distributed"]["world_size"] == 2 and result["distributed"]["backend"] == "gloo"
        seen = result["distributed"]["train_documents_by_rank"]
        disjoint(seen)
        assert result["tokens_per_step"] == 2 * 2 * 8  # 2 ranks × 2 lanes × 8 tokens
        assert (out / memory / "model.pt").is_file() and not (out / memory / "checkpoint.pt").exists()
    assert {p.name for p in out.iterdir()} >= {"results.json", "table.md", "xl", "continuous", "corpus"}


@pytest.mark.slow
def test_sorting_benchmark_under_torchrun(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    stdout = torchrun(tmp_path, SORTING_LAUNCHER, ["--preset", "tiny", "--out", str(out), "--threads", "1"])
    assert stdout.count("Sorting, preset 'tiny'") == 1, stdout  # rank 0 alone prints and writes the table
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["memory"] for r in runs] == ["none", "compressive"]
    for r in runs:
        assert r["distributed"]["world_size"] == 2
        seen = r["distributed"]["train_indices_by_rank"]
        disjoint(seen)
        assert all(i % 2 == rank for rank, ids in enumerate(seen) for i in ids)  # rank r: every 2nd from r
    assert (out / "table.md").is_file() and (out / "none_T48" / "model.pt").is_file()
