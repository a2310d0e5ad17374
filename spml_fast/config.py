"""Training configuration: typed dataclasses, presets (docs/method.md: relations, training recipe), and
overrides from a YAML file or ``section.field=value`` strings."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, replace
from typing import Optional

from .crf import CrfConfig
from .data import MAX_PIXELS, AugmentConfig, OversegConfig, check_max_pixels
from .models import ModelConfig
from .objective import ObjectiveConfig
from .relations import RelationConfig
from .segments import KMEANS_GRID, KMEANS_ITERATIONS


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
    backbone_lr: float = 1.0                # the encoder's learning rate = lr x this (a pretrained encoder: 0.1)

    def __post_init__(self):
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optim.optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.iterations < 1:
            raise ValueError(f"--iterations must be >= 1, got {self.iterations}")
        if self.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {self.batch}")
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if not self.backbone_lr >= 0:
            raise ValueError(f"optim.backbone_lr must be >= 0, got {self.backbone_lr}")


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "voc-scribble"
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)   # loss terms (spml_fast.objective)
    model: ModelConfig = field(default_factory=ModelConfig)
    relations: RelationConfig = field(default_factory=RelationConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    overseg: OversegConfig = field(default_factory=OversegConfig)
    kmeans_grid: int = KMEANS_GRID          # SegSort's k-means of the training segments: start grid per image
    kmeans_iterations: int = KMEANS_ITERATIONS
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
    max_pixels: int = MAX_PIXELS            # refuse images above this many pixels before decoding them
    checkpoint_every: int = 500
    log_every: int = 10
    checkpoint_backbone: bool = False
    pretrained: str = ""                    # ImageNet weights of the encoder: a file, or a NAME of spml_fast.weights
    eval_k: int = DEFAULT_K                 # neighbours voting at inference (eval, bank, export, predict)
    crf: CrfConfig = field(default_factory=CrfConfig)   # dense CRF after the predictor (evaluation, predict)

    def __post_init__(self):
        check_max_pixels(self.max_pixels)
        for name in ("kmeans_grid", "kmeans_iterations", "checkpoint_every", "log_every", "eval_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.bank_grid < 0:
            raise ValueError(f"bank_grid must be >= 0 (0 = kmeans_grid), got {self.bank_grid}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")

    @property
    def segment_grid(self) -> int:
        """k-means start grid of the segments that meet the bank (bank building, segment k-NN)."""
        return self.bank_grid or self.kmeans_grid

    @property
    def labelled_list(self) -> str:
        """The list a bank or a classifier head is built from: bank_list, else the training list."""
        return self.bank_list or self.train_list


# The paper's relation weights and co-occurrence concentration per supervision (its Table 7).
SCRIBBLE_RELATIONS = RelationConfig(weight_image=0.1, weight_semantic=1.0, weight_cooccurrence=0.5,
                                    kappa_cooccurrence=12.0)
BOX_RELATIONS = RelationConfig(weight_image=0.1, weight_semantic=0.3, weight_cooccurrence=0.3, kappa_cooccurrence=8.0)
TAG_RELATIONS = BOX_RELATIONS
POINT_RELATIONS = RelationConfig(weight_image=0.1, weight_semantic=0.1, weight_cooccurrence=0.1,
                                 kappa_cooccurrence=8.0)
DENSEPOSE_RELATIONS = RelationConfig(weight_image=0.1, weight_semantic=1.0, weight_cooccurrence=0.0,
                                     weight_affinity=0.5, memory_bank=0)

# What a run learns from (spml_fast.objective): each named objective once, under one name. The name is
# the preset's suffix (synthetic-scribble-<name>) and the robustness suite's column.
TREE_ENERGY_WEIGHT = 0.4          # TEL's weight beside partial CE (its paper's)
GAUSSIAN_MIXTURE_WEIGHT = 0.4     # AGMM's weight beside partial CE
OBJECTIVES = {
    "pce": ObjectiveConfig(relations=0.0, partial_ce=1.0),
    "spml": ObjectiveConfig(relations=1.0),
    "tel": ObjectiveConfig(relations=0.0, partial_ce=1.0, tree_energy=TREE_ENERGY_WEIGHT),
    "agmm": ObjectiveConfig(relations=0.0, partial_ce=1.0, gaussian_mixture=GAUSSIAN_MIXTURE_WEIGHT),
    "hybrid": ObjectiveConfig(relations=1.0, partial_ce=1.0),
    "hybrid-tel": ObjectiveConfig(relations=1.0, partial_ce=1.0, tree_energy=TREE_ENERGY_WEIGHT),
    "tel-agmm": ObjectiveConfig(relations=0.0, partial_ce=1.0, tree_energy=TREE_ENERGY_WEIGHT,
                                gaussian_mixture=GAUSSIAN_MIXTURE_WEIGHT),
}
DEFAULT_OBJECTIVE = "tel-agmm"    # the robustness suite's most robust objective (docs/objectives.md)
PRETRAINED_OBJECTIVE = "tel-agmm" # the same on the pretrained encoder (docs/objectives.md, pretrained rows)


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


def on_pretrained_encoder(config: TrainConfig, encoder: str = "mobilenet_v2") -> TrainConfig:
    """``config`` on an ImageNet encoder with DeepLabV3+ (``encoders``): the encoder at a tenth of the
    learning rate with its BatchNorm statistics frozen, its weights by name (``weights``)."""
    return replace(config, model=ModelConfig(backbone=encoder, decoder="deeplabv3+",
                                             embedding_dim=config.model.embedding_dim, freeze_backbone_bn=True),
                   optim=replace(config.optim, backbone_lr=0.1), pretrained=encoder)


def _pretrained(preset: str, objective: ObjectiveConfig) -> TrainConfig:
    """The built-in data's recipe on ImageNet MobileNetV2, 400 iterations (minutes on 2 CPU cores, crop 96)."""
    base = on_pretrained_encoder(_synthetic(preset, "train_scribble.txt", SCRIBBLE_RELATIONS, objective))
    return replace(base, optim=replace(base.optim, iterations=400))


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
                                     OBJECTIVES[DEFAULT_OBJECTIVE]),
    **{f"synthetic-scribble-{name}": _synthetic(f"synthetic-scribble-{name}", "train_scribble.txt", SCRIBBLE_RELATIONS,
                                                objective) for name, objective in OBJECTIVES.items()},
    "synthetic-point": _synthetic("synthetic-point", "train_point.txt", POINT_RELATIONS, OBJECTIVES["spml"]),
    "synthetic-box": _synthetic("synthetic-box", "train_box.txt", BOX_RELATIONS, OBJECTIVES["spml"],
                                bank_list="train_boxfill.txt"),
    # tags: relation C on CAM pseudo-labels, written by `spml-fast cam --list train_tag.txt`
    "synthetic-tag": _synthetic("synthetic-tag", "train_cam.txt", TAG_RELATIONS, OBJECTIVES["spml"]),
    # ImageNet MobileNetV2 (`spml-fast weights fetch mobilenet_v2` first); the objective: docs/objectives.md
    "pretrained-scribble": _pretrained("pretrained-scribble", OBJECTIVES[PRETRAINED_OBJECTIVE]),
    "pretrained-scribble-pce": _pretrained("pretrained-scribble-pce", OBJECTIVES["pce"]),
}


