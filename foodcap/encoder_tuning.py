"""Inference-time tuning of the CLIP image tower: BatchNorm folding and the choice of numeric precision.

    python -c "from foodcap.encoder_tuning import resolve_precision; print(resolve_precision('auto', 'cpu'))"

Folding a frozen BatchNorm into the convolution before it gives the same function (to float rounding, about
1e-7 relative) with one pass over the activations fewer; on the ResNet towers (RN50x4, ...) that is ~10–15 % of
CPU time. Precision names:

* `fp32`: full precision.
* `fp16`: weights in fp16 with norms in fp32, as OpenAI's `clip.load` does on CUDA (and ClipCap's features
  were made). CUDA only.
* `bf16`: bfloat16 autocast (weights kept in fp32, convolutions and matmuls run in bf16). On CPUs with AMX
  units (Intel Xeon Sapphire Rapids and later) it is ~3x faster than fp32; embeddings move by ~0.3 % of
  their scale, about what fp16 does on a GPU.
* `auto`: fp16 on CUDA, bf16 on a CPU with AMX, fp32 otherwise. `None` (the library default, used for
  captioning) is fp16 on CUDA and fp32 elsewhere, so a caption never depends on which CPU made it.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def cpu_has_amx() -> bool:
    """True when this CPU has AMX tiles (native bf16 matrix units) and torch can use them."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private in torch 2.x; absent means "don't know"
    try:
        return bool(probe()) if probe is not None else False
    except Exception:  # noqa: BLE001 - a failing probe must never stop an extraction
        return False


def resolve_precision(precision: Optional[str], device: torch.device | str) -> str:
    """`precision` (one of PRECISIONS, or None) for `device` -> a concrete 'fp32', 'bf16' or 'fp16'."""
    device_type = torch.device(device).type
    if precision is None:
        return "fp16" if device_type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "auto":
        if device_type == "cuda":
            return "fp16"
        return "bf16" if device_type == "cpu" and cpu_has_amx() else "fp32"
    if precision == "fp16" and device_type != "cuda":
        raise ValueError(f"precision fp16 needs a CUDA device (got {device_type}); use bf16 or fp32 on a CPU")
    return precision


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """The autocast dtype a resolved precision runs under (None: no autocast)."""
    return torch.bfloat16 if precision == "bf16" else None


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A convolution computing bn(conv(x)) with bn in eval mode (running statistics)."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)  # (C_out,)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                      device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        # computed in float64 so the folded weights are the exact product rounded once
        fused.weight.copy_(conv.weight.double() * scale.reshape(-1, 1, 1, 1))
        fused.bias.copy_((bias - bn.running_mean.double()) * scale + bn.bias.double())
    return fused.requires_grad_(False)


def fold_batch_norms(visual: nn.Module) -> int:
    """Fold every BatchNorm of an open_clip ModifiedResNet (the CLIP RN towers) into its convolution, in place.

    Returns the number folded; other towers (ViTs have no BatchNorm) are left untouched and give 0. Only the
    known conv->bn pairs of ModifiedResNet are folded: `convK`/`bnK` in the stem and in every Bottleneck
    (whose forward is bnK(convK(x))), and the Conv2d->BatchNorm2d of each `downsample` Sequential.
    """
    from open_clip.modified_resnet import Bottleneck, ModifiedResNet

    if not isinstance(visual, ModifiedResNet) or visual.training:
        return 0
    folded = 0
    for module in visual.modules():
        if isinstance(module, (ModifiedResNet, Bottleneck)):
            for k in (1, 2, 3):
                conv, bn = getattr(module, f"conv{k}", None), getattr(module, f"bn{k}", None)
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    setattr(module, f"conv{k}", _folded(conv, bn))
                    setattr(module, f"bn{k}", nn.Identity())
                    folded += 1
        if isinstance(module, Bottleneck) and isinstance(module.downsample, nn.Sequential):
            children = list(module.downsample.named_children())
            for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    setattr(module.downsample, conv_name, _folded(conv, bn))
                    setattr(module.downsample, bn_name, nn.Identity())
                    folded += 1
    return folded
