"""Training configuration: typed dataclasses, presets (docs/method.md: relations, training recipe), and
overrides from a YAML file or ``section.field=value`` strings."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, replace

from .crf import CrfConfig
from .data import AugmentConfig, OversegConfig
from .models import ModelConfig
from .objective import ObjectiveConfig
from .relations import RelationConfig


DEFAULT_K = 20      # neighbours voting at inference (SegSort's k): the one source of this default


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "sgd"                  # "sgd" (momentum; the paper) | "adamw"
    lr: float = 3e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup: int = 100
    power: float = 0.9
    iterations: int = 30000
    batch: int = 4

    def __post_init__(self):
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optim.optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.iterations < 1:
            raise ValueError(f"--iterations must be >= 1, got {self.iterations}")
        if self.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {self.batch}")
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "voc-scribble"
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)   # loss terms (spml_fast.objective)
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
    bank_list: str = ""                     # labels of the prototype bank; "" = train_list (pseudo-labels: docs/data.md)
    classes: str = "21"
    seed: int = 0
    device: str = "cpu"
    workers: int = 2
    skip_bad: bool = False                  # skip missing/unreadable files with a warning instead of failing
    allow_outside_root: bool = False        # list files may name files outside the data root (../, absolute)
    checkpoint_every: int = 500
    log_every: int = 10
    checkpoint_backbone: bool = False
    pretrained: str = ""
    eval_k: int = DEFAULT_K                 # neighbours voting at inference (eval, bank, export, predict)
    crf: CrfConfig = field(default_factory=CrfConfig)   # dense CRF after the predictor (evaluation, predict)


# The paper's relation weights and co-occurrence concentration per supervision (its Table 7).
SCRIBBLE_RELATIONS = RelationConfig(weight_image=0.1, weight_semantic=1.0, weight_cooccurrence=0.5,
                                    kappa_cooccurrence=12.0)
BOX_RELATIONS = RelationConfig(weight_image=0.1, weight_semantic=0.3, weight_cooccurrence=0.3, kappa_cooccurrence=8.0)
TAG_RELATIONS = BOX_RELATIONS
POINT_RELATIONS = RelationConfig(weight_image=0.1, weight_semantic=0.1, weight_cooccurrence=0.1,
                                 kappa_cooccurrence=8.0)
DENSEPOSE_RELATIONS = RelationConfig(weight_image=0.1, weight_semantic=1.0, weight_cooccurrence=0.0,
                                     weight_affinity=0.5, memory_bank=0)

# What a run learns from (spml_fast.objective).
SPML = ObjectiveConfig(relations=1.0)
PARTIAL_CE = ObjectiveConfig(relations=0.0, partial_ce=1.0)
HYBRID = ObjectiveConfig(relations=1.0, partial_ce=1.0)
TREE_ENERGY = ObjectiveConfig(relations=0.0, partial_ce=1.0, tree_energy=0.4)
GAUSSIAN_MIXTURE = ObjectiveConfig(relations=0.0, partial_ce=1.0, gaussian_mixture=0.4)
HYBRID_TREE_ENERGY = ObjectiveConfig(relations=1.0, partial_ce=1.0, tree_energy=0.4)
TREE_ENERGY_GAUSSIAN_MIXTURE = ObjectiveConfig(relations=0.0, partial_ce=1.0, tree_energy=0.4, gaussian_mixture=0.4)


def _voc(preset: str, train_list: str, relations: RelationConfig) -> TrainConfig:
    """The paper's recipe: DeepLab-v2 ResNet-101, D = 64, crop 512, SGD, relations only."""
    return TrainConfig(preset=preset, model=ModelConfig(backbone="resnet101", embedding_dim=64),
                       relations=relations, augment=AugmentConfig(crop=512), train_list=train_list, classes="21")


def _synthetic(preset: str, train_list: str, relations: RelationConfig, objective: ObjectiveConfig,
               **changes) -> TrainConfig:
    """The built-in data's recipe: the small CPU network, 96-pixel crops, AdamW, and the dense CRF after the
    predictor at evaluation (every objective, the baseline too: one protocol)."""
    return replace(TrainConfig(
        preset=preset, objective=objective, relations=relations,
        model=ModelConfig(backbone="small", embedding_dim=32, width=32),
        optim=OptimConfig(optimizer="adamw", lr=2e-3, iterations=600, batch=8, warmup=20, weight_decay=1e-4),
        augment=AugmentConfig(crop=96, scale_range=(0.75, 1.25)),
        overseg=OversegConfig(scale=60.0, sigma=0.8, min_size=20), kmeans_grid=4, bank_grid=12,
        train_list=train_list, classes="classes.txt", checkpoint_every=100, eval_k=10,
        crf=CrfConfig(enabled=True)), **changes)