def _coerce(current, text: str):
    """A ``--set`` string as the type of the setting it replaces."""
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0", "on", "off"):
            raise ValueError(f"expected true/false, got {text!r}")
        return text.lower() in ("true", "1", "on")
    if isinstance(current, tuple):
        return tuple(json.loads(text))
    if isinstance(current, int):
        return int(text)
    return type(current)(text) if current is not None else text


def checked_value(current, value, key: str, where: str = "setting"):
    """``value`` for the setting ``key`` whose default is ``current``, of the default's type: a bool for a
    bool, an integer for an int, a finite number for a float, a string for a string, a list of numbers for
    a tuple. Anything else is a one-line error naming the key."""
    def fail(expected):
        raise ValueError(f"{where}: {key} must be {expected}, got {value!r}")
    if isinstance(current, bool):
        if not isinstance(value, bool):
            fail("true or false")
    elif isinstance(current, int):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            fail("an integer")
        value = int(value)
    elif isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            fail("a finite number")
        value = float(value)
    elif isinstance(current, str):
        if not isinstance(value, str):
            fail("a string")
    elif isinstance(current, tuple):
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
            fail("a list of finite numbers")
        value = tuple(value)
    elif dataclasses.is_dataclass(current):
        fail(f"a mapping of {type(current).__name__} settings")
    return value


def apply_overrides(config: TrainConfig, overrides: dict, where: str = "setting") -> TrainConfig:
    """overrides: {"optim.lr": 0.01, "relations": {"weight_image": 0.2}, ...}; a string value (``--set``)
    is read as the setting's type; every value is checked (``checked_value``)."""
    if not isinstance(overrides, dict):
        raise ValueError(f"{where}: expected a mapping of settings, got {overrides!r}")
    for key, value in overrides.items():
        if isinstance(value, dict):
            config = apply_overrides(config, {f"{key}.{k}": v for k, v in value.items()}, where)
            continue
        config = _set(config, str(key).split("."), value, key, where)
    return config


