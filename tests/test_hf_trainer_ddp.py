"""MemoryTrainer under ``torchrun --nproc_per_node 2`` (gloo, CPU) on a tiny GPT-2 with a memory.

The multi-process data path of ``memory_plugins.integrations.hf_trainer``: the SegmentDataset holds
B × W lanes, and at every step process r must read lanes r·B … r·B + B - 1 of that step and carry the
memory of those lanes, while DDP keeps the weights in sync. One torchrun launch (module fixture, about
20 s on 2 CPU cores) trains the runs of ``RUNS`` one after another in the same process group; each rank
records what it trained on (lanes, steps, tokens, the weights before each micro-step) and saves its
final weights and memory state. The tests check them against the stream, against each other, and
against a one-process replay of each rank's lanes.

Notation: B lanes per process, W = 2 processes, n segment length, V vocabulary.
"""

from __future__ import annotations

import argparse
import itertools
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import memory_plugins as mp

from .conftest import SMALL_OPTIONS
from .test_hf_trainer import _chain_documents
from .test_torchrun import torchrun

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments  # noqa: E402

from memory_plugins.integrations.hf_trainer import SEGMENT_KEYS, MemoryTrainer, SegmentDataset  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:memory_plugins. this model has absolute position embeddings"),
              pytest.mark.usefixtures("on_cpu")]  # gloo processes and use_cpu Trainers: the CPU, on a GPU host too

V, N, B, W = 32, 8, 2, 2
STEPS, ACCUMULATE = 4, 2  # optimizer steps of 2 micro-steps: 8 stream steps, in which every rank starts a new document
RUNS: dict[str, tuple[str, dict[str, Any]]] = {  # name: (memory, options of the run)
    **{m: (m, {}) for m in mp.list_memories()},
    # compressive and knn have parameters that only the auxiliary loss reaches; without it they are unused
    **{f"{m}-noaux": (m, {"memory_aux_loss": False}) for m in ("compressive", "knn")},
    # two DataLoader workers; process 0 hands out every step (accelerate's default), or each reads its own
    "xl-workers": ("xl", {"workers": 2}),
    "xl-workers-nodispatch": ("xl", {"workers": 2, "dispatch": False}),
}
CHECKPOINTED = "continuous"  # saves a checkpoint at step 2, resumed as "continuous-resumed"; also predicts
LAUNCHER = """
import sys
sys.path.insert(0, {repo!r})
from tests.test_hf_trainer_ddp import run_rank
run_rank(sys.argv[1:])
"""


def _model(memory: str) -> mp.MemoryModel:
    """Tiny GPT-2 without dropout (so a replay repeats the training forwards exactly), with live random
    memory parameters; the same on every rank (seeded)."""
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=2 * N, n_embd=32, n_layer=2, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0))
    model = mp.wrap(base, memory, **SMALL_OPTIONS[memory])
    with torch.no_grad():
        for p in model.memory.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def _train_set() -> SegmentDataset:
    return SegmentDataset(_chain_documents(12), B * W, N, train=True, bos=0)  # B × W lanes in all


def _held_out() -> SegmentDataset:
    return SegmentDataset(_chain_documents(5, seed=1), B * W, N, bos=0)  # one pass; idle lanes at the end


def _arguments(out: Path, **options: Any) -> TrainingArguments:
    return TrainingArguments(str(out), per_device_train_batch_size=B, per_device_eval_batch_size=B, report_to=[],
                             use_cpu=True, ddp_backend="gloo", disable_tqdm=True, logging_strategy="no", **options)


# -- what runs in each torchrun process -----------------------------------------------------------------


