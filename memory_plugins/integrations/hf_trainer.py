"""Train a wrapped Hugging Face model with ``transformers.Trainer`` on long documents.

    from memory_plugins.integrations.hf_trainer import MemoryTrainer, SegmentDataset

    model = memory_plugins.wrap(GPT2LMHeadModel(config), "xl", mem_len=256)
    train = SegmentDataset(documents, batch_size=8, seg_len=128, train=True, bos=eos_id)
    trainer = MemoryTrainer(model=model, args=TrainingArguments("out", per_device_train_batch_size=8,
                                                                max_steps=1000), train_dataset=train)
    trainer.train()

Notation: B lanes (the batch), n segment length, W processes.

**The data.** :class:`SegmentDataset` reads documents through :class:`memory_plugins.data.DocumentStream`:
each of B lanes reads one document, segment after segment, and takes the next document when it is
done (``doc_start``). A step is one batch of B lanes; examples come lane by lane in step order, so a
DataLoader with batch size B rebuilds the steps. Every batch has B rows: a lane with nothing left
(the end of an evaluation pass) is padding with ``attention_mask`` 0 and ``labels`` -100, so there is
no smaller last batch. Examples follow transformers' conventions: ``input_ids`` (n,), ``attention_mask``
(n,) and ``labels`` (n,) = ``input_ids`` with -100 at padding (the model shifts them, so each segment
predicts its tokens 2..n; the first token of a segment is context only, and enters the memory like the
others), plus ``doc_start``, ``lane`` and ``step`` for the trainer.

**The trainer.** :class:`MemoryTrainer` is ``Trainer`` with these differences: it reads a SegmentDataset
in order (no shuffling; Trainer's own sampler is never used for it) and before every forward resets the
memory of the lanes that start a document (``model.reset_memory(doc_start)``), checking that the batches
arrive in order and on the same lanes; it adds the memory's auxiliary loss (KL, reconstruction) to the
training loss; an ordinary dataset (shuffled, unrelated batches) gets an empty memory before every
forward, so nothing leaks between batches and the last, smaller batch works; evaluation runs on its own
memory and gives the training stream's memory back afterwards; checkpoints save the memory (weights and
stream state) beside the base model, and ``resume_from_checkpoint`` restores both. With ``detach=False``
the graph through the memory is cut after every step (truncated backpropagation over one segment).

Several processes (DDP): build the dataset with ``batch_size = per_device_train_batch_size × W``; process
r then reads lanes r·B … r·B + B - 1 at every step and keeps the memory of those lanes. This holds with
accelerate's ``dispatch_batches`` on (its default here: process 0 reads a step as W batches and hands
them out) or off (each process reads the stream and keeps its share), and with
``dataloader_num_workers`` > 0 (workers take whole batches in turn); ``split_batches`` is refused.
Checkpoints hold each process's stream state (``memory_state_{r}.safetensors``), which it takes back
on resuming with as many processes. Where ``ddp_find_unused_parameters`` is left unset, DDP gets
``find_unused_parameters=False`` (unless ``memory_aux_loss=False``); see
``MemoryTrainer._build_accelerator_args`` for why.

``transformers`` is imported when :class:`MemoryTrainer` is first used; :class:`SegmentDataset` needs torch only.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from memory_plugins.data import IGNORE, Document, DocumentStream, Segment
from memory_plugins.model import (MEMORY_CONFIG, MEMORY_STATE, MEMORY_WEIGHTS, MemoryModel, _read_memory_files,
                                   _write_state_file)

SEGMENT_KEYS = ("doc_start", "lane", "step")  # what MemoryTrainer takes out of a batch before the forward
RANK_MEMORY_STATE = "memory_state_{}.safetensors"  # process r's stream state in a checkpoint of several processes
_MISUSE = (
    "a SegmentDataset is read in lane order by memory_plugins.integrations.hf_trainer.MemoryTrainer (or "
    "through .batches() in your own loop), which resets each lane's memory at its document boundaries; a "
    "plain Trainer or DataLoader would shuffle its segments and carry memory across documents"
)


def _as_document(item: Any, index: int) -> Document:
    if isinstance(item, Document):
        return item
    if isinstance(item, Tensor) and item.dim() == 1 and not item.is_floating_point():
        return Document(f"doc{index}", item)
    if isinstance(item, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
        return Document(f"doc{index}", torch.tensor(item, dtype=torch.int64))
    raise TypeError(f"SegmentDataset: documents[{index}] must be a memory_plugins.data.Document, a 1-D integer "
                    f"tensor or a list of token ids, got {type(item).__name__}")


class SegmentDataset(Dataset):
    """Documents as transformers-style examples in lane-major step order, for :class:`MemoryTrainer`.

    Args are those of :class:`memory_plugins.data.DocumentStream` (``batch_size`` = B lanes in all
    processes); ``documents`` may also be 1-D integer tensors or lists of token ids. ``train=True``
    cycles over seeded shuffles without end (give Trainer ``max_steps``); ``train=False`` reads every
    document once (one epoch; evaluation). ``len()`` is the number of examples, steps × B.
    """

    def __init__(self, documents: Sequence[Any], batch_size: int, seg_len: int, *, train: bool = False,
                 seed: int = 0, bos: int | None = None, pad_id: int = 0, short: str = "keep") -> None:
        if isinstance(documents, (str, bytes)) or not isinstance(documents, Sequence):
            raise TypeError(f"SegmentDataset: documents must be a sequence of documents, got {type(documents).__name__}")
        docs = [_as_document(d, i) for i, d in enumerate(documents)]
        self.stream = DocumentStream(docs, batch_size, seg_len, train=train, seed=seed, bos=bos, pad_id=pad_id,
                                     short=short)

    @property
    def lanes(self) -> int:
        return self.stream.batch_size

    @property
    def seg_len(self) -> int:
        return self.stream.seg_len

    def __len__(self) -> int:
        if self.stream.train:
            raise TypeError("SegmentDataset(train=True) is infinite and has no len(); give Trainer max_steps")
        return len(self.stream) * self.lanes

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        raise TypeError(f"SegmentDataset has no random access: {_MISUSE}")

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        raise TypeError(f"SegmentDataset is not iterated directly: {_MISUSE}")

    def batches(self) -> Iterator[dict[str, Tensor]]:
        """The steps as batches of B lanes, for a loop of your own (call ``model.reset_memory(batch.pop(
        "doc_start"))`` before each forward)."""
        for step, segment in enumerate(self.stream):
            yield segment_batch(segment, step)

    def lane_items(self) -> LaneItems:
        """The examples in order, as the IterableDataset that MemoryTrainer's DataLoader reads."""
        return LaneItems(self)