def _set(obj, path, value, full_key, where):
    names = {f.name for f in dataclasses.fields(obj)}
    if path[0] not in names:
        raise ValueError(f"unknown setting {full_key!r} (no field {path[0]!r} in {type(obj).__name__})")
    current = getattr(obj, path[0])
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"unknown setting {full_key!r} ({path[0]!r} has no fields)")
        return _replace(obj, {path[0]: _set(current, path[1:], value, full_key, where)}, where)
    if isinstance(value, str) and not isinstance(current, str):
        try:
            value = _coerce(current, value)
        except (ValueError, TypeError, json.JSONDecodeError) as error:
            raise ValueError(f"bad value for {full_key!r}: {error}") from None
    return _replace(obj, {path[0]: checked_value(current, value, full_key, where)}, where)


def _replace(obj, changes: dict, where: str):
    """dataclasses.replace, with a dataclass's own checks reported as one line naming where."""
    try:
        return replace(obj, **changes)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{where}: {error}") from None


def parse_assignments(items: list[str]) -> dict:
    """``--set KEY=VALUE`` strings -> {KEY: VALUE} (values stay strings: ``apply_overrides`` types them)."""
    overrides = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value
    return overrides


def command_config(preset: Optional[str], overrides: dict, saved: Optional[TrainConfig] = None,
                   folder: str = "") -> TrainConfig:
    """What ``train`` runs: the preset with the given settings; when resuming, the run's saved settings with
    them (``train`` then holds them to ``check_resume``)."""
    if saved is not None:
        if preset and preset != saved.preset:
            raise ValueError(f"--resume: {folder} is a {saved.preset} run, not {preset}")
        return apply_overrides(saved, overrides)
    if not preset:
        raise ValueError("--preset is required (or --resume --out RUN_DIR)")
    if preset not in PRESETS:
        raise ValueError(f"--preset {preset!r}: not one of {', '.join(sorted(PRESETS))}")
    return apply_overrides(PRESETS[preset], overrides)


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


# Settings a resumed run may change: where and how it runs, not what it learns; and optim.iterations may
# grow (a finished run is extended).
RUNTIME_SETTINGS = frozenset({"device", "workers", "skip_bad", "log_every", "max_pixels"})


def check_resume(saved: TrainConfig, config: TrainConfig, folder: str) -> None:
    """The one resume rule: ``config`` may differ from the run's ``saved`` settings only in the runtime
    settings, and in ``optim.iterations`` when it grows."""
    changed = [key for key in differences(saved, config) if key not in RUNTIME_SETTINGS]
    if changed == ["optim.iterations"] and config.optim.iterations > saved.optim.iterations:
        return
    if changed:
        raise ValueError(f"--resume: {folder} continues with its own settings (config.json); these would "
                         f"change: {', '.join(changed[:6])} (only --device, --workers, --skip-bad may change, "
                         "and --iterations may grow)")


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


def _build(kind, data: dict, where: str, prefix: str = ""):
    """A (nested) config dataclass from its ``to_dict`` form; unknown keys and values of the wrong type are
    errors naming the dotted key."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: {prefix.rstrip('.') or 'the configuration'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(kind)}
    defaults = kind()
    values = {}
    for key, value in data.items():
        if key not in fields:
            raise ValueError(f"{where}: unknown setting {prefix + key!r} in {kind.__name__}")
        current = getattr(defaults, key)
        if dataclasses.is_dataclass(current):
            value = _build(type(current), value, where, f"{prefix}{key}.")
        else:
            value = checked_value(current, value, prefix + key, where)
        values[key] = value
    try:
        return kind(**values)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{where}: {error}") from None


LEGACY_OBJECTIVES = {"spml": OBJECTIVES["spml"], "pce": replace(OBJECTIVES["pce"], head_scale=0.0)}


def from_dict(data: dict, where: str = "config") -> TrainConfig:
    """The inverse of ``to_dict``. Runs saved before objectives were weights (``"objective": "pce"``)
    load with the objective they trained with."""
    data = dict(data)
    if isinstance(data.get("objective"), str):
        if data["objective"] not in LEGACY_OBJECTIVES:
            raise ValueError(f"{where}: unknown objective {data['objective']!r}")
        data["objective"] = dataclasses.asdict(LEGACY_OBJECTIVES[data["objective"]])
    return _build(TrainConfig, data, where)
