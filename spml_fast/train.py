"""The trainer (docs/method.md, training recipe): SGD or AdamW with warm-up and poly decay, the
objective's loss terms (``objective``: SPML's relations, partial cross-entropy, TEL, AGMM), atomic
checkpoints with
everything needed to resume exactly, a tqdm bar, a JSONL metrics log, and
torch.distributed DDP when started by torchrun.

Exact resume: data order and augmentation are functions of (seed, epoch,
position) (``data.EpochSampler``, ``SegmentationDataset``), k-means is
deterministic, and the checkpoint holds model, optimiser, memory bank,
iteration, epoch, position and the torch RNG state.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from . import objective
from .config import TrainConfig, check_resume
from .data import EpochSampler, SegmentationDataset, check_entries, check_labels, collate, read_classes, read_list
from .io import atomic_path
from .models import load_pretrained
from .relations import MemoryBank
from .run import (CHECKPOINT, METRICS, RUN_FILES, RunError, SpmlModel, is_run_folder, load_checkpoint, read_config,
                  run_lock, save_checkpoint, write_config)

__all__ = ["train", "SpmlModel", "TrainingInterrupted", "load_checkpoint", "class_names"]


class TrainingInterrupted(RuntimeError):
    """Ctrl-C during training; the message says where the last checkpoint is and how to resume."""


def set_learning_rate(optimizer: torch.optim.Optimizer, config: TrainConfig, iteration: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(config, iteration) * group.get("lr_scale", 1.0)


def learning_rate(config: TrainConfig, iteration: int) -> float:
    """Linear warm-up over ``optim.warmup`` iterations (at most a tenth of the run), then poly decay."""
    optim = config.optim
    warmup = max(1, min(optim.warmup, optim.iterations // 10))
    warm = min(1.0, (iteration + 1) / warmup)
    return optim.lr * warm * (1 - iteration / optim.iterations) ** optim.power


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Distributed:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; gloo on the CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local)
    return Distributed(torch.distributed.get_rank(), torch.distributed.get_world_size(), local)


def class_names(config: TrainConfig) -> list[str]:
    """``classes`` is a count or a file relative to the data root. A count that disagrees with the data
    root's classes.txt is an error: training would silently rename the classes."""
    classes = config.classes
    if classes.isdigit():
        names = read_classes(classes)
        listed = os.path.join(config.data_root, "classes.txt")
        if os.path.isfile(listed) and len(read_classes(listed)) != len(names):
            raise ValueError(f"--classes {classes}: {listed} names {len(read_classes(listed))} classes; "
                             f"give --classes classes.txt (or the matching count)")
        return names
    return read_classes(classes if os.path.isabs(classes) else os.path.join(config.data_root, classes))


def absolute_paths(config: TrainConfig) -> TrainConfig:
    """data_root and the pretrained file as absolute paths (a weights NAME stays a name): a run folder is
    usable from anywhere."""
    from dataclasses import replace

    from .weights import SOURCES
    pretrained = config.pretrained
    if pretrained and pretrained not in SOURCES:
        pretrained = os.path.abspath(pretrained)
    return replace(config, data_root=os.path.abspath(config.data_root) if config.data_root else "",
                   pretrained=pretrained)


def prepare_run_folder(config: TrainConfig, out_dir: str, resume) -> bool:
    """Check ``resume`` against ``out_dir``; returns whether to resume from its checkpoint. resume: False (a
    new run: the folder must hold no run file at all), True (continue it: ``config.check_resume``), "auto"
    (continue if it holds one; the demo and the experiment scripts, which rerun their own configurations)."""
    has_checkpoint = os.path.isfile(os.path.join(out_dir, CHECKPOINT))
    if resume is True and not has_checkpoint:
        raise RunError(f"--resume: no {CHECKPOINT} in {out_dir}: nothing to continue (drop --resume to start)")
    if resume is False and is_run_folder(out_dir):
        present = [name for name in RUN_FILES if os.path.exists(os.path.join(out_dir, name))]
        raise RunError(f"--out {out_dir} already holds a run ({', '.join(present)}); continue it with --resume, "
                       "or choose another --out")
    if is_run_folder(out_dir):
        saved, _ = read_config(out_dir)
        try:
            check_resume(saved, config, out_dir)
        except ValueError as error:
            raise RunError(str(error)) from None
    return has_checkpoint


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD; with ``optim.backbone_lr`` != 1 the encoder is a group of its own whose learning rate
    is scaled by it (``set_learning_rate``)."""
    optim = config.optim
    if optim.backbone_lr != 1.0:
        encoder = set(id(p) for p in model.embedding.backbone.parameters())
        parameters = [dict(params=[p for p in model.parameters() if id(p) in encoder], lr_scale=optim.backbone_lr),
                      dict(params=[p for p in model.parameters() if id(p) not in encoder], lr_scale=1.0)]
    else:
        parameters = list(model.parameters())
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=optim.lr, weight_decay=optim.weight_decay)
    return torch.optim.SGD(parameters, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)


@dataclass
class TrainingState:
    """Everything a checkpoint restores: exact resume (module doc)."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    bank: MemoryBank
    iteration: int = 0
    epoch: int = 0
    position: int = 0

    def state_dict(self) -> dict:
        return dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(), bank=self.bank.state_dict(),
                    iteration=self.iteration, epoch=self.epoch, position=self.position, rng=torch.get_rng_state())

    def load(self, path: str) -> None:
        state = load_checkpoint(path)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as error:
            raise RunError(f"{path} does not match the run's configuration: {str(error).splitlines()[0]}") from None
        self.bank.load_state_dict(state["bank"])
        self.iteration, self.epoch, self.position = state["iteration"], state["epoch"], state["position"]
        torch.set_rng_state(state["rng"])


