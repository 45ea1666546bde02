"""transformers.Trainer on a wrapped GPT-2: the forward signature Trainer reads, and long documents through
SegmentDataset + MemoryTrainer (memory reset exactly at document boundaries, no smaller last batch,
nothing shared between unrelated batches, checkpoints). Tiny random configs, no hub access.

Notation: B lanes (batch), n segment length, V vocabulary.
"""

from __future__ import annotations

import copy
import inspect
import io
from typing import Any, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import memory_plugins as mp

from .conftest import DEVICE, SMALL_OPTIONS

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it (the hf extra installs it)
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from memory_plugins.integrations.hf_trainer import MemoryTrainer, SegmentDataset  # noqa: E402

MEMORIES = mp.list_memories()
V, N, B = 32, 8, 2
pytestmark = pytest.mark.filterwarnings("ignore:memory_plugins. this model has absolute position embeddings")


@pytest.fixture(autouse=True, scope="module")
def _quiet() -> Iterator[None]:
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(level)


def _gpt2() -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=2 * N, n_embd=32, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0))


def _wrapped(memory: str, live: bool = True) -> mp.MemoryModel:
    """A wrapped tiny GPT-2; ``live``: random memory parameters, so every memory path changes the output."""
    model = mp.wrap(_gpt2(), memory, **SMALL_OPTIONS[memory])
    if live:
        with torch.no_grad():
            for p in model.memory.parameters():
                p.add_(0.2 * torch.randn_like(p))
    return model


def _chain_documents(count: int, seed: int = 0) -> list[Tensor]:
    """Documents of 30..69 tokens cycling through 1, 2, ..., 8 from a random start: a tiny model learns
    the successor rule within a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(30, 70, (count,), generator=g, device="cpu").tolist()
    starts = torch.randint(0, 8, (count,), generator=g, device="cpu").tolist()
    return [(torch.arange(length, device="cpu") + start) % 8 + 1 for length, start in zip(lengths, starts)]


def _args(tmp_path, **overrides: Any) -> TrainingArguments:
    """Trainer's defaults, plus what a test needs: an output folder, few steps, no reporting, a tiny batch."""
    options = dict(max_steps=30, report_to=[], per_device_train_batch_size=B, per_device_eval_batch_size=B,
                   use_cpu=DEVICE.type == "cpu", save_strategy="no")
    return TrainingArguments(str(tmp_path / "out"), **{**options, **overrides})


# -- the forward signature ------------------------------------------------------------------------------


