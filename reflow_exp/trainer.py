"""The training loop: AdamW + cosine decay with warm-up (SmolVLA's presets) on accelerate.

The model contract is small::

    model.loss(batch) -> (loss_tensor, {"name": float, ...})   # metrics of this batch
    model.save_pretrained(dir)                                  # writes a LeRobot policy folder
    model.frozen_reference() -> dict | None                     # optional, see below

Only parameters with ``requires_grad`` are optimised and checkpointed. A run folder with a
checkpoint is resumed: trainable parameters, optimizer, scheduler, RNG and the position in the
data (epoch, batch) are restored, and training continues to the same total ``steps``.

With N processes (torchrun / accelerate launch; see ``reflow_exp.distributed``) the model is
wrapped in DDP, each process reads its own shard of every epoch (the dataloader's batch size is
per process: global batch = batch × N), logged metrics are means over all processes, and only
rank 0 logs and writes checkpoints. Resume with the same N: the data position is counted in
per-process batches: a resume with another N is refused (``ResumeRefused``).

Slim intermediate checkpoints: when the model names its frozen part by a fingerprint
(``frozen_reference()``, e.g. reflow's teacher file and its sha256), every save but the last holds
only ``training_state/`` (trainable parameters, optimizer, scheduler, RNG, step) and that reference;
the full ``pretrained_model/`` is written at the last step. A resume checks the reference against
the model's and refuses a changed frozen part. At SmolVLA's size this drops ``pretrained_model/``'s
1.8 GB from every intermediate save (``python -m reflow_exp.bench footprint``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs
from lerobot.optim import load_optimizer_state, load_scheduler_state, save_optimizer_state, save_scheduler_state
from lerobot.optim.schedulers import CosineDecayWithWarmupSchedulerConfig
from lerobot.utils.random_utils import load_rng_state, save_rng_state
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import gin
from reflow_exp import distributed
from reflow_exp.checkpoint import latest_checkpoint, save_checkpoint
from reflow_exp.config_types import AtLeast
from reflow_exp.rundir import RunDir

PRETRAINED_MODEL_DIR = "pretrained_model"
TRAINING_STATE_DIR = "training_state"
TRAINABLE_PARAMS_FILE = "trainable_params.safetensors"
TRAINING_STEP_FILE = "training_step.json"  # LeRobot's name; we add epoch/batch/first_loss
FROZEN_REFERENCE_FILE = "frozen_reference.json"  # what the trainable part was trained against


class TrainingDiverged(RuntimeError):
    """The loss, the gradient or the parameters became NaN or infinite; the message says where."""


class ResumeRefused(RuntimeError):
    """The run folder's checkpoint cannot be continued as configured; the message says why and how."""