def training_data(config: TrainConfig, num_classes: int, dist: Distributed):
    """(dataset, sampler, per-rank batch) of the training list, every file and label map checked first."""
    entries = check_entries(read_list(config.data_root, config.train_list, config.allow_outside_root),
                            config.skip_bad)
    check_labels(entries, num_classes, config.max_pixels, config.skip_bad, progress=dist.main)
    dataset = SegmentationDataset(entries, num_classes, config.data_root, train=True, augment=config.augment,
                                  overseg=config.overseg, seed=config.seed, skip_bad=config.skip_bad,
                                  max_pixels=config.max_pixels,
                                  prepare=objective.sample_preparer(config, num_classes))
    per_rank_batch = max(1, config.optim.batch // dist.world_size)
    if len(dataset) < per_rank_batch * dist.world_size:
        raise ValueError(f"--batch {config.optim.batch}: the training list has only {len(dataset)} images")
    return dataset, EpochSampler(len(dataset), config.seed, dist.rank, dist.world_size), per_rank_batch


def initial_state(config: TrainConfig, num_classes: int, device, dist: Distributed,
                  load_weights: bool = True) -> TrainingState:
    """A new model (the encoder's ImageNet weights loaded unless a checkpoint will replace them)."""
    model = SpmlModel(config, num_classes).to(device)
    if config.pretrained and load_weights:
        report = load_pretrained(model.embedding, config.pretrained)
        if dist.main:
            print(f"pretrained {config.pretrained}: {report['loaded']} tensors loaded, {len(report['missing'])} missing keys "
                  f"{report['missing'][:5]}, {len(report['unexpected'])} unexpected {report['unexpected'][:5]}")
    return TrainingState(model, make_optimizer(model, config), MemoryBank(config.relations.memory_bank))


def batch_stream(state: TrainingState, dataset, sampler, per_rank_batch: int, config: TrainConfig):
    """Batches from the state's (epoch, position) on, advancing them as they are consumed."""
    while True:
        sampler.set_epoch(state.epoch, state.position)
        dataset.set_epoch(state.epoch)
        loader = torch.utils.data.DataLoader(dataset, batch_size=per_rank_batch, sampler=sampler,
                                             num_workers=config.workers, collate_fn=collate, drop_last=True,
                                             persistent_workers=False)
        for batch in loader:
            state.position += per_rank_batch
            if batch is not None:
                yield batch
        state.epoch, state.position = state.epoch + 1, 0


def train(config: TrainConfig, out_dir: str, resume=False, stop_after: Optional[int] = None,
          progress: bool = True) -> dict:
    """Train; returns {"iteration", "checkpoint", "losses"}. ``resume``: False, True or "auto"
    (``prepare_run_folder``). ``stop_after`` ends the run abruptly after that many iterations without
    saving (tests use it to stand for a killed run). The run folder is locked while training."""
    config = absolute_paths(config)
    with run_lock(out_dir, enabled=int(os.environ.get("RANK", "0")) == 0):
        resuming = prepare_run_folder(config, out_dir, resume)
        dist = init_distributed(config.device)
        device = torch.device(config.device, dist.local_rank) if config.device == "cuda" else torch.device("cpu")
        names = class_names(config)
        torch.manual_seed(config.seed)
        data = training_data(config, len(names), dist)
        state = initial_state(config, len(names), device, dist, load_weights=not resuming)
        checkpoint_path = os.path.join(out_dir, CHECKPOINT)
        if resuming:
            state.load(checkpoint_path)
            if resume is True and state.iteration >= config.optim.iterations:
                raise RunError(f"--resume: {out_dir} has finished its {state.iteration} iterations; to train it "
                               f"longer give --iterations N with N > {state.iteration}")
        elif dist.main:
            write_config(out_dir, config, names)
        return _loop(config, out_dir, state, data, dist, device, len(names), stop_after, progress)


def _loop(config: TrainConfig, out_dir: str, state: TrainingState, data, dist: Distributed, device,
          num_classes: int, stop_after: Optional[int], progress: bool) -> dict:
    """The training loop from ``state.iteration`` to the configured iterations."""
    from tqdm import tqdm
    model = state.model
    wrapped = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[dist.local_rank] if
                                                         config.device == "cuda" else None)
               if dist.world_size > 1 else model)
    log = MetricsLog(out_dir, state.iteration, dist.main)
    checkpoint_path = os.path.join(out_dir, CHECKPOINT)
    stream = batch_stream(state, *data, config)
    per_rank_batch = data[2]
    bar = tqdm(total=config.optim.iterations, initial=state.iteration, desc=config.preset, unit="it",
               disable=not (progress and dist.main))
    wrapped.train()
    last_terms = {}
    try:
        while state.iteration < config.optim.iterations:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in next(stream).items()}
            batch["image_ids"] = (state.iteration * dist.world_size + dist.rank) * per_rank_batch + torch.arange(
                batch["image"].shape[0], device=device)
            set_learning_rate(state.optimizer, config, state.iteration)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=config.device == "cuda"):
                total, terms, local = objective.compute(wrapped, batch, state.bank, config, num_classes)
            last_terms = dict({name: float(value) for name, value in terms.items()}, total=float(total.detach()))
            if not math.isfinite(last_terms["total"]):
                raise RunError(_diverged(state.iteration + 1, last_terms, checkpoint_path, out_dir))
            state.optimizer.zero_grad(set_to_none=True)
            total.backward()
            state.optimizer.step()
            if local is not None:
                state.bank.push(local)
            state.iteration += 1
            bar.set_postfix({k: f"{v:.3f}" for k, v in last_terms.items()})
            bar.update()
            log.write(state.iteration, config, last_terms)
            if stop_after is not None and state.iteration >= stop_after:
                return dict(iteration=state.iteration, checkpoint=None, losses=last_terms)
            if dist.main and (state.iteration % config.checkpoint_every == 0 or
                              state.iteration == config.optim.iterations):
                save_checkpoint(checkpoint_path, state.state_dict())
    except KeyboardInterrupt:
        raise TrainingInterrupted(f"interrupted at iteration {state.iteration}; {_last_checkpoint(checkpoint_path)}. "
                                  f"Continue with: spml-fast train --resume --out {out_dir}") from None
    finally:
        bar.close()                # before any error message: the bar shares stderr
        log.close()
    return dict(iteration=state.iteration, checkpoint=checkpoint_path, losses=last_terms)