def segment_batch(segment: Segment, step: int) -> dict[str, Tensor]:
    """One stream step in transformers' conventions (see the module docstring)."""
    active = segment.doc_index >= 0  # (B,)
    real = torch.cat([active[:, None], segment.valid[:, :-1]], dim=1)  # (B, n): input j is a document token
    inputs = segment.inputs  # (B, n)
    return {
        "input_ids": inputs,
        "attention_mask": real.long(),  # (B, n)
        "labels": inputs.masked_fill(~real, IGNORE),  # (B, n); the model shifts them by one
        "doc_start": segment.doc_start,  # (B,)
        "lane": torch.arange(inputs.shape[0], device=inputs.device),  # (B,)
        "step": torch.full((inputs.shape[0],), step, dtype=torch.int64, device=inputs.device),  # (B,)
    }


class LaneItems(IterableDataset):
    """The examples of a :class:`SegmentDataset`, lane by lane in step order. DataLoader workers take
    whole blocks of ``block`` consecutive examples (default: one step, B lanes) in turn (worker w of
    K: blocks w, w + K, ...), which an in-order DataLoader with batch size ``block`` interleaves back
    into step order. When one process reads the batches of all W processes (accelerate's
    ``dispatch_batches``), a block is one process's share of a step, the DataLoader's batch."""

    def __init__(self, dataset: SegmentDataset, block: int | None = None) -> None:
        self.dataset = dataset
        self.block = dataset.lanes if block is None else block

    @property
    def block(self) -> int:
        return self._block

    @block.setter
    def block(self, block: int) -> None:
        lanes = self.dataset.lanes
        if isinstance(block, bool) or not isinstance(block, int) or block < 1 or lanes % block:
            raise ValueError(f"LaneItems: block must be a positive divisor of the {lanes} lanes, got {block!r}")
        self._block = block

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        per_step = self.dataset.lanes // self.block
        for batch in self.dataset.batches():
            first = int(batch["step"][0]) * per_step  # the index of this step's first block
            for block in range(first, first + per_step):
                if block % workers != worker:
                    continue
                for b in range((block - first) * self.block, (block - first + 1) * self.block):
                    yield {k: v[b] for k, v in batch.items()}