def run_rank(argv: list[str]) -> None:
    """One torchrun process: every run of ``RUNS`` with a fresh model and MemoryTrainer, recording each
    micro-step; saves ``out/{run}-rank{r}.pt`` (what it read, final weights, memory state). Then the
    checkpointed run resumed, and a Trainer with ``split_batches`` (its error in ``split-rank{r}.txt``)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    out = parser.parse_args(argv).out
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message="memory_plugins: this model has absolute position embeddings")
    torch.set_num_threads(1)
    records: list[dict[str, Any]] = []

    class Recording(MemoryTrainer):
        def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Tensor:
            weights = {k: v.detach().clone() for k, v in self.accelerator.unwrap_model(model).state_dict().items()}
            records.append({"weights": weights, **{k: inputs[k].cpu().clone()
                                                   for k in ("input_ids", "attention_mask", *SEGMENT_KEYS)}})
            return super().training_step(model, inputs, *args, **kwargs)

    def train(name: str, memory: str, workers: int = 0, dispatch: bool = True, memory_aux_loss: bool = True,
              resume: str | None = None) -> None:
        records.clear()
        model = _model(memory)
        checkpoints = name == CHECKPOINTED
        args = _arguments(out / name, max_steps=STEPS, gradient_accumulation_steps=ACCUMULATE, learning_rate=1e-2,
                          dataloader_num_workers=workers, save_strategy="steps" if checkpoints else "no",
                          save_steps=STEPS // 2, accelerator_config=None if dispatch else {"dispatch_batches": False})
        trainer = Recording(model=model, args=args, train_dataset=_train_set(), memory_aux_loss=memory_aux_loss)
        result = trainer.train(resume_from_checkpoint=resume)
        # predict() runs on a memory of its own and gives the training stream's memory back
        predictions = torch.as_tensor(trainer.predict(_held_out()).predictions) if checkpoints else None
        torch.save({"rank": trainer.args.process_index, "world_size": trainer.args.world_size,
                    "global_step": result.global_step, "loss": result.training_loss, "records": records,
                    "weights": model.state_dict(), "memory": model.memory_state(), "predictions": predictions},
                   out / f"{name}-rank{trainer.args.process_index}.pt")

    for name, (memory, options) in RUNS.items():  # one process group for all
        train(name, memory, **options)
    train(f"{CHECKPOINTED}-resumed", CHECKPOINTED, resume=str(out / CHECKPOINTED / f"checkpoint-{STEPS // 2}"))

    args = _arguments(out / "split", max_steps=1, accelerator_config={"split_batches": True})
    try:
        MemoryTrainer(model=_model("xl"), args=args, train_dataset=_train_set()).get_train_dataloader()
        message = "no error"
    except ValueError as error:
        message = str(error)
    (out / f"split-rank{args.process_index}.txt").write_text(message)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of one torchrun launch of :func:`run_rank`."""
    tmp = tmp_path_factory.mktemp("ddp")
    torchrun(tmp, LAUNCHER, ["--out", str(tmp / "out")])
    return tmp / "out"


def _ranks(out: Path, name: str) -> list[dict[str, Any]]:
    ranks = [torch.load(out / f"{name}-rank{r}.pt", weights_only=False) for r in range(W)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == W for r in ranks)
    return ranks


def _layers_equal(a: dict[str, Any], b: dict[str, Any], atol: float = 0.0) -> bool:
    """Whether two ``memory_state()["layers"]`` hold the same layers, keys, shapes and values (to ``atol``)."""
    if a.keys() != b.keys() or any((a[k] is None) != (b[k] is None) for k in a):
        return False
    for name in (k for k in a if a[k] is not None):
        if a[name].keys() != b[name].keys():
            return False
        for key, x in a[name].items():
            y = b[name][key]
            if x.shape != y.shape or not torch.allclose(x.double(), y.double(), atol=atol, rtol=0):
                return False
    return True


