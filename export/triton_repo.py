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

import os
import shutil
from dataclasses import dataclass
from typing import Optional

from spml_fast.io import atomic_path, save_json, save_text


@dataclass(frozen=True)
class ServingConfig:
    name: str = "spml_segmenter"
    max_batch_size: int = 8
    instances: int = 1
    queue_delay_us: int = 100
    tensorrt_accelerator: bool = True        # ONNX models: let Triton's ORT backend use TensorRT, FP16


def _tensor(name: str, dtype: str, dims: list[int]) -> str:
    return f'  {{\n    name: "{name}"\n    data_type: {dtype}\n    dims: [ {", ".join(map(str, dims))} ]\n  }}'


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
    lines = [f'name: "{serving.name}"',
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
    names = ",".join(metadata["class_names"])
    lines.append(f'parameters {{\n  key: "class_names"\n  value {{ string_value: "{names}" }}\n}}')
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
    """Copy the model into DIR/NAME/1/, write config.pbtxt and preprocessing.json; returns the model folder."""
    if not os.path.exists(model_path):
        raise ValueError(f"model {model_path}: no such file")
    folder = os.path.join(out_dir, serving.name)
    version = os.path.join(folder, "1")
    os.makedirs(version, exist_ok=True)
    target = os.path.join(version, "model.plan" if model_path.endswith((".plan", ".engine")) else "model.onnx")
    with atomic_path(target) as temp:
        shutil.copyfile(model_path, temp)
    save_text(os.path.join(folder, "config.pbtxt"), config_text(target, metadata, serving))
    preprocessing = {key: metadata[key] for key in ("mean", "std", "uint8_input", "class_names", "k",
                                                    "bank_as_input", "method") if key in metadata}
    preprocessing["input_layout"] = "NHWC uint8 RGB" if metadata["uint8_input"] else "NCHW float32 RGB in [0, 1]"
    save_json(os.path.join(folder, "preprocessing.json"), dict(preprocessing, parity=parity))
    return folder