class _StepOrder:
    """Checks that a stream's batches arrive step after step on the same lanes, and that the stream
    starts again (step 0) only after the last step of a pass: ``steps`` per pass of a finite stream,
    None for an endless one (never again). A repeated step 0 in the middle would silently reset every
    lane's memory and hide batches handed to the wrong process."""

    def __init__(self, steps: int | None = None) -> None:
        self.steps = steps
        self.lanes: Tensor | None = None
        self.step = -1

    def check(self, lane: Tensor, step: Tensor) -> bool:
        """True when this batch starts the stream (step 0: every lane starts a document)."""
        lane, step = lane.cpu(), step.cpu()
        s = int(step[0])
        if not bool((step == s).all()):
            raise RuntimeError(f"MemoryTrainer: a batch mixes stream steps {sorted(set(step.tolist()))}; {_MISUSE}")
        if self.lanes is not None and s != 0 and (s != self.step + 1 or not torch.equal(lane, self.lanes)):
            raise RuntimeError(
                f"MemoryTrainer: segment batches out of order (step {s} on lanes {lane.tolist()} after step {self.step} "
                f"on lanes {self.lanes.tolist()}); keep dataloader_in_order=True and read the SegmentDataset "
                "through MemoryTrainer")
        if self.lanes is not None and s == 0 and (self.steps is None or self.step != self.steps - 1):
            whole = "an endless stream" if self.steps is None else f"a pass of {self.steps} steps"
            raise RuntimeError(
                f"MemoryTrainer: the stream started again (step 0 on lanes {lane.tolist()}) after step {self.step} of "
                f"{whole}; keep dataloader_in_order=True and read the SegmentDataset through MemoryTrainer")
        self.lanes, self.step = lane, s
        return s == 0


def _memory_model(trainer: Any, model: Any) -> MemoryModel:
    inner = trainer.accelerator.unwrap_model(model)
    inner = getattr(inner, "_orig_mod", inner)  # compiled (torch_compile=True, or by the user): the model inside
    if not isinstance(inner, MemoryModel):
        raise TypeError(f"MemoryTrainer trains a model wrapped by memory_plugins.wrap(), got {type(inner).__name__}")
    return inner


def _load_memory(model: MemoryModel, directory: Path, state_file: str | None = MEMORY_STATE) -> None:
    """Memory weights and, if saved, the stream state (``state_file``; None: the weights only) of a
    checkpoint, onto the memory's device."""
    p = next(model.memory.parameters(), None)
    _read_memory_files(model, directory, p.device if p is not None else torch.device("cpu"), state_file)