def test_wrapped_forward_shows_the_base_signature_to_trainer(tmp_path) -> None:
    model = _wrapped("xl", live=False)
    base_params = list(inspect.signature(model.model.forward).parameters)
    assert list(inspect.signature(model.forward).parameters) == base_params
    copies = (copy.deepcopy(model), _pickled(model), model._replicate_for_data_parallel())  # nn.DataParallel's
    for copied in copies:  # each copy's forward is its own (runs its own base model), with the same signature
        assert copied.forward.__self__ is copied
        assert list(inspect.signature(copied.forward).parameters) == base_params
    # a plain Trainer with default arguments keeps the columns the base model takes, drops the others
    rows = [{"input_ids": torch.arange(N, device="cpu"), "attention_mask": torch.ones(N, dtype=torch.long, device="cpu"),
             "labels": torch.arange(N, device="cpu"), "text": "unused"} for _ in range(4)]
    batch = next(iter(Trainer(model=model, args=_args(tmp_path), train_dataset=rows).get_train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    base = model.unwrap()
    assert type(base) is GPT2LMHeadModel and "labels" in inspect.signature(base.forward).parameters


def _pickled(model: mp.MemoryModel) -> mp.MemoryModel:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


# -- training through MemoryTrainer ---------------------------------------------------------------------


@pytest.mark.parametrize("memory", MEMORIES)
def test_trainer_with_default_arguments_trains_on_long_documents(tmp_path, memory: str) -> None:
    model = _wrapped(memory, live=False)
    train = SegmentDataset(_chain_documents(24), B, N, train=True, bos=0)  # infinite: max_steps ends it
    held_out = SegmentDataset(_chain_documents(4, seed=1), B, N, bos=0)  # one pass, idle lanes at the end
    trainer = MemoryTrainer(model=model, args=_args(tmp_path, max_steps=36, learning_rate=1e-2),
                            train_dataset=train, eval_dataset=held_out)
    before = trainer.evaluate()["eval_loss"]
    result = trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert result.global_step == 36 and torch.isfinite(torch.tensor(result.training_loss))
    assert after < 0.5 * before, (memory, before, after)


def _fresh_logits(model: mp.MemoryModel, document: Tensor) -> list[Tensor]:
    """Logits (n, V) per segment of ``document`` read alone (one lane) from an empty memory."""
    model.reset_memory()
    with torch.no_grad():
        out = [model(input_ids=b["input_ids"].to(DEVICE), attention_mask=b["attention_mask"].to(DEVICE)).logits[0].cpu()
               for b in SegmentDataset([document.cpu()], 1, N, bos=0).batches()]
    model.reset_memory()
    return out


@pytest.mark.parametrize("memory", MEMORIES)
def test_memory_is_reset_exactly_at_document_boundaries(tmp_path, memory: str) -> None:
    # lane 0 reads documents 0 then 2, lane 1 reads document 1 and then idles (padding rows, no smaller batch)
    docs = [torch.arange(1, 20) % V, torch.arange(5, 50) % V, (torch.arange(40) * 3 + 1) % V]
    data = SegmentDataset(docs, B, N, bos=0)
    model = _wrapped(memory).eval()
    trainer = MemoryTrainer(model=model, args=_args(tmp_path), eval_dataset=data)
    predictions = torch.as_tensor(trainer.predict(data).predictions, device="cpu")  # (steps · B, n, V)
    segments = list(data.stream)
    assert predictions.shape == (len(segments) * B, N, V)
    assert segments[-1].valid[0].any() and not segments[-1].valid[1].any()  # the last step has an idle lane

    for d, document in enumerate(docs):
        rows = [(k, b) for k, s in enumerate(segments) for b in range(B) if int(s.doc_index[b]) == d]
        fresh = _fresh_logits(model, document)
        assert len(rows) == len(fresh) > 1
        for (k, b), expected in zip(rows, fresh):
            real = torch.cat([torch.tensor([True], device="cpu"), segments[k].valid[b, :-1]])  # (n,) input tokens of the document
            torch.testing.assert_close(predictions[k * B + b][real], expected[real], atol=1e-4, rtol=1e-4)

    # the check has teeth: without the reset, lane 0 reads document 2's first segment with document 0's memory
    model.reset_memory()
    with torch.no_grad():
        leaky = [model(**{k: v.to(DEVICE) for k, v in batch.items() if k not in ("doc_start", "lane", "step")}).logits
                 for batch in data.batches()]  # [(B, n, V)] per step
    k = next(k for k, s in enumerate(segments) if int(s.doc_index[0]) == 2)
    assert not torch.allclose(leaky[k][0].cpu(), _fresh_logits(model, docs[2])[0], atol=1e-3)


def test_unrelated_batches_share_no_memory_and_the_smaller_last_batch_works(tmp_path) -> None:
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(1, V, (N,), generator=g, device="cpu")} for _ in range(5)]
    for row in rows:
        row["labels"] = row["input_ids"].clone()
    model = _wrapped("xl").eval()
    trainer = MemoryTrainer(model=model, args=_args(tmp_path, per_device_eval_batch_size=2), eval_dataset=rows)
    predictions = torch.as_tensor(trainer.predict(rows).predictions, device="cpu")  # (5, n, V): batches of 2, 2, 1
    for i, row in enumerate(rows):
        torch.testing.assert_close(predictions[i], _one_segment(model, row["input_ids"]), atol=1e-4, rtol=1e-4)
    # training on them: shuffled batches, the last one smaller, for two epochs
    trainer = MemoryTrainer(model=model, args=_args(tmp_path, max_steps=-1, num_train_epochs=2), train_dataset=rows)
    assert trainer.train().global_step == 6


def _one_segment(model: mp.MemoryModel, tokens: Tensor) -> Tensor:
    """Logits (n, V) of ``tokens`` (n,) read alone from an empty memory."""
    model.reset_memory()
    with torch.no_grad():
        return model(input_ids=tokens[None].to(DEVICE)).logits[0].cpu()  # (n, V)


# -- order, misuse and checkpoints ----------------------------------------------------------------------


def test_out_of_order_batches_and_misuse_are_refused(tmp_path) -> None:
    data = SegmentDataset(_chain_documents(6), B, N, train=True, bos=0)
    model = _wrapped("xl").eval()
    trainer = MemoryTrainer(model=model, args=_args(tmp_path), train_dataset=data)
    batches = iter(data.batches())
    first, _, third = next(batches), next(batches), next(batches)
    trainer.prediction_step(model, first, prediction_loss_only=True)
    with pytest.raises(RuntimeError, match=r"out of order \(step 2 on lanes \[0, 1\] after step 0"):
        trainer.prediction_step(model, third, prediction_loss_only=True)
    # step 0 again in the middle of an endless stream (it would reset every lane's memory): refused
    with pytest.raises(RuntimeError, match=r"started again \(step 0 on lanes \[0, 1\]\) after step 0 of an endless"):
        trainer.prediction_step(model, first, prediction_loss_only=True)
    # a finite pass may start again after its last step, and not before
    finite = SegmentDataset(_chain_documents(6), B, N, bos=0)
    steps = list(finite.batches())
    trainer.train_dataset = finite
    trainer.get_train_dataloader()  # a new read of the stream: its own order, knowing the pass's length
    for batch in steps + steps[:1]:
        trainer.prediction_step(model, dict(batch), prediction_loss_only=True)
    with pytest.raises(RuntimeError, match=rf"after step 0 of a pass of {len(steps)} steps"):
        trainer.prediction_step(model, dict(steps[0]), prediction_loss_only=True)
    with pytest.raises(ValueError, match=r"SegmentDataset has batch_size=2 lanes but the Trainer reads 4 per device"):
        MemoryTrainer(model=model, args=_args(tmp_path, per_device_train_batch_size=4),
                      train_dataset=data).get_train_dataloader()
    finite = SegmentDataset(_chain_documents(6), B, N, bos=0)
    plain = Trainer(model=model, args=_args(tmp_path), train_dataset=finite)
    with pytest.raises(TypeError, match="SegmentDataset has no random access: .*MemoryTrainer.*carry memory across documents"):
        next(iter(plain.get_train_dataloader()))
    with pytest.raises(TypeError, match="MemoryTrainer trains a model wrapped by memory_plugins.wrap"):
        MemoryTrainer(model=_gpt2(), args=_args(tmp_path))
    with pytest.raises(TypeError, match=r"documents\[1\] must be a memory_plugins.data.Document.*got float"):
        SegmentDataset([[1, 2, 3], 2.5], B, N)
    with pytest.raises(TypeError, match="memory_aux_loss must be True or False, got 1"):
        MemoryTrainer(model=model, args=_args(tmp_path), memory_aux_loss=1)