def _replay(memory: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """One process, one rank's lanes: every recorded micro-step again with the weights it ran with,
    resetting the memory where a document starts; returns the memory state at the end."""
    model = _model(memory).train()
    with torch.no_grad():
        for k, record in enumerate(records):
            model.load_state_dict(record["weights"])
            model.reset_memory(None if k == 0 else record["doc_start"].bool())
            model(input_ids=record["input_ids"], attention_mask=record["attention_mask"])
    return model.memory_state()


# -- the checks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RUNS)
def test_each_rank_reads_its_own_lanes_of_every_step(runs: Path, name: str) -> None:
    micro = STEPS * ACCUMULATE
    stream = list(itertools.islice(_train_set().batches(), micro))  # every step, all B × W lanes
    seen = []
    for r, rank in enumerate(_ranks(runs, name)):
        assert rank["global_step"] == STEPS and torch.isfinite(torch.tensor(rank["loss"]))
        assert len(rank["records"]) == micro, (r, len(rank["records"]))
        own = slice(r * B, (r + 1) * B)
        for s, (record, full) in enumerate(zip(rank["records"], stream)):
            assert record["step"].tolist() == [s] * B, (r, s, record["step"])
            assert record["lane"].tolist() == list(range(r * B, (r + 1) * B)), (r, s, record["lane"])
            for key in ("input_ids", "attention_mask", "doc_start"):
                assert torch.equal(record[key], full[key][own]), (r, s, key)
        seen.append({(int(rec["step"][0]), lane) for rec in rank["records"] for lane in rec["lane"].tolist()})
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(itertools.product(range(micro), range(B * W)))
    starts = torch.stack([full["doc_start"] for full in stream[1:]])  # (micro - 1, B × W)
    assert starts[:, :B].any() and starts[:, B:].any(), "each rank should start a new document during the run"


@pytest.mark.parametrize("name", RUNS)
def test_ddp_keeps_the_weights_equal_on_both_ranks(runs: Path, name: str) -> None:
    ranks = _ranks(runs, name)
    for name_, p in ranks[0]["weights"].items():
        assert torch.equal(p, ranks[1]["weights"][name_]), name_
    for s, (a, b) in enumerate(zip(ranks[0]["records"], ranks[1]["records"])):  # before every micro-step too
        assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"]), s
    first = ranks[0]["records"][0]["weights"]
    assert any(not torch.equal(first[k], p) for k, p in ranks[0]["weights"].items()), "training changed nothing"


@pytest.mark.parametrize("name", RUNS)
def test_each_rank_keeps_the_memory_of_its_own_lanes(runs: Path, name: str) -> None:
    ranks = _ranks(runs, name)
    states = [rank["memory"]["layers"] for rank in ranks]
    assert all(layer is not None for state in states for layer in state.values())
    assert not _layers_equal(states[0], states[1], atol=1e-3), "both ranks hold the same memory"
    for r, rank in enumerate(ranks):
        replayed = _replay(RUNS[name][0], rank["records"])["layers"]
        assert _layers_equal(states[r], replayed, atol=1e-5), f"rank {r}'s memory is not a replay of its lanes"


def test_resuming_a_checkpoint_restores_each_ranks_memory(runs: Path) -> None:
    # one stream state per process in the checkpoint; resumed from step 2, each rank ends where it did
    # without the interruption: weights, and its own memory (rank 1 with rank 0's memory would differ)
    assert {"memory_state_0.safetensors", "memory_state_1.safetensors"} <= {
        f.name for f in (runs / CHECKPOINTED / f"checkpoint-{STEPS // 2}").iterdir()}
    for straight, resumed in zip(_ranks(runs, CHECKPOINTED), _ranks(runs, f"{CHECKPOINTED}-resumed")):
        assert resumed["global_step"] == STEPS and len(resumed["records"]) == STEPS * ACCUMULATE // 2
        for name, p in straight["weights"].items():
            assert torch.equal(p, resumed["weights"][name]), (resumed["rank"], name)
        assert _layers_equal(straight["memory"]["layers"], resumed["memory"]["layers"]), f"rank {resumed['rank']}"


def test_predict_under_two_processes_equals_one_process(runs: Path, tmp_path: Path) -> None:
    # each process predicts its B lanes of every step; gathered, they equal one process reading all B × W
    ranks = _ranks(runs, CHECKPOINTED)
    assert torch.equal(ranks[0]["predictions"], ranks[1]["predictions"])
    model = _model(CHECKPOINTED).eval()
    model.load_state_dict(ranks[0]["weights"])
    single = TrainingArguments(str(tmp_path), per_device_eval_batch_size=B * W, report_to=[], use_cpu=True)
    expected = torch.as_tensor(MemoryTrainer(model=model, args=single).predict(_held_out()).predictions)
    assert ranks[0]["predictions"].shape == expected.shape == (len(_held_out()), N, V)
    torch.testing.assert_close(ranks[0]["predictions"], expected, atol=1e-4, rtol=1e-4)


def test_split_batches_is_refused(runs: Path) -> None:
    for r in range(W):
        assert (runs / f"split-rank{r}.txt").read_text().startswith(
            "MemoryTrainer: accelerator_config split_batches=True cannot read a SegmentDataset")


def test_resuming_with_another_number_of_processes_is_refused(runs: Path, tmp_path: Path) -> None:
    # the checkpoint holds one stream state per process; one process would take rank 0's lanes' memory
    # for all B × W lanes, so the resume stops before training, naming both counts
    checkpoint = runs / CHECKPOINTED / f"checkpoint-{STEPS // 2}"
    single = TrainingArguments(str(tmp_path), per_device_train_batch_size=B * W, max_steps=STEPS, report_to=[],
                               use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True)
    trainer = MemoryTrainer(model=_model(CHECKPOINTED), args=single, train_dataset=_train_set())
    with pytest.raises(ValueError, match="holds the stream states of 2 processes.*this run has 1"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