@gin.configurable
class Trainer:
    """Trains ``model`` for ``steps`` optimizer steps; defaults are SmolVLA's optimizer presets.

    Args:
        steps: total optimizer steps (a resumed run stops at the same total).
        lr, betas, eps, weight_decay: AdamW.
        grad_clip_norm: clip the global gradient norm to this (None or 0: no clipping).
        warmup_steps: linear warm-up steps.
        decay_steps: cosine decay length to ``decay_lr``; None → ``steps``. As in LeRobot, a
            schedule longer than ``steps`` is scaled down to fit.
        decay_lr: final learning rate of the cosine decay.
        log_every: log train metrics every this many steps (plus the first loss, at step 0).
        save_every: checkpoint every this many steps (None or 0: only at the end).
        keep_last_checkpoints: keep only this many newest checkpoints (None: keep all).
        slim_checkpoints: intermediate saves without ``pretrained_model/`` when the model has a
            ``frozen_reference()`` (see the module docstring); False: every save is full.
        eval_every: call ``fit``'s ``evaluate(step)`` every this many steps (None or 0: never;
            the job evaluates at the end itself).
        mixed_precision: accelerate's "no", "fp16" (CUDA only) or "bf16" (CPU, or a GPU with bf16:
            compute capability >= 8.0); float32 weights, the forward under autocast.
        find_unused_parameters: with several processes, let DDP skip trainable weights that get no
            gradient in a step (costs a graph traversal per step); the sandbox teacher, which trains
            its VLM, needs it (the last VLM layer's outputs are unused).
    """

    def __init__(
        self,
        steps: Annotated[int, AtLeast(1)] = 2000,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 1e-10,
        grad_clip_norm: float | None = 10.0,
        warmup_steps: Annotated[int, AtLeast(0)] = 100,
        decay_steps: int | None = None,
        decay_lr: float = 2.5e-6,
        log_every: Annotated[int, AtLeast(1)] = 10,
        save_every: int | None = 500,
        keep_last_checkpoints: int | None = None,
        slim_checkpoints: bool = True,
        eval_every: int | None = None,
        mixed_precision: str = "no",
        find_unused_parameters: bool = False,
    ):
        if steps < 1:
            raise ValueError(f"Trainer.steps must be >= 1, got {steps}")
        if log_every < 1:
            raise ValueError(f"Trainer.log_every must be >= 1, got {log_every}")
        if warmup_steps < 0:
            raise ValueError(f"Trainer.warmup_steps must be >= 0, got {warmup_steps}")
        if decay_steps is not None and decay_steps < 1:
            raise ValueError(f"Trainer.decay_steps must be >= 1 or None (= steps), got {decay_steps}")
        if mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"Trainer.mixed_precision must be 'no', 'fp16' or 'bf16', got {mixed_precision!r}")
        distributed.check_mixed_precision(mixed_precision)
        self.steps = steps
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.grad_clip_norm = grad_clip_norm
        self.warmup_steps = warmup_steps
        self.decay_steps = decay_steps if decay_steps is not None else steps
        self.decay_lr = decay_lr
        self.log_every = log_every
        self.save_every = save_every or None
        self.keep_last_checkpoints = keep_last_checkpoints
        self.slim_checkpoints = slim_checkpoints
        self.eval_every = eval_every or None
        self.mixed_precision = mixed_precision
        self.find_unused_parameters = find_unused_parameters

    def fit(
        self,
        model: torch.nn.Module,
        dataloader: torch.utils.data.DataLoader,
        run: RunDir,
        preprocess: Callable[[Any], Any] = lambda batch: batch,
        context: Mapping[str, Any] | None = None,
        evaluate: Callable[[int], Any] | None = None,
    ) -> dict:
        """Train (or resume training) and checkpoint into ``run.path/checkpoints``.

        Args:
            model: ``nn.Module`` with ``loss(batch)`` and ``save_pretrained(dir)``.
            dataloader: a shuffling DataLoader; cycled over epochs, reshuffled each epoch.
            run: the run folder (metrics, checkpoints); a ``WorkerRun`` on ranks > 0.
            preprocess: applied to each batch after the dataloader (on the device), e.g. the
                teacher making (noise, action) pairs.
            context: extra Aim context for the metrics, e.g. ``{"head": "student"}``.
            evaluate: called as ``evaluate(step)`` every ``eval_every`` steps, under ``torch.no_grad``
                and before that step's checkpoint; it logs its own results.

        Returns:
            ``{"steps", "first_loss", "last_loss", "steps_per_s", "checkpoint"}``; ``last_loss`` is
            the mean loss of the last logging window, ``steps_per_s`` this session's speed.
        """
        context = dict(context or {})
        accelerator = Accelerator(
            mixed_precision=self.mixed_precision,
            # One scheduler step per optimizer step, whatever the number of processes.
            step_scheduler_with_optimizer=False,
            # The shuffle order depends on (seed, epoch) only, so a resumed run can find its place.
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=run.seed),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=self.find_unused_parameters)],
        )
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no parameters with requires_grad=True; nothing to train")
        optimizer = torch.optim.AdamW(
            params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay
        )
        scheduler = CosineDecayWithWarmupSchedulerConfig(
            num_warmup_steps=self.warmup_steps,
            num_decay_steps=self.decay_steps,
            peak_lr=self.lr,
            decay_lr=self.decay_lr,
        ).build(optimizer, self.steps)
        wrapped, optimizer, dataloader, scheduler = accelerator.prepare(
            _LossForward(model), optimizer, dataloader, scheduler
        )

        state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "first_loss": None}
        if accelerator.is_main_process:  # only rank 0 may delete a crashed save's leftovers
            latest_checkpoint(run.checkpoints_dir, clean=True)
        accelerator.wait_for_everyone()
        ckpt = latest_checkpoint(run.checkpoints_dir, check_values=True)  # NaN in a file: the one before
        if ckpt is not None:
            _check_frozen_reference(ckpt / TRAINING_STATE_DIR, model)
            state = _load_training_state(ckpt / TRAINING_STATE_DIR, model, optimizer, scheduler)
            _check_process_count(ckpt, state.get("processes"), accelerator.num_processes)
            print(f"Resuming training from {ckpt} (step {state['step']} of {self.steps})")
        batches = _Batches(dataloader, accelerator, run.seed, state["epoch"], state["batch_in_epoch"])

        # ---- the loop ----------------------------------------------------------------------
        step, start = state["step"], state["step"]
        window = _Window()
        bar = tqdm(total=self.steps, initial=step, desc="train", disable=not accelerator.is_main_process)
        t_start = t_log = time.perf_counter()
        wrapped.train()
        while step < self.steps:
            batch = preprocess(next(batches))
            loss, metrics = wrapped(batch)  # prepare() already wrapped forward in autocast
            loss_value = loss.item()
            self._check_finite("loss", loss_value, step + 1, run)
            if state["first_loss"] is None:  # "loss at start", before any update
                first = _Window()
                first.add(loss=loss_value, **metrics)
                logged = first.means(accelerator)
                state["first_loss"] = logged["loss"]
                self._log(run, accelerator, 0, logged, context)
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(params, self.grad_clip_norm or math.inf)
            if self.mixed_precision != "fp16":  # fp16's grad scaler skips overflowing steps itself
                self._check_finite("the gradient norm", grad_norm.item(), step + 1, run)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window.add(loss=loss_value, grad_norm=grad_norm.item(), **metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4g}")

            if step % self.log_every == 0 or step == self.steps:
                now = time.perf_counter()
                speed = {"lr": scheduler.get_last_lr()[0], "steps_per_s": window.count / (now - t_log)}
                logged = window.means(accelerator) | speed
                self._log(run, accelerator, step, logged, context)
                state["last_loss"], t_log, window = logged["loss"], now, _Window()
            if evaluate and self.eval_every and step % self.eval_every == 0 and step < self.steps:
                with torch.no_grad():
                    evaluate(step)
                wrapped.train()  # evaluate may have switched the model to eval mode
            if (self.save_every and step % self.save_every == 0) or step == self.steps:
                state.update(step=step, epoch=batches.epoch, batch_in_epoch=batches.index)
                self._check_parameters(model, step, run)  # never checkpoint non-finite weights
                self._save(run, accelerator, wrapped, optimizer, scheduler, state)
        bar.close()
        # ---------------------------------------------------------------------------------------

        elapsed = time.perf_counter() - t_start
        return {
            "steps": step,
            "first_loss": state["first_loss"],
            "last_loss": state.get("last_loss"),
            "steps_per_s": (step - start) / elapsed if step > start else 0.0,
            "checkpoint": latest_checkpoint(run.checkpoints_dir),
        }

    # ---- helpers ---------------------------------------------------------------------------------

    def _check_finite(self, what: str, value: float, step: int, run: RunDir) -> None:
        """Raise ``TrainingDiverged`` if ``value`` is NaN/inf: the step, the cause, what to try."""
        if math.isfinite(value):
            return
        kept = latest_checkpoint(run.checkpoints_dir, check_values=True)
        kept_text = f"checkpoint {kept.name} (the last finite one) is kept" if kept else "no checkpoint was saved"
        raise TrainingDiverged(
            f"{what} is {value} at step {step}; training stopped and {kept_text}. Lower Trainer.lr "
            f"(now {self.lr:g}), keep Trainer.grad_clip_norm set (now {self.grad_clip_norm}), or check the "
            "data for NaN/inf values."
        )

    def _check_parameters(self, model: torch.nn.Module, step: int, run: RunDir) -> None:
        """``_check_finite`` for the first trainable parameter holding a NaN/inf value, if any."""
        bad = next((n for n, p in model.named_parameters() if p.requires_grad and not p.isfinite().all()), None)
        if bad is not None:
            self._check_finite(f"parameter {bad}", math.nan, step, run)

    def _log(self, run: RunDir, accelerator: Accelerator, step: int, metrics: dict, context: dict) -> None:
        if not accelerator.is_main_process:
            return
        run.log_metrics(step, metrics, subset="train", **context)
        line = " | ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        tqdm.write(f"step {step}/{self.steps} | {line}")

    def _save(self, run, accelerator, wrapped, optimizer, scheduler, state: dict) -> Path:
        """Checkpoint ``training_state/`` and, unless slim (see the module docstring),
        ``pretrained_model/`` (main process writes)."""
        accelerator.wait_for_everyone()
        model = accelerator.unwrap_model(wrapped).model
        reference = model.frozen_reference() if hasattr(model, "frozen_reference") else None
        full = reference is None or not self.slim_checkpoints or state["step"] >= self.steps

        def write(ckpt: Path) -> None:
            if full:
                (ckpt / PRETRAINED_MODEL_DIR).mkdir()
                model.save_pretrained(ckpt / PRETRAINED_MODEL_DIR)
            state_dir = ckpt / TRAINING_STATE_DIR
            state_dir.mkdir()
            if reference is not None:
                (state_dir / FROZEN_REFERENCE_FILE).write_text(json.dumps(reference, indent=2) + "\n")
            trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            save_file(trainable, state_dir / TRAINABLE_PARAMS_FILE)
            save_optimizer_state(optimizer, state_dir)
            save_scheduler_state(scheduler, state_dir)
            save_rng_state(state_dir)
            fields = {k: state.get(k) for k in ("step", "epoch", "batch_in_epoch", "first_loss", "last_loss")}
            fields["processes"] = accelerator.num_processes  # the data position counts per-process batches
            (state_dir / TRAINING_STEP_FILE).write_text(json.dumps(fields, indent=2) + "\n")
            (ckpt / "operative_config.gin").write_text(gin.operative_config_str())

        path = None
        if accelerator.is_main_process:
            path = save_checkpoint(run.checkpoints_dir, state["step"], write, keep_last=self.keep_last_checkpoints)
            tqdm.write(f"Saved checkpoint {path}")
        accelerator.wait_for_everyone()
        return path


