"""Training configuration: typed dataclasses, presets (SPEC §6, §8), and
overrides from a YAML file or ``section.field=value`` strings."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, replace

from .data import AugmentConfig, OversegConfig
from .models import ModelConfig
from .relations import RelationConfig


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup: int = 100
    power: float = 0.9
    iterations: int = 30000
    batch: int = 4


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "voc-scribble"
    objective: str = "spml"                 # "spml" | "pce" (partial cross-entropy baseline)
    model: ModelConfig = field(default_factory=ModelConfig)
    relations: RelationConfig = field(default_factory=RelationConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    overseg: OversegConfig = field(default_factory=OversegConfig)
    kmeans_grid: int = 6
    kmeans_iterations: int = 10
    bank_grid: int = 0                      # k-means grid of the prototype bank; 0 = kmeans_grid
    data_root: str = ""
    train_list: str = ""
    val_list: str = "val.txt"
    bank_list: str = ""                     # labels for the prototype bank; "" = train_list (SPEC §7 pseudo-labels)
    classes: str = "21"
    seed: int = 0
    device: str = "cpu"
    workers: int = 2
    skip_bad: bool = False                  # skip missing/unreadable files with a warning instead of failing
    checkpoint_every: int = 500
    log_every: int = 10
    checkpoint_backbone: bool = False
    pretrained: str = ""
    eval_k: int = 20


def _voc(preset, train_list, weights, kappa_o):
    semantic, cooccurrence, affinity = weights
    return TrainConfig(
        preset=preset, model=ModelConfig(backbone="resnet101", embedding_dim=64),
        relations=RelationConfig(weight_image=0.1, weight_semantic=semantic, weight_cooccurrence=cooccurrence,
                                 kappa_cooccurrence=kappa_o, weight_affinity=affinity),
        augment=AugmentConfig(crop=512), train_list=train_list, classes="21")


def _synthetic(preset, train_list, weights, kappa_o, objective="spml"):
    base = _voc(preset, train_list, weights, kappa_o)
    return replace(base, objective=objective, model=ModelConfig(backbone="small", embedding_dim=32, width=32),
                   optim=OptimConfig(lr=0.05, iterations=600, batch=8, warmup=20, weight_decay=1e-4),
                   augment=AugmentConfig(crop=96, scale_range=(0.75, 1.25)),
                   overseg=OversegConfig(scale=60.0, sigma=0.8, min_size=20),
                   kmeans_grid=4, bank_grid=12, classes="classes.txt", checkpoint_every=100, eval_k=10)


PRESETS = {
    "voc-scribble": _voc("voc-scribble", "train+aug_scribble.txt", (1.0, 0.5, 0.0), 12.0),
    "voc-box": _voc("voc-box", "train+aug_box.txt", (0.3, 0.3, 0.0), 8.0),
    "voc-tag": _voc("voc-tag", "train+aug_tag.txt", (0.3, 0.3, 0.0), 8.0),
    "voc-point": _voc("voc-point", "train+aug_point.txt", (0.1, 0.1, 0.0), 8.0),
    "densepose-point": replace(
        _voc("densepose-point", "train_point.txt", (1.0, 0.0, 0.5), 12.0),
        model=ModelConfig(backbone="resnet101", embedding_dim=32), kmeans_grid=12,
        relations=RelationConfig(weight_image=0.1, weight_semantic=1.0, weight_cooccurrence=0.0,
                                 weight_affinity=0.5, memory_bank=0),
        optim=OptimConfig(iterations=45000), classes="15"),
    "synthetic-scribble": _synthetic("synthetic-scribble", "train_scribble.txt", (1.0, 0.5, 0.0), 12.0),
    "synthetic-point": _synthetic("synthetic-point", "train_point.txt", (0.1, 0.1, 0.0), 8.0),
    "synthetic-box": replace(_synthetic("synthetic-box", "train_box.txt", (0.3, 0.3, 0.0), 8.0),
                             bank_list="train_boxfill.txt"),
    # tags: relation C on CAM pseudo-labels (SPEC §7), written by `spml-fast cam --list train_tag.txt`
    "synthetic-tag": _synthetic("synthetic-tag", "train_cam.txt", (0.3, 0.3, 0.0), 8.0),
    "synthetic-scribble-pce": _synthetic("synthetic-scribble-pce", "train_scribble.txt", (1.0, 0.5, 0.0), 12.0,
                                         objective="pce"),
}


def _coerce(current, text: str):
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true/false, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(current, tuple):
        return tuple(json.loads(text))
    return type(current)(text) if current is not None else text


def apply_overrides(config: TrainConfig, overrides: dict) -> TrainConfig:
    """overrides: {"optim.lr": 0.01, "relations": {"weight_image": 0.2}, ...}."""
    for key, value in overrides.items():
        if isinstance(value, dict):
            value = {f"{key}.{k}": v for k, v in value.items()}
            config = apply_overrides(config, value)
            continue
        path = key.split(".")
        config = _set(config, path, value, key)
    return config


def _set(obj, path, value, full_key):
    names = {f.name for f in dataclasses.fields(obj)}
    if path[0] not in names:
        raise ValueError(f"unknown setting {full_key!r} (no field {path[0]!r} in {type(obj).__name__})")
    current = getattr(obj, path[0])
    if len(path) > 1:
        return replace(obj, **{path[0]: _set(current, path[1:], value, full_key)})
    if isinstance(value, str) and not isinstance(current, str):
        try:
            value = _coerce(current, value)
        except (ValueError, json.JSONDecodeError) as error:
            raise ValueError(f"bad value for {full_key!r}: {error}") from None
    elif isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    return replace(obj, **{path[0]: value})


def load_yaml_overrides(path: str) -> dict:
    import yaml
    with open(path) as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings")
    return data


def to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def from_dict(data: dict) -> TrainConfig:
    base = TrainConfig()
    nested = {f.name: f for f in dataclasses.fields(TrainConfig)}
    values = {}
    for key, value in data.items():
        if key in nested and dataclasses.is_dataclass(getattr(base, key)):
            kind = type(getattr(base, key))
            kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
            values[key] = kind(**kwargs)
        else:
            values[key] = value
    return TrainConfig(**values)
