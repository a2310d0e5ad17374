"""ONNX export of the segmenter graph (``graph.SegmenterGraph``).

The dynamo exporter (``torch.export`` with symbolic batch, height and width)
is used first; the TorchScript exporter with ``dynamic_axes`` is the
fallback. The ONNX file carries its own metadata (``metadata_props``): class
names, input layout, k, whether the bank is an input, mean/std.
"""
from __future__ import annotations

import contextlib
import json
import logging
import warnings
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from spml_fast.io import atomic_path

from .graph import INPUT_NAMES, OUTPUT_NAMES, SegmenterGraph

# ONNX ops the graph may contain: all in TensorRT 10's ONNX parser support matrix.
TENSORRT_OPS = frozenset({
    "Add", "ArgMax", "BatchNormalization", "Cast", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv",
    "Div", "Equal", "Expand", "Flatten", "Gather", "GatherND", "Gemm", "GlobalAveragePool", "Identity",
    "MatMul", "Max", "MaxPool", "Mul", "Pad", "Pow", "Range", "ReduceL2", "ReduceMax", "ReduceMean", "ReduceSum", "Relu",
    "Reshape", "Resize", "Shape", "Slice", "Softmax", "Sqrt", "Squeeze", "Sub", "TopK", "Transpose", "Unsqueeze", "Where",
})
MAX_TOPK = 3840


@dataclass(frozen=True)
class ExportConfig:
    k: Optional[int] = None           # neighbours voting; None = the predictor's (the run's eval_k); 1 = argmax
    uint8_input: bool = False         # uint8 [B, H, W, 3] input instead of float [B, 3, H, W] in [0, 1]
    bank_as_input: bool = False       # prototypes / prototype_labels as graph inputs
    extra_classes: int = 8            # with bank_as_input: room for classes added to the bank later
    opset: int = 18
    sample_height: int = 128          # the shape traced at export (parity uses other shapes)
    sample_width: int = 160
    max_side: int = 4096              # upper bound of the symbolic height and width
    max_batch: int = 64

    def __post_init__(self):
        if self.k is not None and not 1 <= self.k < MAX_TOPK:
            raise ValueError(f"--k must lie in [1, {MAX_TOPK}) (TensorRT's TopK limit), got {self.k}")
        if self.extra_classes < 0:
            raise ValueError(f"--extra-classes must be >= 0, got {self.extra_classes}")
        if self.opset < 17:
            raise ValueError(f"--opset must be 17 or newer, got {self.opset}")


def class_capacity(config: ExportConfig, num_classes: int) -> int:
    """Score channels of the graph: the bank's K, plus ``extra_classes`` when the bank is an input
    (the vote compares against a constant arange(capacity); labels >= capacity would never count)."""
    return num_classes + (config.extra_classes if config.bank_as_input else 0)