class _LossForward(torch.nn.Module):
    """Routes ``forward`` to ``model.loss``, so accelerate's wrappers (DDP, autocast) see the call."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        loss, metrics = self.model.loss(batch)
        return loss, {k: float(v) for k, v in metrics.items()}


class _Window:
    """Running means of the metrics since the last log line, over all processes.

    Each process sees its own part of every global batch; all parts have the same size, so the
    mean over processes of their means is the mean over the global batch.
    """

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, **values: float) -> None:
        self.count += 1
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def means(self, accelerator: Accelerator) -> dict[str, float]:
        """The window's means over every process (a collective: all processes must call it)."""
        parts = [(self.sums, self.count)]
        if accelerator.num_processes > 1:
            parts = [None] * accelerator.num_processes
            torch.distributed.all_gather_object(parts, (self.sums, self.count))
        sums, counts = {}, {}
        for part_sums, part_count in parts:
            for k, v in part_sums.items():
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + part_count
        return {k: sums[k] / counts[k] for k in sums}


class _Batches:
    """Endless batches over epochs; knows its place (epoch, batch index) for checkpoints.

    Data loading draws from its own torch RNG stream, kept apart from the global one the model
    uses (noise, time samples): where epoch boundaries and prefetching fall then cannot shift
    the model's random draws, so a resumed run repeats the uninterrupted one exactly (given
    deterministic data). The shuffle order is a function of (seed, epoch), see ``fit``.
    """

    def __init__(self, dataloader, accelerator: Accelerator, seed: int, epoch: int = 0, index: int = 0):
        self.dataloader, self.accelerator = dataloader, accelerator
        self.epoch, self.index = epoch, index
        self._rng_state = torch.Generator().manual_seed(seed + 1).get_state()
        self._iter: Iterator | None = None

    def __next__(self):
        # The DataLoader draws from the global CPU RNG (e.g. its workers' base seed); fork_rng gives
        # those draws our own stream and restores the model's afterwards, so where epochs and
        # prefetching fall cannot shift the model's noise (tests/test_trainer.py's SIGKILL resume test).
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._rng_state)
            try:
                return self._next()
            finally:
                self._rng_state = torch.get_rng_state()

    def _next(self):
        while True:
            if self._iter is None:
                self.dataloader.set_epoch(self.epoch)
                loader = (
                    self.accelerator.skip_first_batches(self.dataloader, self.index) if self.index else self.dataloader
                )
                self._iter = iter(loader)
            try:
                batch = next(self._iter)
                self.index += 1
                return batch
            except StopIteration:
                if self.index == 0:
                    raise ValueError("the dataloader yielded no batches; check the dataset and batch size") from None
                self._iter, self.epoch, self.index = None, self.epoch + 1, 0