@functools.cache
def _trainer_class() -> type:
    import transformers
    from transformers.utils.generic import can_return_loss, find_labels

    class MemoryTrainer(transformers.Trainer):
        """``transformers.Trainer`` for a model wrapped by :func:`memory_plugins.wrap` (see the module
        docstring). ``memory_aux_loss=False`` leaves the memory's auxiliary loss out of the training loss
        (leave it on unless the model adds it itself, e.g. after ``hf.include_memory_aux_loss``)."""

        def __init__(self, *args: Any, memory_aux_loss: bool = True, **kwargs: Any) -> None:
            if not isinstance(memory_aux_loss, bool):
                raise TypeError(f"MemoryTrainer: memory_aux_loss must be True or False, got {memory_aux_loss!r}")
            self.memory_aux_loss = memory_aux_loss  # before Trainer's __init__: _build_accelerator_args reads it
            super().__init__(*args, **kwargs)
            base = _memory_model(self, self.model).model
            if self.args.label_names is None:  # Trainer read them from the wrapper's class; the base's are meant
                self.label_names = find_labels(type(base))
                self.can_return_loss = can_return_loss(type(base))
            if hasattr(self, "_loss_shifts_labels") and hasattr(base, "lm_head") and \
                    not getattr(getattr(base, "config", None), "is_encoder_decoder", False):
                # a causal LM head scores labels[..., 1:]: Trainer counts the loss's tokens so only where the
                # model names its loss type, and GPT-2 does not (every row of a SegmentDataset would count one
                # token too many: a loss 1/n too low)
                self._loss_shifts_labels = True
            self._order = _StepOrder()

        def _build_accelerator_args(self, **kwargs: Any) -> dict[str, Any]:
            """DDP's ``find_unused_parameters=False`` when the auxiliary loss is added here and
            ``ddp_find_unused_parameters`` leaves it to Trainer (None). Trainer turns it on for a model
            that is not a ``PreTrainedModel``; DDP then looks for unused parameters in the forward's
            outputs only, takes those that only the auxiliary loss reaches (added after the forward: the
            compressive conv compressor, the knn gate while its store is empty) for unused, and fails in
            the backward ("marked as ready twice"). Every memory's parameters take part in each backward
            of task + aux loss.
            """
            built = super()._build_accelerator_args(**kwargs)
            from accelerate.utils import DistributedDataParallelKwargs

            for handler in built.get("kwargs_handlers", []):
                if isinstance(handler, DistributedDataParallelKwargs):
                    if self.args.ddp_find_unused_parameters is None and self.memory_aux_loss:
                        handler.find_unused_parameters = False
            return built

        # -- data --------------------------------------------------------------------------------
        def _segment_loader(self, dataset: SegmentDataset, batch_size: int) -> Any:
            world = max(1, self.args.world_size)
            if dataset.lanes != batch_size * world:
                raise ValueError(
                    f"MemoryTrainer: the SegmentDataset has batch_size={dataset.lanes} lanes but the Trainer reads "
                    f"{batch_size} per device x {world} process(es); build it with batch_size={batch_size * world}")
            if world > 1 and self.accelerator.split_batches:
                raise ValueError(
                    "MemoryTrainer: accelerator_config split_batches=True cannot read a SegmentDataset (it would "
                    "split one process's lanes among the processes); leave split_batches False")
            workers, items = self.args.dataloader_num_workers, dataset.lane_items()
            loader = torch.utils.data.DataLoader(
                items, batch_size=batch_size, num_workers=workers, pin_memory=self.args.dataloader_pin_memory,
                persistent_workers=self.args.dataloader_persistent_workers and workers > 0,
                prefetch_factor=self.args.dataloader_prefetch_factor if workers > 0 else None)
            prepared = self.accelerator.prepare(loader)
            from accelerate.data_loader import DataLoaderDispatcher

            if isinstance(prepared, DataLoaderDispatcher):  # the main process reads a step as W batches of B
                items.block = batch_size  # so a worker must produce one batch (not a whole step) per turn
            return prepared

        def get_train_dataloader(self) -> Any:
            if isinstance(self.train_dataset, SegmentDataset):
                stream = self.train_dataset.stream  # a new read of the stream: a new order to check
                self._order = _StepOrder(None if stream.train else len(stream))
                return self._segment_loader(self.train_dataset, self._train_batch_size)
            return super().get_train_dataloader()

        def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
            dataset = self.eval_dataset if eval_dataset is None else eval_dataset
            dataset = self.eval_dataset[dataset] if isinstance(dataset, str) else dataset
            if isinstance(dataset, SegmentDataset):
                return self._segment_loader(dataset, self.args.eval_batch_size)
            return super().get_eval_dataloader(eval_dataset)

        def get_test_dataloader(self, test_dataset: Any) -> Any:
            if isinstance(test_dataset, SegmentDataset):
                return self._segment_loader(test_dataset, self.args.eval_batch_size)
            return super().get_test_dataloader(test_dataset)

        # -- one forward -------------------------------------------------------------------------
        def _begin_segment(self, model: Any, inputs: dict[str, Any]) -> dict[str, Any]:
            """Take the stream keys out of ``inputs`` and reset the memory where a new document starts
            (every sample's memory for a batch that is not a stream step)."""
            memory = _memory_model(self, model)
            if not any(k in inputs for k in SEGMENT_KEYS):
                memory.reset_memory()
                return inputs
            inputs = dict(inputs)
            doc_start, lane, step = (inputs.pop(k) for k in SEGMENT_KEYS)
            if self._order.check(lane, step):
                memory.reset_memory()  # a new pass: the batch size may differ from whatever came before
            else:
                memory.reset_memory(doc_start.to(torch.bool))
            return inputs

        def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Tensor:
            loss = super().training_step(model, self._begin_segment(model, inputs), *args, **kwargs)
            _memory_model(self, model).detach_memory()  # no-op with detach=True; truncates BPTT otherwise
            return loss

        def prediction_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            return super().prediction_step(model, self._begin_segment(model, inputs), *args, **kwargs)

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            if self.memory_aux_loss and model.training:
                aux = _memory_model(self, model).memory_aux_loss()
                scaled = getattr(self, "loss_is_scaled_for_ga", None)  # absent in older transformers (5.17)
                if scaled is None:  # as Trainer.training_step decides it
                    scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                        self.compute_loss_func is not None)
                if scaled:  # the task loss is already divided over the accumulated micro-batches
                    aux = aux / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
                loss = loss + aux.to(loss)
            return (loss, outputs) if return_outputs else loss

        def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
            """Evaluate on an empty memory of its own; the training stream's memory comes back afterwards."""
            memory = _memory_model(self, self.model)
            saved, order = memory.memory_state(), self._order
            self._order = _StepOrder()
            memory.reset_memory()
            try:
                return super().evaluation_loop(*args, **kwargs)
            finally:
                memory.reset_memory()
                memory.set_memory_state(saved)
                self._order = order

        # -- checkpoints -------------------------------------------------------------------------
        def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
            """``MemoryModel.save_pretrained`` with the stream state (Trainer's own path cannot save a
            wrapper: its state dict has the base model's tied weights twice)."""
            if not self.args.should_save:
                return
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            _memory_model(self, self.model).save_pretrained(output_dir, save_memory_state=True)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, Path(output_dir) / transformers.trainer.TRAINING_ARGS_NAME)

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            """Trainer's checkpoint, plus, with several processes, each process's own stream state
            (``memory_state_{rank}.safetensors``): ``_save`` runs on process 0 alone, whose
            ``memory_state.safetensors`` holds only its own lanes."""
            super()._save_checkpoint(model, trial)
            if self.args.world_size > 1:
                from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

                folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
                _write_state_file(_memory_model(self, self.model),
                                  folder / RANK_MEMORY_STATE.format(self.args.process_index))

        def _load_best_model(self) -> None:
            """Trainer loads the best checkpoint's base weights (``model.safetensors``, not strict, so the
            memory's keys, saved beside it, go unnoticed); the memory's weights come from the same checkpoint.
            The stream state stays the current one."""
            super()._load_best_model()
            best = self.state.best_model_checkpoint
            if best is not None and (Path(best) / MEMORY_WEIGHTS).exists():
                _load_memory(_memory_model(self, self.model), Path(best), state_file=None)

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            directory = Path(resume_from_checkpoint)
            if not (directory / MEMORY_CONFIG).exists():
                return
            state_file = MEMORY_STATE
            saved_by = sorted(directory.glob(RANK_MEMORY_STATE.format("*")))  # one per process of a multi-process run
            if saved_by and len(saved_by) != self.args.world_size:
                raise ValueError(
                    f"MemoryTrainer: {directory} holds the stream states of {len(saved_by)} processes (one per "
                    f"process, each of its own lanes), but this run has {self.args.world_size}; resuming would give "
                    f"processes the memory of other lanes. Resume with {len(saved_by)} processes")
            if self.args.world_size > 1:  # each process takes back the memory of its own lanes
                state_file = RANK_MEMORY_STATE.format(self.args.process_index)
                if (directory / MEMORY_STATE).exists() and not (directory / state_file).exists():
                    raise FileNotFoundError(
                        f"MemoryTrainer: resuming with {self.args.world_size} processes needs each process's stream "
                        f"state, but {directory} has no {state_file} (it was saved by a run with another number of "
                        "processes); resume with the number of processes that saved it")
            _load_memory(_memory_model(self, model if model is not None else self.model), directory, state_file)

    MemoryTrainer.__module__, MemoryTrainer.__qualname__ = __name__, "MemoryTrainer"  # as if defined at the top
    return MemoryTrainer


def __getattr__(name: str) -> Any:
    # MemoryTrainer subclasses transformers.Trainer: built (and transformers imported) on first use.
    if name == "MemoryTrainer":
        return _trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["LaneItems", "MemoryTrainer", "SEGMENT_KEYS", "SegmentDataset", "segment_batch"]
