"""One way to predict with a trained run: ``open_predictor`` turns a run (its folder or checkpoint), plus
an optional prototype bank or classifier head file and the settings the user gave explicitly, into a
``Predictor``. ``eval``, ``predict``, ``export``, the robustness suite and the demo all go through it,
so every command predicts the way ``eval`` measured.

The run's own settings: its class head when its objective trained one, else pixel k-NN against a
prototype bank; k = ``eval_k``; segment k-NN clusters with the bank's k-means grid; the run's dense
CRF. An explicit setting changes only itself: ``crf=False`` turns the run's CRF off and keeps its
parameters, ``k=5`` keeps the method and the CRF.

The rules, each an error naming the option:
- a bank given to a run that predicts with its head, without ``method`` pixel-knn or segment-knn
  (the bank would silently replace the evaluated model);
- ``method="classifier"`` on a run without a head and without a classifier file;
- a k-NN method without a bank, unless the caller builds one (``build_bank``: eval builds it from
  the run's training list, as the bank command does);
- a bank or classifier file not written from this run's checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Union

import numpy as np
import torch
import torch.nn as nn

from .bank import PrototypeBank, build_run_bank, load_bank
from .data import image_tensor
from .inference import PredictorConfig, predict_scores
from .run import Run

# settings a caller may give explicitly; None = the run's own
OVERRIDES = ("method", "k", "window", "scales", "crf")


def changed_settings(settings: PredictorConfig, **given) -> PredictorConfig:
    """``settings`` with the given ``OVERRIDES`` changed (None: unchanged; ``crf``: a bool turns the CRF on or
    off and keeps its parameters)."""
    changes = {name: value for name, value in given.items() if value is not None}
    if isinstance(changes.get("crf"), bool):
        changes["crf"] = replace(settings.crf, enabled=changes["crf"])
    return replace(settings, **changes)


def run_settings(run: Run, method: Optional[str] = None, k: Optional[int] = None, window: Optional[int] = None,
                 scales: Optional[tuple] = None, crf: Optional[bool] = None) -> PredictorConfig:
    """The run's own inference settings with only the given ones changed (``crf``: on/off only)."""
    config = run.config
    settings = PredictorConfig(method="classifier" if config.objective.has_head else "pixel-knn", k=config.eval_k,
                               segment_grid=config.segment_grid, segment_iterations=config.kmeans_iterations,
                               crf=config.crf)
    return changed_settings(settings, method=method, k=k, window=window, scales=scales, crf=crf)


@dataclass
class Predictor:
    """A run's embedding network with one head and its settings.

    network: images [B, 3, H, W] float32 normalised (``data.normalise``) -> embeddings [B, D, H/4, W/4]
    head: a ``PrototypeBank`` (k-NN methods) or a class head module (``classifier``)
    """

    run: Optional[Run]                 # None for a network and head made in code (benchmarks)
    network: nn.Module
    head: Union[PrototypeBank, nn.Module]
    settings: PredictorConfig
    class_names: list
    device: str = "cpu"

    @property
    def method(self) -> str:
        return self.settings.method

    @property
    def k(self) -> int:
        return self.settings.k

    @property
    def crf(self):
        return self.settings.crf

    @property
    def bank(self) -> Optional[PrototypeBank]:
        return self.head if isinstance(self.head, PrototypeBank) else None

    @property
    def classifier(self) -> Optional[nn.Module]:
        return None if isinstance(self.head, PrototypeBank) else self.head

    @property
    def checkpoint(self) -> str:
        return self.run.checkpoint if self.run is not None else ""

    def checkpoint_sha256(self) -> str:
        return self.run.checkpoint_sha256() if self.run is not None else ""

    def with_settings(self, **changes) -> "Predictor":
        """The same network and head with other settings (``changed_settings``)."""
        return replace(self, settings=changed_settings(self.settings, **changes))

    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] normalised -> class scores [B, K, H, W] float32 (``inference.predict_scores``)."""
        return predict_scores(self.network, images.to(self.device), self.head, self.settings)

    def label_image(self, image: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] -> labels [H, W] int64."""
        return self.scores(image_tensor(image)[None])[0].argmax(0).cpu().numpy()

    def describe(self) -> dict:
        """What it predicts with: method, k (k-NN), CRF on or off, windows and scales."""
        return dict(method=self.method, k=self.k if self.bank is not None else None, crf=self.crf.enabled,
                    window=self.settings.window, scales=list(self.settings.scales))


def _check_from_run(kind: str, path: str, metadata: dict, run: Run) -> None:
    recorded = metadata.get("checkpoint_sha256")
    if recorded is not None and recorded != run.checkpoint_sha256():
        raise ValueError(f"--{kind} {path} was fit on another checkpoint than {run.checkpoint}: fit it again "
                         f"for this run")


def _head(run: Run, model, settings: PredictorConfig, bank: Optional[str], classifier: Optional[str],
          device: str, build_bank: bool, bank_options: dict, method: Optional[str]):
    """(head, class names, settings) by the rules of the module doc."""
    from .classifier import load_classifier
    if bank and classifier:
        raise ValueError("give --bank or --classifier, not both")
    if classifier:
        if method not in (None, "classifier"):
            raise ValueError(f"--classifier {classifier} predicts with a head: --method {settings.method} "
                             "does not apply")
        head, names, metadata = load_classifier(classifier, device)
        _check_from_run("classifier", classifier, metadata, run)
        return head, names, replace(settings, method="classifier")
    if settings.method == "classifier":
        if bank:
            raise ValueError(f"--bank {bank}: this run predicts with its class head (the model eval measured); "
                             "to vote against the bank instead give --method pixel-knn (or segment-knn)")
        if model.classifier is None:
            raise ValueError("--method classifier: this run has no class head (fit one with spml-fast "
                             "train-classifier and give --classifier HEAD, or use --method pixel-knn)")
        return model.classifier, list(run.class_names), settings
    if bank:
        head = load_bank(bank, device, run=run)
    elif build_bank:
        head = build_run_bank(run, device=device, model=model, **bank_options)
    else:
        raise ValueError(f"--method {settings.method} votes against a prototype bank: give --bank BANK "
                         f"(spml-fast bank --checkpoint {run.folder} --out BANK)")
    return head, head.class_names, settings


def open_predictor(run: Union[Run, str], bank: Optional[str] = None, classifier: Optional[str] = None,
                   device: str = "cpu", build_bank: bool = False, data_root: Optional[str] = None,
                   progress: bool = True, skip_bad: bool = False, **overrides) -> Predictor:
    """The predictor of a run (see the module doc). overrides: ``OVERRIDES`` given explicitly (None = the
    run's). build_bank: for a k-NN method without ``bank``, build the bank from the run's bank/training
    list (under ``data_root``, default the run's)."""
    unknown = set(overrides) - set(OVERRIDES)
    if unknown:
        raise TypeError(f"open_predictor: unknown settings {sorted(unknown)}")
    run = Run.of(run)
    settings = run_settings(run, **overrides)
    model = run.model(device)
    head, names, settings = _head(run, model, settings, bank, classifier, device, build_bank,
                                  dict(data_root=data_root, progress=progress, skip_bad=skip_bad),
                                  overrides.get("method"))
    return Predictor(run, model.embedding, head, settings, list(names), device)
