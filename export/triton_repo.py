"""An NVIDIA Triton Inference Server model repository for the exported segmenter:

    DIR/NAME/config.pbtxt
    DIR/NAME/1/model.onnx   (or model.plan for a TensorRT engine)
    DIR/NAME/preprocessing.json

The config is written as protobuf text; ``parse_config`` (and the tests)
read it back against Triton's own schema, ``ModelConfig`` of
``tritonclient.grpc.model_config_pb2``, so a field Triton does not know
fails here, not on the server. Height and width are -1; with a baked-in bank the batch dimension
is Triton's (max_batch_size, dynamic batching); with the bank as an input the
bank has no batch dimension, so the repository uses max_batch_size 0 and the
full shapes (Triton batches every input of a batching model).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Optional

from spml_fast.io import atomic_directory, save_json, save_text

MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def check_model_name(name: str) -> str:
    """A Triton model name is one folder: letters, digits, '_', '.', '-', not '..'; nothing that leaves --out."""
    if not MODEL_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"--name {name!r}: a model name is letters, digits, '_', '.' and '-' "
                         "(it becomes a folder under --out)")
    return name


def quoted(text: str) -> str:
    """A protobuf text-format string literal: quotes, backslashes and control characters escaped, so no
    value (a class name from bank metadata) can end the string and add fields."""
    from google.protobuf import text_encoding
    return '"' + text_encoding.CEscape(str(text), as_utf8=True) + '"'


@dataclass(frozen=True)
class ServingConfig:
    name: str = "spml_segmenter"
    max_batch_size: int = 8
    instances: int = 1
    queue_delay_us: int = 100
    tensorrt_accelerator: bool = True        # ONNX models: let Triton's ORT backend use TensorRT, FP16

    def __post_init__(self):
        check_model_name(self.name)
        for name in ("max_batch_size", "instances"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-').replace('-size', '')} must be a positive integer, "
                                 f"got {getattr(self, name)!r}")
        if self.queue_delay_us < 0:
            raise ValueError(f"queue_delay_us must be >= 0, got {self.queue_delay_us}")


def _tensor(name: str, dtype: str, dims: list[int]) -> str:
    return f'  {{\n    name: {quoted(name)}\n    data_type: {dtype}\n    dims: [ {", ".join(map(str, dims))} ]\n  }}'


def config_text(model_file: str, metadata: dict, serving: ServingConfig) -> str:
    """config.pbtxt text. ``metadata``: the export metadata (uint8_input, bank_as_input, num_classes,
    dim, class_names)."""
    plan = model_file.endswith(".plan")
    bank_input = metadata["bank_as_input"]
    batched = not bank_input
    lead = [] if batched else [-1]
    if metadata["uint8_input"]:
        images = _tensor("images", "TYPE_UINT8", lead + [-1, -1, 3])
    else:
        images = _tensor("images", "TYPE_FP32", lead + [3, -1, -1])
    inputs = [images]
    if bank_input:
        inputs += [_tensor("prototypes", "TYPE_FP32", [-1, metadata["dim"]]),
                   _tensor("prototype_labels", "TYPE_INT64", [-1])]
    outputs = [_tensor("labels", "TYPE_INT32", lead + [-1, -1]),
               _tensor("scores", "TYPE_FP32", lead + [metadata["num_classes"], -1, -1])]
    lines = [f"name: {quoted(check_model_name(serving.name))}",
             f'platform: "{"tensorrt_plan" if plan else "onnxruntime_onnx"}"',
             f"max_batch_size: {serving.max_batch_size if batched else 0}",
             "input [\n" + ",\n".join(inputs) + "\n]",
             "output [\n" + ",\n".join(outputs) + "\n]"]
    if batched:
        lines.append(f"dynamic_batching {{\n  max_queue_delay_microseconds: {serving.queue_delay_us}\n}}")
    lines.append(f"instance_group [\n  {{\n    count: {serving.instances}\n    kind: KIND_GPU\n  }}\n]")
    if serving.tensorrt_accelerator and not plan:
        lines.append('optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n    {\n'
                     '      name: "tensorrt"\n'
                     '      parameters { key: "precision_mode" value: "FP16" }\n'
                     '      parameters { key: "max_workspace_size_bytes" value: "4294967296" }\n'
                     '    }\n    ]\n  }\n}')
    names = json.dumps(list(metadata["class_names"]))                  # a JSON list: names may hold commas
    lines.append(f'parameters {{\n  key: "class_names"\n  value {{ string_value: {quoted(names)} }}\n}}')
    return "\n".join(lines) + "\n"


def parse_config(path: str):
    """Parse a config.pbtxt against Triton's ModelConfig schema (needs tritonclient[grpc])."""
    from google.protobuf import text_format
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise RuntimeError("tritonclient is not installed (pip install 'tritonclient[grpc]'), "
                           "which ships Triton's model-configuration schema") from None
    with open(path) as handle:
        return text_format.Parse(handle.read(), model_config_pb2.ModelConfig())


def write_repository(model_path: str, out_dir: str, metadata: dict, serving: ServingConfig = ServingConfig(),
                     parity: Optional[dict] = None) -> str:
    """DIR/NAME with the model in NAME/1/, config.pbtxt and preprocessing.json; returns DIR/NAME. The folder
    is built beside the old one and replaces it whole: other models in DIR are untouched."""
    if not os.path.exists(model_path):
        raise ValueError(f"model {model_path}: no such file")
    folder = os.path.join(out_dir, check_model_name(serving.name))
    with atomic_directory(folder) as staging:
        version = os.path.join(staging, "1")
        os.makedirs(version)
        target = os.path.join(version, "model.plan" if model_path.endswith((".plan", ".engine")) else "model.onnx")
        shutil.copyfile(model_path, target)
        save_text(os.path.join(staging, "config.pbtxt"), config_text(target, metadata, serving))
        preprocessing = {key: metadata[key] for key in ("mean", "std", "uint8_input", "class_names", "k",
                                                        "bank_as_input", "method", "crf") if key in metadata}
        preprocessing["input_layout"] = ("NHWC uint8 RGB" if metadata["uint8_input"]
                                         else "NCHW float32 RGB in [0, 1]")
        save_json(os.path.join(staging, "preprocessing.json"), dict(preprocessing, parity=parity))
    return folder