def sample_inputs(config: ExportConfig, height: int, width: int, batch: int = 1, bank=None, seed: int = 0):
    """Smooth random images (a coarse random field upsampled: region-like, not noise) as graph inputs."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, max(2, height // 16), max(2, width // 16), generator=generator)
    images = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    images = (images + 0.05 * torch.rand(batch, 3, height, width, generator=generator)).clamp(0, 1)
    if config.uint8_input:
        images = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    inputs = [images]
    if config.bank_as_input:
        inputs += [bank.prototypes.float().contiguous(), bank.labels.long().contiguous()]
    return tuple(inputs)


def _dynamic_shapes(config: ExportConfig):
    batch = torch.export.Dim("batch", min=1, max=config.max_batch)
    height = torch.export.Dim("height", min=16, max=config.max_side)
    width = torch.export.Dim("width", min=16, max=config.max_side)
    images = {0: batch, 1: height, 2: width} if config.uint8_input else {0: batch, 2: height, 3: width}
    shapes = {"images": images}
    if config.bank_as_input:
        bank_size = torch.export.Dim("bank_size", min=max(2, config.k), max=1 << 20)
        shapes.update(prototypes={0: bank_size}, prototype_labels={0: bank_size})
    return shapes


def _dynamic_axes(config: ExportConfig):
    axes = {"images": ({0: "batch", 1: "height", 2: "width"} if config.uint8_input
                       else {0: "batch", 2: "height", 3: "width"}),
            "labels": {0: "batch", 1: "height", 2: "width"}, "scores": {0: "batch", 2: "height", 3: "width"}}
    if config.bank_as_input:
        axes.update(prototypes={0: "bank_size"}, prototype_labels={0: "bank_size"})
    return axes


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx's registration logs one "torchvision is not installed" line per torchvision op on every
    export; torchvision is not a dependency (the graph has none of its ops), so those lines say nothing."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def export_onnx(graph: SegmenterGraph, path: str, config: ExportConfig, metadata: dict,
                bank=None) -> str:
    """Write ``graph`` to ``path`` atomically; returns the exporter used ("dynamo" or "torchscript")."""
    import onnx
    graph = graph.eval()
    # batch 2: torch.export specialises a dimension traced at size 1 to the constant 1
    inputs = sample_inputs(config, config.sample_height, config.sample_width, 2, bank)
    input_names = list(INPUT_NAMES[:len(inputs)])
    exporter = "dynamo"
    with atomic_path(path) as temp, warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(graph, inputs, temp, dynamo=True, input_names=input_names,
                              output_names=list(OUTPUT_NAMES), dynamic_shapes=_dynamic_shapes(config),
                              opset_version=config.opset, external_data=False, verbose=False)
        except Exception as error:  # the dynamo exporter failed on this model: fall back to TorchScript
            exporter = f"torchscript (dynamo failed: {type(error).__name__})"
            torch.onnx.export(graph, inputs, temp, dynamo=False, input_names=input_names,
                              output_names=list(OUTPUT_NAMES), dynamic_axes=_dynamic_axes(config),
                              opset_version=config.opset)
        model = onnx.load(temp)
        info = dict(metadata, exporter=exporter, export_config=asdict(config))
        for key, value in info.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
        onnx.checker.check_model(model)
        onnx.save(model, temp)
    return exporter


def read_metadata(path: str) -> dict:
    """The ``metadata_props`` of an exported model, JSON values decoded."""
    import onnx
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as error:  # truncated or not an ONNX file
        raise ValueError(f"--model {path}: not a readable ONNX model ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:200]})") from None
    out = {}
    for entry in model.metadata_props:
        try:
            out[entry.key] = json.loads(entry.value)
        except json.JSONDecodeError:
            out[entry.key] = entry.value
    return out


def unsupported_ops(path_or_model) -> list[str]:
    """Everything in the graph that TensorRT would reject or that breaks the rules of this export:
    ops outside ``TENSORRT_OPS``, ScatterElements/ScatterND with a reduction, OneHot, TopK with a
    non-constant K or K >= 3840. An empty list means the graph passes."""
    import onnx
    from onnx import numpy_helper
    model = onnx.load(path_or_model) if isinstance(path_or_model, str) else path_or_model
    constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    constants[node.output[0]] = numpy_helper.to_array(attribute.t)
    problems = []
    for node in model.graph.node:
        where = f"{node.op_type} ({node.name or node.output[0]})"
        if node.op_type in ("ScatterElements", "ScatterND") and any(
                a.name == "reduction" and a.s not in (b"", b"none") for a in node.attribute):
            problems.append(f"{where}: scatter with reduction")
        elif node.op_type == "TopK":
            k = constants.get(node.input[1])
            if k is None:
                problems.append(f"{where}: K is not a constant")
            elif int(k.reshape(-1)[0]) >= MAX_TOPK:
                problems.append(f"{where}: K = {int(k.reshape(-1)[0])} >= {MAX_TOPK}")
        elif node.op_type not in TENSORRT_OPS:
            problems.append(f"{where}: op not in the TensorRT whitelist")
    return problems
