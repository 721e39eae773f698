"""Analytic estimate of the GPU memory needed to train HySparKUNet (mixed precision, AdamW).

Used by the planner to choose patch and batch size for a GPU memory target, the
way nnU-Net's planner uses its own (relative) VRAM estimate. Nothing is
instantiated: the estimate is a sum over the network's layers, so it is cheap
enough to evaluate hundreds of times while the planner searches.

The formula
-----------
::

    total = overhead + parameter_state + fragmentation * batch_size * activations_per_sample

* ``activations_per_sample`` -- bytes of the tensors that autograd keeps for the
  backward pass, counted per voxel at each of the five scales (full resolution,
  1/2, 1/4, 1/8, 1/16) and multiplied by the number of voxels there. Per
  operator, under ``torch.autocast`` (fp16 / bf16; 2 bytes) with normalisation
  layers run in fp32 (4 bytes) as CUDA autocast does:

  - MedNeXt block of width C, expansion r: fp32 LayerNorm input (4C), the fp16
    copy entering the expansion conv (2C), expansion-conv output and GELU output
    (2rC each), and the block output (2C) when the next operator keeps it.
  - the width-changing k3 convolution (``expend``): its output (2C');
    2x2x2 max pooling: its output (2C) and its int64 indices (8C).
  - ViT block on the 1/16 tokens (width D, MLP ratio m, h heads, L tokens):
    ``22D + 4mD`` bytes per token (two fp32 LayerNorm inputs, fp16 copies
    entering qkv / proj / fc1, the qkv output, the attention output, the MLP
    hidden layer twice) plus ``4hL`` per token for attention scores and
    probabilities (kept as an upper bound; flash attention stores none).
  - decoder step (deeper width C, output width O, at the finer scale): skip
    MedNeXt block, MedNeXt up block (expansion 4: ``6C + 16C``), the
    concatenation (``2(C+O)``), the residual block (``10O``: two conv outputs,
    two activations, the shortcut conv output).
  - one 1x1 head per deep-supervision output and nnU-Net's Dice + CE loss on it:
    ``16K + 10`` bytes per voxel for K classes (fp16 logits; fp32 softmax,
    log-softmax and casts; one-hot masks; the int64 target).
  - the fp32 input batch and its fp16 copy (``6 x channels``).
* ``parameter_state``, ``fragmentation``, ``overhead`` -- as for every method
  (:mod:`nnunet_hyspark.memory`): 18 bytes per parameter (fp32 weights, fp32
  gradients, AdamW's two fp32 moments, autocast's fp16 weight copies), 1.2 for
  the caching allocator's fragmentation and the transient gradient buffers of
  the largest layers during backward, 1.0 GB of CUDA context and workspaces.

Assumptions: training as nnU-Net does it (autocast, deep supervision, one
optimiser step per batch), no activation checkpointing, no ``torch.compile``
fusion (which would lower the real number). GB here means 2**30 bytes. The
estimate is meant to rank configurations and to keep the plan inside a budget,
not to predict the allocator's peak to the megabyte; it is checked in the tests
against the bytes autograd actually saves.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from nnunet_hyspark.memory import FLOAT, HALF, INDEX, MemoryEstimate, adamw_estimate
from nnunet_hyspark.methods.hyspark.encoder import DEFAULT_DEPTHS, DEFAULT_EXPANSIONS, DEFAULT_WIDTHS
from nnunet_hyspark.methods.hyspark.network import DECODER_SKIP_EXPANSIONS

UP_EXPANSION = 4  # MedNeXtUpBlock's expansion
NUM_SCALES = 5
#: the constructor arguments of HySparKUNet that the estimate depends on
ARCH_KEYS = ("widths", "depths", "expansions", "vit_depth", "vit_heads", "vit_mlp_ratio")


def _mednext_block(c: int, r: float) -> float:
    """Bytes per voxel kept inside one MedNeXt block (its input and output not included)."""
    return FLOAT * c + HALF * c + 2 * HALF * r * c


def _loss(num_classes: int) -> float:
    """Bytes per voxel for one segmentation head and nnU-Net's Dice + CE loss on its output."""
    return 16 * num_classes + INDEX + HALF