def _last_checkpoint(path: str) -> str:
    saved = load_checkpoint(path)["iteration"] if os.path.isfile(path) else None
    return (f"the last checkpoint ({path}) holds iteration {saved}" if saved is not None
            else "no checkpoint was saved yet")


def _diverged(iteration: int, terms: dict, checkpoint_path: str, out_dir: str) -> str:
    values = ", ".join(f"{name} {value:.4g}" for name, value in terms.items())
    return (f"the loss is not finite at iteration {iteration} ({values}): training stopped before the update; "
            f"{_last_checkpoint(checkpoint_path)} and is kept. Lower optim.lr or check the data, then start a new "
            f"run (or --resume --out {out_dir})")


class MetricsLog:
    """metrics.jsonl (one JSON line per logged iteration) and TensorBoard when installed; main rank only."""

    def __init__(self, out_dir: str, iteration: int, enabled: bool):
        self.path, self.enabled, self.started = os.path.join(out_dir, METRICS), enabled, time.time()
        self.board = None
        if enabled:
            _truncate_log(self.path, iteration)
            self.board = _tensorboard(out_dir, iteration)

    def write(self, iteration: int, config: TrainConfig, terms: dict) -> None:
        if not self.enabled or not (iteration % config.log_every == 0 or iteration == config.optim.iterations):
            return
        with open(self.path, "a") as log:
            log.write(json.dumps(dict(iteration=iteration, lr=learning_rate(config, iteration - 1),
                                      seconds=round(time.time() - self.started, 2), **terms)) + "\n")
        if self.board is not None:
            for name, value in terms.items():
                self.board.add_scalar(f"loss/{name}", value, iteration)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
            self.board = None


def _tensorboard(out_dir: str, iteration: int):
    """A TensorBoard writer when the tensorboard package is installed (optional), else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=iteration or None)


def _truncate_log(path: str, iteration: int) -> None:
    """A resumed run rewrites what came after its checkpoint: drop those log lines, and any line a kill
    tore in half."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as log:
        for number, line in enumerate(log, 1):
            try:
                if line.strip() and json.loads(line)["iteration"] <= iteration:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                warnings.warn(f"{path}:{number}: dropped a torn or unreadable log line")
    with atomic_path(path) as temp:
        with open(temp, "w") as out:
            out.writelines(kept)
