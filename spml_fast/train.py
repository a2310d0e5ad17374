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
import os
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from .config import RUNTIME_SETTINGS, TrainConfig, differences
from .data import EpochSampler, SegmentationDataset, check_entries, collate, read_classes, read_list
from .io import atomic_path
from .models import load_pretrained
from .objective import HEAD_TERMS, head_losses, total_loss
from .relations import MemoryBank, relation_losses, weighted_total
from .run import CHECKPOINT, RunError, SpmlModel, load_checkpoint, read_config, save_checkpoint, write_config
from .segments import make_segments

__all__ = ["train", "training_step", "SpmlModel", "TrainingInterrupted", "load_checkpoint", "class_names"]


class TrainingInterrupted(RuntimeError):
    """Ctrl-C during training; the message says where the last checkpoint is and how to resume."""


def learning_rate(config: TrainConfig, iteration: int) -> float:
    optim = config.optim
    warm = min(1.0, (iteration + 1) / max(1, optim.warmup))
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
    """data_root and the pretrained file as absolute paths: a run folder is usable from anywhere."""
    from dataclasses import replace
    return replace(config, data_root=os.path.abspath(config.data_root) if config.data_root else "",
                   pretrained=os.path.abspath(config.pretrained) if config.pretrained else "")


def prepare_run_folder(config: TrainConfig, out_dir: str, resume) -> bool:
    """Check ``resume`` against ``out_dir``; returns whether to resume. resume: False (a new run: the folder
    must not hold one), True (continue it, with exactly its own settings), "auto" (continue if it holds
    one; the demo and the experiment scripts, which rerun their own configurations)."""
    has_run = os.path.isfile(os.path.join(out_dir, CHECKPOINT))
    if resume is True and not has_run:
        raise RunError(f"--resume: no {CHECKPOINT} in {out_dir}: nothing to continue (drop --resume to start)")
    if resume is False and has_run:
        raise RunError(f"--out {out_dir} already holds a run ({CHECKPOINT}); continue it with --resume, "
                       "or choose another --out")
    if not has_run:
        return False
    saved, _ = read_config(out_dir)
    changed = [key for key in differences(saved, config) if key not in RUNTIME_SETTINGS]
    if changed:
        raise RunError(f"--resume: {out_dir} was trained with other settings ({', '.join(changed[:6])}); a run "
                       "continues with its own config.json")
    return True


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    optim = config.optim
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=optim.lr, momentum=optim.momentum,
                           weight_decay=optim.weight_decay)


def training_step(model, batch, config: TrainConfig, bank: MemoryBank, num_classes: int, image_ids):
    """Forward and loss of one batch (``objective``): (total loss, {term: float}, segments for the
    memory bank or None)."""
    embeddings = model(batch["image"])
    objective = config.objective
    terms = {}
    if objective.has_head:
        classifier = model.module.classifier if hasattr(model, "module") else model.classifier
        terms.update(head_losses(classifier(embeddings), embeddings, batch, objective, num_classes))
    relation_total, local = None, None
    if objective.relations:
        segments = make_segments(embeddings, batch["label"], batch["overseg"], batch["valid"], batch["tags"],
                                 num_classes, config.kmeans_grid, config.kmeans_iterations)
        relations, local = relation_losses(segments, bank, config.relations, num_classes, image_ids)
        relation_total = weighted_total(relations, config.relations)
        terms.update(relations)
    total = total_loss({k: v for k, v in terms.items() if k in HEAD_TERMS}, relation_total, objective)
    return total, {name: float(value.detach()) for name, value in terms.items()}, local