PRESETS = {
    "voc-scribble": _voc("voc-scribble", "train+aug_scribble.txt", SCRIBBLE_RELATIONS),
    "voc-box": _voc("voc-box", "train+aug_box.txt", BOX_RELATIONS),
    "voc-tag": _voc("voc-tag", "train+aug_tag.txt", TAG_RELATIONS),
    "voc-point": _voc("voc-point", "train+aug_point.txt", POINT_RELATIONS),
    "densepose-point": replace(_voc("densepose-point", "train_point.txt", DENSEPOSE_RELATIONS),
                               model=ModelConfig(backbone="resnet101", embedding_dim=32), kmeans_grid=12,
                               optim=OptimConfig(iterations=45000), classes="15"),
    # the default: the objective that won the robustness suite (docs/objectives.md)
    "synthetic-scribble": _synthetic("synthetic-scribble", "train_scribble.txt", SCRIBBLE_RELATIONS,
                                     TREE_ENERGY_GAUSSIAN_MIXTURE),
    "synthetic-scribble-spml": _synthetic("synthetic-scribble-spml", "train_scribble.txt", SCRIBBLE_RELATIONS, SPML),
    "synthetic-scribble-pce": _synthetic("synthetic-scribble-pce", "train_scribble.txt", SCRIBBLE_RELATIONS,
                                         PARTIAL_CE),
    "synthetic-scribble-hybrid": _synthetic("synthetic-scribble-hybrid", "train_scribble.txt", SCRIBBLE_RELATIONS,
                                            HYBRID),
    "synthetic-scribble-tel": _synthetic("synthetic-scribble-tel", "train_scribble.txt", SCRIBBLE_RELATIONS,
                                         TREE_ENERGY),
    "synthetic-scribble-agmm": _synthetic("synthetic-scribble-agmm", "train_scribble.txt", SCRIBBLE_RELATIONS,
                                          GAUSSIAN_MIXTURE),
    "synthetic-scribble-hybrid-tel": _synthetic("synthetic-scribble-hybrid-tel", "train_scribble.txt",
                                                SCRIBBLE_RELATIONS, HYBRID_TREE_ENERGY),
    "synthetic-scribble-tel-agmm": _synthetic("synthetic-scribble-tel-agmm", "train_scribble.txt",
                                              SCRIBBLE_RELATIONS, TREE_ENERGY_GAUSSIAN_MIXTURE),
    "synthetic-point": _synthetic("synthetic-point", "train_point.txt", POINT_RELATIONS, SPML),
    "synthetic-box": _synthetic("synthetic-box", "train_box.txt", BOX_RELATIONS, SPML, bank_list="train_boxfill.txt"),
    # tags: relation C on CAM pseudo-labels, written by `spml-fast cam --list train_tag.txt`
    "synthetic-tag": _synthetic("synthetic-tag", "train_cam.txt", TAG_RELATIONS, SPML),
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
    try:
        with open(path) as handle:
            data = yaml.safe_load(handle) or {}
    except OSError as error:
        raise ValueError(f"--config {path}: cannot read ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise ValueError(f"--config {path}: not YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of settings")
    return data


def to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


# Settings a resumed run may change: where and how it runs, not what it learns.
RUNTIME_SETTINGS = frozenset({"device", "workers", "skip_bad", "log_every"})


def differences(first: TrainConfig, second: TrainConfig) -> list[str]:
    """Dotted names of the settings that differ (``optim.iterations``, ...)."""
    def flat(data, prefix=""):
        out = {}
        for key, value in data.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[prefix + key] = tuple(value) if isinstance(value, list) else value
        return out
    a, b = flat(to_dict(first)), flat(to_dict(second))
    return sorted(key for key in a.keys() | b.keys() if a.get(key) != b.get(key))


def _build(kind, data: dict, where: str):
    """A (nested) config dataclass from its ``to_dict`` form; unknown keys are errors naming the key."""
    fields = {f.name: f for f in dataclasses.fields(kind)}
    defaults = kind()
    values = {}
    for key, value in data.items():
        if key not in fields:
            raise ValueError(f"{where}: unknown setting {key!r} in {kind.__name__}")
        current = getattr(defaults, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = _build(type(current), value, where)
        elif isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        values[key] = value
    return kind(**values)


LEGACY_OBJECTIVES = {"spml": SPML, "pce": replace(PARTIAL_CE, head_scale=0.0)}


def from_dict(data: dict, where: str = "config") -> TrainConfig:
    """The inverse of ``to_dict``. Runs saved before objectives were weights (``"objective": "pce"``)
    load with the objective they trained with."""
    data = dict(data)
    if isinstance(data.get("objective"), str):
        if data["objective"] not in LEGACY_OBJECTIVES:
            raise ValueError(f"{where}: unknown objective {data['objective']!r}")
        data["objective"] = dataclasses.asdict(LEGACY_OBJECTIVES[data["objective"]])
    return _build(TrainConfig, data, where)
