"""TensorRT engines from the exported ONNX, and a runner on ``execute_async_v3``.

Precision: the backbone runs in FP16 while preprocessing, the L2
normalisation, the cosine against the bank and the vote stay FP32.
- Strongly typed networks (TensorRT >= 10.12, the only kind in 11): the
  precision lives in the graph. ``export_for_tensorrt`` exports the ONNX with
  the embedding network in float16 and casts around it
  (``SegmenterGraph(backbone_dtype=torch.float16)``); the builder follows it.
- Older TensorRT 10: the FP32 graph with ``BuilderFlag.FP16`` and
  ``OBEY_PRECISION_CONSTRAINTS``; every layer from the first ReduceL2 (the
  L2 normalisation) on is pinned to FP32.

One optimisation profile covers batch, height and width (min/opt/max).
Buffers are torch CUDA tensors, so no pycuda is needed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from spml_fast.io import atomic_path


def require_tensorrt():
    """The tensorrt module, or a clear error naming what is missing."""
    try:
        import tensorrt
    except ImportError:
        raise RuntimeError("tensorrt is not installed (pip install 'spml-fast[tensorrt]' on a CUDA machine)") from None
    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT needs a CUDA GPU and none is visible")
    return tensorrt


def strongly_typed_supported(trt) -> bool:
    return hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")


@dataclass(frozen=True)
class Profile:
    """Optimisation profile of the image input: (batch, height, width) at min / opt / max."""
    min: tuple = (1, 64, 64)         # parity checks run 96x128 and 75x111
    opt: tuple = (1, 512, 512)
    max: tuple = (8, 1024, 2048)

    def shape(self, which: tuple, uint8_input: bool) -> tuple:
        batch, height, width = which
        return (batch, height, width, 3) if uint8_input else (batch, 3, height, width)


def build_engine(onnx_path: str, plan_path: str, profile: Profile, uint8_input: bool, fp16: bool = True,
                 bank_size: Optional[int] = None, workspace_gb: float = 4.0) -> dict:
    """Parse ``onnx_path``, build and write a serialized engine to ``plan_path`` atomically."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = strongly_typed_supported(trt)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    with open(onnx_path, "rb") as handle:
        if not parser.parse(handle.read()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16 and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pin_fp32_after_normalisation(trt, network)
    optimisation = builder.create_optimization_profile()
    optimisation.set_shape("images", profile.shape(profile.min, uint8_input), profile.shape(profile.opt, uint8_input),
                           profile.shape(profile.max, uint8_input))
    if bank_size is not None:                  # --bank-as-input: the bank size is fixed by the profile
        for name in ("prototypes", "prototype_labels"):
            shape = tuple(network.get_input(i).shape for i in range(network.num_inputs)
                          if network.get_input(i).name == name)[0]
            fixed = (bank_size,) + tuple(shape[1:])
            optimisation.set_shape(name, fixed, fixed, fixed)
    config.add_optimization_profile(optimisation)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    with atomic_path(plan_path) as temp:
        with open(temp, "wb") as out:
            out.write(serialized)
    return dict(tensorrt=trt.__version__, strongly_typed=strongly_typed, fp16=fp16,
                profile=dict(min=profile.min, opt=profile.opt, max=profile.max))


def pin_fp32_after_normalisation(trt, network) -> int:
    """Weakly typed builds: layers from the first L2 reduction on run in FP32. Returns how many."""
    pinned, started = 0, False
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        started = started or "ReduceL2" in layer.name or "reduce_l2" in layer.name.lower()
        if started and layer.type not in (trt.LayerType.SHAPE, trt.LayerType.CONSTANT):
            layer.precision = trt.float32
            for output in range(layer.num_outputs):
                if layer.get_output(output).dtype in (trt.float16, trt.float32):
                    layer.set_output_type(output, trt.float32)
            pinned += 1
    return pinned


class TensorRTRunner:
    """Runs a serialized engine: inputs numpy or torch, outputs numpy, on one CUDA stream."""

    def __init__(self, plan_path: str, device: int = 0):
        trt = require_tensorrt()
        self.trt = trt
        self.device = torch.device("cuda", device)
        with open(plan_path, "rb") as handle:
            self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(handle.read())
        if self.engine is None:
            raise RuntimeError(f"{plan_path}: not a TensorRT engine for this TensorRT version and GPU")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.stream = torch.cuda.Stream(self.device)

    def _torch_dtype(self, name: str):
        trt = self.trt
        mapping = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
                   trt.int64: torch.int64, trt.uint8: torch.uint8, trt.bool: torch.bool}
        return mapping[self.engine.get_tensor_dtype(name)]

    def __call__(self, *arrays) -> list[np.ndarray]:
        return [t.cpu().numpy() for t in self.run_torch(*arrays)]

    def run_torch(self, *arrays) -> list[torch.Tensor]:
        """Inputs in ``self.inputs`` order (numpy or torch); outputs as CUDA tensors."""
        keep = []
        with torch.cuda.stream(self.stream):
            for name, array in zip(self.inputs, arrays):
                tensor = torch.as_tensor(array).to(self.device, self._torch_dtype(name)).contiguous()
                keep.append(tensor)
                self.context.set_input_shape(name, tuple(tensor.shape))
                self.context.set_tensor_address(name, tensor.data_ptr())
            outputs = []
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                tensor = torch.empty(shape, dtype=self._torch_dtype(name), device=self.device)
                self.context.set_tensor_address(name, tensor.data_ptr())
                outputs.append(tensor)
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
        self.stream.synchronize()
        return outputs