def _check_process_count(ckpt: Path, saved: int | None, current: int) -> None:
    """Refuse to resume with another number of processes: the position in the data is counted in
    per-process batches and the global batch is the batch size times the processes, so the run
    would silently skip or repeat data and change its batch. (Checkpoints from before the count
    was recorded are not checked.)"""
    if saved is None or int(saved) == current:
        return
    raise ResumeRefused(
        f"checkpoint {ckpt} was trained with {saved} process(es), this run has {current}; a run resumes only "
        f"with the same number (its data position and global batch depend on it). Start it with {saved} "
        f"process(es) (torchrun --nproc_per_node {saved}, or python -m reflow_exp.run for 1), or choose a new run.name."
    )


def _check_frozen_reference(state_dir: Path, model: torch.nn.Module) -> None:
    """Refuse to resume trainable weights onto another frozen part than they were trained with."""
    file = state_dir / FROZEN_REFERENCE_FILE
    if not file.is_file() or not hasattr(model, "frozen_reference"):
        return
    saved, now = json.loads(file.read_text()), model.frozen_reference()
    if now is not None and saved != now:
        raise ValueError(
            f"checkpoint {state_dir.parent} was trained against {saved}, this run has {now}: the frozen "
            "part (e.g. the teacher's weights) changed. Restore it, or use a new run.name to start afresh."
        )


def _load_training_state(state_dir: Path, model: torch.nn.Module, optimizer, scheduler) -> dict:
    """Restore trainable parameters, optimizer, scheduler and RNG; return the step record."""
    saved = load_file(state_dir / TRAINABLE_PARAMS_FILE)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if saved.keys() != trainable.keys():
        missing, unexpected = sorted(trainable.keys() - saved.keys()), sorted(saved.keys() - trainable.keys())
        raise ValueError(
            f"checkpoint {state_dir} does not match the model's trainable parameters "
            f"(missing: {missing[:5]}, unexpected: {unexpected[:5]}); was the model or its freezing changed? "
            "Use a new run.name to start afresh."
        )
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(saved[name])
    load_optimizer_state(optimizer, state_dir)
    load_scheduler_state(scheduler, state_dir)
    load_rng_state(state_dir)
    return json.loads((state_dir / TRAINING_STEP_FILE).read_text())