def train(config: TrainConfig, out_dir: str, resume=False, stop_after: Optional[int] = None,
          progress: bool = True) -> dict:
    """Train; returns {"iteration", "checkpoint", "losses"}. ``resume``: False, True or "auto"
    (``prepare_run_folder``). ``stop_after`` ends the run abruptly after that many iterations without
    saving (tests use it to stand for a killed run)."""
    from tqdm import tqdm
    config = absolute_paths(config)
    resuming = prepare_run_folder(config, out_dir, resume)
    dist = init_distributed(config.device)
    device = torch.device(config.device, dist.local_rank) if config.device == "cuda" else torch.device("cpu")
    names = class_names(config)
    num_classes = len(names)
    torch.manual_seed(config.seed)
    entries = check_entries(read_list(config.data_root, config.train_list, config.allow_outside_root),
                            config.skip_bad)
    dataset = SegmentationDataset(entries, num_classes, config.data_root,
                                  train=True, augment=config.augment, overseg=config.overseg, seed=config.seed,
                                  skip_bad=config.skip_bad)
    per_rank_batch = max(1, config.optim.batch // dist.world_size)
    if len(dataset) < per_rank_batch * dist.world_size:
        raise ValueError(f"--batch {config.optim.batch}: the training list has only {len(dataset)} images")
    sampler = EpochSampler(len(dataset), config.seed, dist.rank, dist.world_size)
    model = SpmlModel(config, num_classes).to(device)
    if config.pretrained:
        report = load_pretrained(model.embedding, config.pretrained)
        if dist.main:
            print(f"pretrained {config.pretrained}: {len(report['missing'])} missing keys "
                  f"{report['missing'][:5]}, {len(report['unexpected'])} unexpected {report['unexpected'][:5]}")
    optimizer = make_optimizer(model, config)
    bank = MemoryBank(config.relations.memory_bank)
    iteration, epoch, position = 0, 0, 0
    checkpoint_path = os.path.join(out_dir, CHECKPOINT)
    if resuming:
        state = load_checkpoint(checkpoint_path)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as error:
            raise RunError(f"{checkpoint_path} does not match the run's configuration: "
                           f"{str(error).splitlines()[0]}") from None
        bank.load_state_dict(state["bank"])
        iteration, epoch, position = state["iteration"], state["epoch"], state["position"]
        torch.set_rng_state(state["rng"])
    elif dist.main:
        os.makedirs(out_dir, exist_ok=True)
        write_config(out_dir, config, names)
    wrapped = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[dist.local_rank] if
                                                         config.device == "cuda" else None)
               if dist.world_size > 1 else model)
    log_path = os.path.join(out_dir, "metrics.jsonl")
    board = None
    if dist.main:
        _truncate_log(log_path, iteration)
        board = _tensorboard(out_dir, iteration)

    def batches():
        nonlocal epoch, position
        while True:
            sampler.set_epoch(epoch, position)
            dataset.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(dataset, batch_size=per_rank_batch, sampler=sampler,
                                                 num_workers=config.workers, collate_fn=collate, drop_last=True,
                                                 persistent_workers=False)
            for batch in loader:
                position += per_rank_batch
                if batch is not None:
                    yield batch
            epoch, position = epoch + 1, 0

    def state_dict():
        return dict(model=model.state_dict(), optimizer=optimizer.state_dict(), bank=bank.state_dict(),
                    iteration=iteration, epoch=epoch, position=position, rng=torch.get_rng_state())

    stream = batches()
    bar = tqdm(total=config.optim.iterations, initial=iteration, desc=config.preset, unit="it",
               disable=not (progress and dist.main))
    wrapped.train()
    last_terms = {}
    started = time.time()
    try:
        while iteration < config.optim.iterations:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in next(stream).items()}
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, iteration)
            image_ids = (iteration * dist.world_size + dist.rank) * per_rank_batch + torch.arange(
                batch["image"].shape[0], device=device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=config.device == "cuda"):
                total, terms, local = training_step(wrapped, batch, config, bank, num_classes, image_ids)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            if local is not None:
                bank.push(local)
            iteration += 1
            last_terms = dict(terms, total=float(total.detach()))
            bar.set_postfix({k: f"{v:.3f}" for k, v in last_terms.items()})
            bar.update()
            if dist.main and (iteration % config.log_every == 0 or iteration == config.optim.iterations):
                with open(log_path, "a") as log:
                    log.write(json.dumps(dict(iteration=iteration, lr=learning_rate(config, iteration - 1),
                                              seconds=round(time.time() - started, 2), **last_terms)) + "\n")
                if board is not None:
                    for name, value in last_terms.items():
                        board.add_scalar(f"loss/{name}", value, iteration)
            if stop_after is not None and iteration >= stop_after:
                return dict(iteration=iteration, checkpoint=None, losses=last_terms)
            if dist.main and (iteration % config.checkpoint_every == 0 or iteration == config.optim.iterations):
                save_checkpoint(checkpoint_path, state_dict())
    except KeyboardInterrupt:
        saved = load_checkpoint(checkpoint_path)["iteration"] if os.path.isfile(checkpoint_path) else None
        where = (f"the last checkpoint ({checkpoint_path}) holds iteration {saved}" if saved is not None
                 else "no checkpoint was saved yet")
        raise TrainingInterrupted(f"interrupted at iteration {iteration}; {where}. Continue with: "
                                  f"spml-fast train --resume --out {out_dir}") from None
    finally:
        bar.close()                # before any error message: the bar shares stderr
    if board is not None:
        board.close()
    return dict(iteration=iteration, checkpoint=checkpoint_path, losses=last_terms)


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