def activation_bytes_per_sample(patch_size: Sequence[int], input_channels: int = 1, num_classes: int = 2,
                                widths: Sequence[int] = DEFAULT_WIDTHS, depths: Sequence[int] = DEFAULT_DEPTHS,
                                expansions: Sequence[int] = DEFAULT_EXPANSIONS, vit_depth: int = 3,
                                vit_heads: int = 12, vit_mlp_ratio: float = 4.0,
                                deep_supervision: bool = True) -> float:
    """Bytes autograd keeps for one training sample of HySparKUNet at ``patch_size`` (autocast)."""
    w = list(widths)
    n = [math.prod(int(s) // 2 ** k for s in patch_size) for k in range(NUM_SCALES)]  # voxels per scale
    total = n[0] * (FLOAT + HALF) * input_channels  # the fp32 batch and the fp16 copy the stem reads

    # encoder: stem, per scale [max-pool], MedNeXt blocks, [expend conv to the next width]
    total += n[0] * HALF * w[0]
    for s in range(NUM_SCALES):
        per_voxel = 0.0
        if s > 0:
            per_voxel += (HALF + INDEX) * w[s]  # pooled map + int64 indices
        per_voxel += depths[s] * (_mednext_block(w[s], expansions[s]) + HALF * w[s])
        if s < NUM_SCALES - 1:
            per_voxel += HALF * w[s + 1]  # expend output, also the skip for the decoder
        total += n[s] * per_voxel

    # ViT on the 1/16 tokens, then its final fp32 LayerNorm (input and output)
    d, tokens = w[4], n[4]
    per_token = vit_depth * (22 * d + 4 * vit_mlp_ratio * d + 4 * vit_heads * tokens) + 2 * FLOAT * d
    total += tokens * per_token
    total += tokens * 2 * HALF * d  # the deepest decoder step casts the fp32 tokens twice (up conv, residual conv)

    # decoder: step k fuses the deeper map (width w[k] at scale k) with the skip of width w[k] at scale k - 1
    for k in (4, 3, 2, 1):
        c, o, fine = w[k], w[k - 1], n[k - 1]
        per_voxel = (_mednext_block(c, DECODER_SKIP_EXPANSIONS[k - 1])  # skip block (its output feeds the concat)
                     + _mednext_block(c, UP_EXPANSION)  # up block (its stride-2 depthwise output is normalised)
                     + HALF * (c + o)  # concatenation, read by conv1 and the shortcut
                     + 5 * HALF * o)  # residual block: conv1, act1, conv2, shortcut, output
        if deep_supervision or k == 1:
            per_voxel += _loss(num_classes)
        total += fine * per_voxel
    return float(total)


def count_parameters(input_channels: int = 1, num_classes: int = 2, widths: Sequence[int] = DEFAULT_WIDTHS,
                     depths: Sequence[int] = DEFAULT_DEPTHS, expansions: Sequence[int] = DEFAULT_EXPANSIONS,
                     vit_depth: int = 3, vit_heads: int = 12, vit_mlp_ratio: float = 4.0) -> int:
    """Number of parameters of HySparKUNet, counted from its layer shapes (no model is built)."""
    w = list(widths)
    k3 = 27

    def conv(ci: int, co: int, k: int = k3) -> int:
        return ci * co * k + co

    def mednext(c: int, r: int) -> int:
        return (c * k3 + c) + 2 * c + conv(c, r * c, 1) + conv(r * c, c, 1)

    p = conv(input_channels, w[0])
    p += sum(depths[s] * mednext(w[s], expansions[s]) for s in range(NUM_SCALES))
    p += sum(conv(w[s], w[s + 1]) for s in range(NUM_SCALES - 1))
    d, hidden = w[4], int(w[4] * vit_mlp_ratio)
    p += vit_depth * (2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * hidden + hidden) + (hidden * d + d))
    p += 2 * d
    for k in (4, 3, 2, 1):
        c, o = w[k], w[k - 1]
        p += mednext(c, DECODER_SKIP_EXPANSIONS[k - 1])
        p += (c * k3 + c) + 2 * c + conv(c, UP_EXPANSION * c, 1) + conv(UP_EXPANSION * c, o, 1) + conv(c, o, 1)
        p += conv(c + o, o) + 2 * o + conv(o, o) + 2 * o + conv(c + o, o, 1) + 2 * o
        p += conv(o, num_classes, 1)
    return int(p)


def estimate_training_memory(patch_size: Sequence[int], batch_size: int, input_channels: int = 1,
                             num_classes: int = 2, widths: Sequence[int] = DEFAULT_WIDTHS,
                             depths: Sequence[int] = DEFAULT_DEPTHS, expansions: Sequence[int] = DEFAULT_EXPANSIONS,
                             vit_depth: int = 3, vit_heads: int = 12, vit_mlp_ratio: float = 4.0,
                             deep_supervision: bool = True) -> MemoryEstimate:
    """Estimate of the GPU memory of one training step; see the module docstring for the formula."""
    arch = dict(widths=widths, depths=depths, expansions=expansions, vit_depth=vit_depth, vit_heads=vit_heads,
                vit_mlp_ratio=vit_mlp_ratio)
    params = count_parameters(input_channels, num_classes, **arch)
    act = activation_bytes_per_sample(patch_size, input_channels, num_classes, deep_supervision=deep_supervision,
                                      **arch)
    return adamw_estimate(act, batch_size, params)


def estimate_for_plan(patch_size: Sequence[int], batch_size: int, input_channels: int = 1, num_classes: int = 2,
                      **arch_kwargs: Any) -> MemoryEstimate:
    """:func:`estimate_training_memory` for a plan's ``arch_kwargs`` (which also hold patch size and strides)."""
    return estimate_training_memory(patch_size, batch_size, input_channels, num_classes,
                                    **{k: v for k, v in arch_kwargs.items() if k in ARCH_KEYS})


def estimate_training_memory_gb(patch_size: Sequence[int], batch_size: int, **kwargs) -> float:
    """Shorthand: the total of :func:`estimate_training_memory` in GB (2**30 bytes)."""
    return estimate_training_memory(patch_size, batch_size, **kwargs).total_gb


def max_batch_size(patch_size: Sequence[int], target_gb: float, **kwargs) -> int:
    """Largest batch size whose estimate stays within ``target_gb`` (0 if not even one sample fits)."""
    return estimate_training_memory(patch_size, 1, **kwargs).max_batch_size(target_gb)
