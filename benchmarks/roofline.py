"""Achieved TFLOP/s and the fraction of the device's roofline for the loss
kernels on a GPU.

Work of one forward + backward of ``pixel_segment_loss`` (N pixels, M
segments, D channels):
    matmul FLOPs = 2*N*M*D (forward logits) + 2*N*M*D (backward recomputes
                   the logits) + 2*N*M*D (dE) + 2*N*M*D (dP) = 8*N*M*D
    exponentials = N*M (forward) + N*M (backward recomputes the softmax) = 2*N*M
Roofline time = max(FLOPs / bf16 tensor-core peak, exps / exp throughput);
fraction = roofline time / measured time.
"""
from __future__ import annotations

from typing import Optional

# name fragment -> (dense bf16 tensor-core FLOP/s, exp/s: SMs x 16 SFU lanes x boost clock)
DEVICES = {
    "H100": (989e12, 132 * 16 * 1.98e9),
    "H200": (989e12, 132 * 16 * 1.98e9),
    "A100": (312e12, 108 * 16 * 1.41e9),
    "L40S": (362e12, 142 * 16 * 2.52e9),
}
FORMULA = ("FLOPs = 8·N·M·D (forward logits, backward recompute, dE, dP); exps = 2·N·M; "
           "roofline = max(FLOPs / bf16 peak, exps / exp rate); fraction = roofline / measured")


def peaks(device_name: str) -> Optional[tuple[float, float]]:
    for fragment, values in DEVICES.items():
        if fragment.lower() in device_name.lower():
            return values
    return None


def loss_roofline(case: dict, time_s: float, device_name: str) -> Optional[dict]:
    """{"tflops": achieved, "roofline_fraction": ...} for a loss case, or None off the table."""
    device = peaks(device_name)
    if device is None or not time_s:
        return None
    flops = 8 * case["N"] * case["M"] * case["D"]
    exps = 2 * case["N"] * case["M"]
    bound = max(flops / device[0], exps / device[1])
    return dict(tflops=flops / time_s / 1e12, roofline_fraction=bound / time_s,
                bound="exp" if exps / device[1] > flops / device[0] else "tensor core")