def _train_with_checkpoints(out, resume: str | None = None) -> mp.MemoryModel:
    torch.manual_seed(0)
    model = _wrapped("continuous")  # trained memory parameters and a long-term state: both must come back
    data = SegmentDataset(_chain_documents(8), B, N, train=True, bos=0)
    args = _args(out, max_steps=6, save_strategy="steps", save_steps=3)
    MemoryTrainer(model=model, args=args, train_dataset=data).train(resume_from_checkpoint=resume)
    return model


def test_resuming_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path) -> None:
    straight = _train_with_checkpoints(tmp_path / "a")
    checkpoint = tmp_path / "a" / "out" / "checkpoint-3"
    assert {"memory.safetensors", "memory_state.safetensors", "model.safetensors"} <= {f.name for f in checkpoint.iterdir()}
    resumed = _train_with_checkpoints(tmp_path / "b", resume=str(checkpoint))  # steps 4..6 after the checkpoint
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):  # base and memory
        assert torch.equal(p, q), name
    for name, state in straight.memory_state()["layers"].items():
        restored = resumed.memory_state()["layers"][name]
        assert state is not None and restored is not None and state.keys() == restored.keys()
        for key in state:
            assert torch.equal(state[key], restored[key]), (name, key)


def test_load_best_model_at_end_takes_the_memorys_weights_from_the_best_checkpoint_too(tmp_path) -> None:
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = _wrapped("continuous")
    data = SegmentDataset(_chain_documents(8), B, N, train=True, bos=0)
    held_out = SegmentDataset(_chain_documents(2, seed=5), B, N, bos=0)
    # the worst evaluation is "best" (greater_is_better on a loss): an early checkpoint, not the last
    args = _args(tmp_path, max_steps=6, learning_rate=5e-2, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                 save_steps=2, load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True)
    trainer = MemoryTrainer(model=model, args=args, train_dataset=data, eval_dataset=held_out)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-6")
    saved, last = load_file(f"{best}/memory.safetensors"), load_file(f"{tmp_path}/out/checkpoint-6/memory.safetensors")
    assert any(not torch.equal(saved[k], last[k]) for k in saved)  # the memory's weights moved after the best one
    for key, value in model.memory.state_dict().items():
        assert torch.equal(value.cpu(), saved[key]), key


def test_a_compiled_wrapped_model_trains_as_the_eager_one(tmp_path) -> None:
    """torch_compile=True (or a model compiled by the user) hands Trainer a compiled module around the
    wrapped model: MemoryTrainer finds the wrapped model inside it."""
    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = _wrapped("xl")
        data = SegmentDataset(_chain_documents(4), B, N, train=True, bos=0)
        args = _args(tmp_path / str(compiled), max_steps=3, logging_steps=1, torch_compile=compiled,
                     torch_compile_backend="eager")  # dynamo's capture without inductor's codegen: seconds
        trainer = MemoryTrainer(model=model, args=args, train_dataset=data)
        trainer.train()
        losses[compiled] = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_the_evaluation_loss_is_the_mean_of_each_batchs_token_mean(tmp_path) -> None:
    """A causal LM scores labels[..., 1:]: each segment of n labels has n - 1 targets, and the loss of a
    batch is its targets' mean (GPT-2 names no loss type, from which Trainer would have counted n)."""
    torch.manual_seed(0)
    model = _wrapped("xl")
    docs = _chain_documents(3)
    data = SegmentDataset(docs, B, N, bos=0)
    reported = MemoryTrainer(model=model, args=_args(tmp_path), eval_dataset=data).evaluate()["eval_loss"]
    means = []
    model.eval()
    model.reset_memory()
    with torch.no_grad():
        for batch in data.batches():
            model.reset_memory(batch.pop("doc_start"))
            labels = batch.pop("labels")
            logits = model(**batch).logits  # (b, n, V)
            means.append(F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100).item())
    assert reported == pytest.approx(sum(means) / len(means), rel=1e-5)
