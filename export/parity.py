"""Parity of an exported model against the PyTorch predictor.

The reference is the library's own inference path (``spml_fast.inference``:
the tiled ``nearest_prototype`` k-NN or the classifier head), not the export
module, so the check covers preprocessing, the vote and the resize too.
Sample inputs have shapes other than the export shape.

Bars: labels agree on >= 99.9% of pixels; scores within 1e-4. A pixel where
the reference's best classes tie (scores within 1e-4 of each other, common
with k-NN votes: 2 of 5 against 2 of 5) agrees with either of the tied
labels, since float noise of 1e-6 in the resize decides such an argmax; the
strict agreement is reported beside it. With a k-NN
vote a near-tie between two prototypes at the k-th place may break the
other way in a different matmul order and move one vote (1/k) at that
pixel, so the scores bar is: within 1e-4 at >= 99.9% of pixels, and the
maximum difference is reported. For a classifier head, where the scores are
continuous, the bar is within 1e-4 everywhere.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from spml_fast.data import normalise
from spml_fast.io import save_json

LABEL_AGREEMENT = 0.999
SCORE_TOLERANCE = 1e-4
DEFAULT_SHAPES = ((1, 96, 128), (2, 75, 111))      # (batch, height, width), none the export shape


LIKELY_CAUSES = ("Likely causes: prototypes tied in similarity (duplicate or near-identical bank entries, e.g. a "
                 "class added from images the bank was built from), or weights holding NaN or infinite values "
                 "(a diverged run).")


class ParityError(RuntimeError):
    """The exported model and the PyTorch predictor disagree beyond the bars."""


@dataclass
class ShapeParity:
    shape: tuple
    label_agreement: float              # equal labels, or the exported label ties the reference's best
    label_agreement_strict: float       # equal labels
    scores_max_abs_diff: float
    scores_within_tolerance: float      # fraction of pixels whose score vector is within 1e-4
    passed: bool


def to_normalised(images, uint8_input: bool) -> torch.Tensor:
    """Graph input (numpy or torch) -> the float [B, 3, H, W] normalised images the PyTorch predictor takes."""
    images = torch.as_tensor(images)
    images = images.permute(0, 3, 1, 2).float() / 255.0 if uint8_input else images.float()
    return normalise(images)


def compare(reference_scores: np.ndarray, labels: np.ndarray, scores: np.ndarray, continuous: bool,
            shape) -> ShapeParity:
    """reference_scores/scores [B, K, H, W]; labels [B, H, W] of the exported model."""
    strict = labels == reference_scores.argmax(1)
    chosen = np.take_along_axis(reference_scores, labels[:, None].astype(np.int64), axis=1)[:, 0]
    agreement = float((strict | (reference_scores.max(1) - chosen <= SCORE_TOLERANCE)).mean())
    diff = np.abs(scores.astype(np.float64) - reference_scores).max(axis=1)             # [B, H, W]
    within = float((diff <= SCORE_TOLERANCE).mean())
    scores_ok = within == 1.0 if continuous else within >= LABEL_AGREEMENT
    return ShapeParity(tuple(shape), agreement, float(strict.mean()), float(diff.max()), within,
                       agreement >= LABEL_AGREEMENT and scores_ok)


def check_parity(reference: Callable[[tuple], np.ndarray], run_exported: Callable,
                 make_inputs: Callable[[int, int, int], tuple], continuous: bool,
                 shapes: Sequence[tuple] = DEFAULT_SHAPES, report_path: Optional[str] = None,
                 engine: str = "onnxruntime") -> dict:
    """reference(graph inputs) -> scores [B, K, H, W]; run_exported(*graph inputs) -> (labels, scores),
    numpy. Returns the report and saves it as JSON at ``report_path``; on a miss saves it beside as
    ``*.failed.json`` and raises ParityError."""
    results = []
    for batch, height, width in shapes:
        inputs = tuple(x.numpy() if isinstance(x, torch.Tensor) else x for x in make_inputs(batch, height, width))
        labels, scores = run_exported(*inputs)
        expected = np.asarray(reference(inputs))
        results.append(compare(expected, np.asarray(labels), np.asarray(scores), continuous, (batch, height, width)))
    report = dict(engine=engine, label_agreement_bar=LABEL_AGREEMENT, score_tolerance=SCORE_TOLERANCE,
                  score_bar="all pixels" if continuous else f">= {LABEL_AGREEMENT:.1%} of pixels",
                  shapes=[asdict(r) for r in results], passed=all(r.passed for r in results))
    if not report["passed"]:
        if report_path:                # the previous artefact and its report stay; this one is kept apart
            save_json(os.path.splitext(report_path)[0] + ".failed.json", report)
        raise ParityError(f"{engine} disagrees with PyTorch:\n{format_report(report)}\n{LIKELY_CAUSES}")
    if report_path:
        save_json(report_path, report)
    return report


def format_report(report: dict) -> str:
    lines = [f"parity {report['engine']} vs PyTorch (labels >= {report['label_agreement_bar']:.1%}, scores within "
             f"{report['score_tolerance']:g} at {report['score_bar']}):"]
    for item in report["shapes"]:
        lines.append(f"  shape {tuple(item['shape'])}: labels agree {item['label_agreement']:.4%} "
                     f"(strict {item['label_agreement_strict']:.4%}), scores max diff "
                     f"{item['scores_max_abs_diff']:.2e}, within tolerance {item['scores_within_tolerance']:.4%} "
                     f"-> {'ok' if item['passed'] else 'MISMATCH'}")
    return "\n".join(lines)

