"""Spatio-temporal action detection (AVA): person boxes on a keyframe → multi-label action logits.

The head is the one every ViT detector on AVA uses (SlowFast's RoI head, mmaction2's and MCG-NJU's VideoMAE
detectors): the encoder's last-layer tokens after its final ``norm``, reshaped to a (T', H', W') map at stride
``patch_size`` → mean over time → RoIAlign of each box (``roi_size`` × ``roi_size`` bins, aligned) → max over the
bins → dropout → one linear layer. No feature pyramid, no second stage, no sigmoid inside: the loss is
BCE-with-logits and evaluation applies the sigmoid itself.

The encoder is a plain ``VisionTransformer`` under ``encoder.*``, so classifier and pre-training checkpoints map
onto it by name (``load_encoder_weights``). Single-device code: no distribution, precision or device placement.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from models.convert import EncoderLoadReport, load_into_encoder
from models.flops import linear_flops
from models.pos_embed import PositionEmbedding
from models.vit import Grid, VisionTransformer, ViTConfig


@dataclass
class DetectorConfig:
    encoder: ViTConfig = field(default_factory=ViTConfig)  # backbone; img_size / num_frames: the training clip
    # AVA action ids 1..80 → columns 0..79; evaluation keeps the label map's subset (60 classes in v2.2)
    num_classes: int = 80
    dropout: float = 0.5  # dropout on the pooled box feature, before the linear layer (SlowFast, VideoMAE)
    roi_size: int = 7  # RoIAlign output side (bins per box side) before the max over bins
    head_init_scale: float = 0.001  # the fresh head's weights are scaled by this (VideoMAE init_scale)

    def __post_init__(self):
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.roi_size < 1:
            raise ValueError(f"roi_size must be >= 1, got {self.roi_size}")


class FramewisePositionEmbedding(PositionEmbedding):
    """A ``PositionEmbedding`` whose sin-cos table follows a frame of another size by resampling each frame.

    VideoMAE's sin-cos table is 1-D over the flattened t-major token index. Rebuilding it for a new grid (what the
    base class does, as VideoMAE's classifier does) gives the token at (t, y, x) the code of index
    t·H'·W' + y·W' + x, so once W' or H' differs from training every row of every frame carries codes it never
    had at that place. A detector trained on square crops and tested on whole frames (short side 256, e.g.
    256 × 320) needs the training layout kept: the training table read as (T', H0, W0, D) and each frame's
    (H0, W0) slice resampled bicubically to (H', W'), as MCG-NJU's VideoMAE action detection does online. Another
    frame count takes the 1-D table for T'·H0·W0 positions first (exactly what rebuilding gives at the training
    frame size). At the training frame size nothing changes. The separable kind needs nothing new: the base class
    already resamples its spatial table bicubically.
    """

    def forward(self, grid: Grid) -> torch.Tensor:
        t, h, w = grid = tuple(grid)
        h0, w0 = self.grid[1:]
        if self.kind != "sincos" or (h, w) == (h0, w0):
            return super().forward(grid)
        frames = super().forward((t, h0, w0)).reshape(t, h0, w0, self.dim).permute(0, 3, 1, 2)
        # models.pos_embed.resample_spatial applied to each frame, as one batched call.
        frames = F.interpolate(frames.float(), size=(h, w), mode="bicubic", align_corners=False)
        return frames.permute(0, 2, 3, 1).reshape(1, t * h * w, self.dim)


def pad_to_patches(video: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Zero-pad (B, C, T, H, W) at the bottom and right up to multiples of ``patch_size``.

    A whole frame at short side 256 is rarely a multiple of 16 wide (16:9 gives 455). Padding bottom/right keeps
    every box coordinate valid, and zero in a normalized clip is the mean colour (MCG-NJU pads its batches the
    same way, ``size_divisible=16``)."""
    h, w = video.shape[-2:]
    pad_h, pad_w = -h % patch_size, -w % patch_size
    if pad_h or pad_w:
        video = F.pad(video, (0, pad_w, 0, pad_h))
    return video


def roi_max_features(feature_map: torch.Tensor, boxes: torch.Tensor, roi_size: int, stride: int) -> torch.Tensor:
    """Max over the ``roi_size``² RoIAlign bins of each box: (B, D, H', W') map, (K, 5) boxes → (K, D).

    ``boxes`` rows are ``[batch_index, x1, y1, x2, y2]`` in input pixels; the map has one cell per ``stride``
    pixels. ``aligned=True``: pixel x lies at map coordinate x / stride − 0.5, so a cell's value sits at the centre
    of its patch, as it should for a patch token. ``sampling_ratio=0``: ceil(box side / roi_size) samples per bin
    and side, adapting to the box size (SlowFast, mmaction2 and MCG-NJU alike)."""
    pooled = roi_align(feature_map, boxes.to(feature_map.dtype), output_size=roi_size, spatial_scale=1.0 / stride,
                       sampling_ratio=0, aligned=True)
    return pooled.amax(dim=(2, 3))


class ActionDetector(nn.Module):
    """ViT encoder + RoI head: ``forward(video, boxes)`` → (K, num_classes) action logits, one row per box."""

    def __init__(self, cfg: DetectorConfig):
        super().__init__()
        self.cfg = cfg
        enc = cfg.encoder
        # "none": the final norm on every token and no head of its own; trunc-normal init as for fine-tuning.
        self.encoder = VisionTransformer(enc, num_classes=0, global_pool="none", init="trunc_normal")
        if enc.pos_embed == "sincos":
            # The sin-cos table is a non-persistent buffer: swapping the module changes no parameter or key.
            self.encoder.pos_embed = FramewisePositionEmbedding("sincos", enc.grid, self.encoder.embed_dim,
                                                                cls_token=enc.cls_token)
        self.embed_dim, self.depth = self.encoder.embed_dim, self.encoder.depth
        self.patch_size = enc.patch_size
        self.head_drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(self.embed_dim, cfg.num_classes)
        with torch.no_grad():
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
            # VideoMAE's init_scale: a near-zero head starts every logit near 0, and its small weights keep what
            # the first steps send back into the pre-trained encoder small.
            self.head.weight.mul_(cfg.head_init_scale)

    def feature_map(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, C, T, H, W), normalized → (B, D, H', W') float32: last-layer tokens after ``norm``, mean over T'.

        H and W that are not multiples of ``patch_size`` are zero-padded at the bottom and right first
        (``pad_to_patches``). The RoI head runs in float32: it is tiny next to the encoder, RoIAlign has no
        bfloat16 kernel on CPU, and box coordinates in bfloat16 are off by pixels (8 significant bits)."""
        video = pad_to_patches(video, self.patch_size)
        t, h, w = self.encoder.patch_embed.grid(video)
        tokens = self.encoder.forward_features(video)[:, self.encoder.num_prefix_tokens:]  # a cls token is no cell
        b, d = tokens.shape[0], tokens.shape[-1]
        fmap = tokens.reshape(b, t, h * w, d).mean(dim=1, dtype=torch.float32)
        return fmap.transpose(1, 2).reshape(b, d, h, w)

    def box_features(self, feature_map: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """(B, D, H', W') map and (K, 5) boxes → (K, D) pooled features (float32), before dropout and head."""
        if boxes.ndim != 2 or boxes.shape[1] != 5:
            raise ValueError(f"boxes must be (K, 5) [batch_index, x1, y1, x2, y2], got {tuple(boxes.shape)}")
        return roi_max_features(feature_map, boxes, self.cfg.roi_size, self.patch_size)

    def forward(self, video: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """video (B, C, T, H, W), normalized, any H and W (square training crops, whole frames at test);
        boxes (K, 5) float ``[batch_index, x1, y1, x2, y2]`` in pixels of ``video`` as given (a normalized AVA box
        times (W, H, W, H); (0, 0) is the top-left corner of the top-left pixel), rows of any clip in any order,
        K may be 0 → logits (K, num_classes) in the head's dtype, row k for box k. No sigmoid: see
        ``detection_loss``.

        Batch indices are not range-checked (that would stall the device on every step): they must lie in
        [0, B)."""
        pooled = self.box_features(self.feature_map(video), boxes)
        return self.head(self.head_drop(pooled).to(self.head.weight.dtype))

    # ---- hooks for the optimizer and the FLOP counter -------------------------------------------------------

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay besides biases and norms (handled by shape)."""
        return {f"encoder.{name}" for name in self.encoder.no_weight_decay()}

    def layer_id(self, name: str) -> int:
        """VideoMAE's layer-decay groups: the encoder's own (embeddings 0, block i → i + 1, its norm depth + 1)
        and the head with the norm at depth + 1, the full learning rate."""
        if name.startswith("encoder."):
            return self.encoder.layer_id(name.removeprefix("encoder."))
        return self.depth + 1

    def forward_flops(self, grid: Grid, num_boxes_per_clip: float) -> int:
        """Forward FLOPs (2 per multiply-add) of one clip of token grid ``grid`` (after padding) with
        ``num_boxes_per_clip`` boxes (an average is fine): the dense encoder plus the linear head per box.

        RoIAlign, the temporal mean and the max are left out, as softmax and norms are: RoIAlign takes 4 multiply-adds
        per sample, K·D·roi_size² samples for person-sized boxes (K = 10, ViT-B 16×224²: ~0.01 GFLOPs against ~360
        for the encoder)."""
        flops = self.encoder.forward_flops(grid)
        return int(flops + linear_flops(num_boxes_per_clip, self.embed_dim, self.head.out_features))


def build_detector(cfg: DetectorConfig) -> ActionDetector:
    return ActionDetector(cfg)


def detection_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Multi-label loss: BCE-with-logits, mean over boxes and classes, in float32.

    ``targets`` (K, C) multi-hot (or soft) in [0, 1]; a row of zeros is a box with no action of the model's classes.
    With no box at all (K = 0) the loss is a zero that still depends on ``logits``: backward then runs through the
    same parameters as on any other step, which data-parallel gradient reduction needs."""
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape")
    logits = logits.float()
    if logits.numel() == 0:
        return logits.sum()
    return F.binary_cross_entropy_with_logits(logits, targets.float())


# ---- initial weights -------------------------------------------------------------------------------------------


def load_encoder_weights(model: ActionDetector, checkpoint: Mapping, *,
                         norm_from_fc_norm: bool = False) -> EncoderLoadReport:
    """Initialise ``model.encoder`` with ``models.convert.load_into_encoder`` (its rules and its choice of the final
    norm); the detector's ``head.*`` stays as it is (fresh). Returns the report under the detector's names (dropped
    keys under the checkpoint's)."""
    inner = load_into_encoder(model.encoder, checkpoint, norm_from_fc_norm=norm_from_fc_norm)
    report = EncoderLoadReport(loaded=[f"encoder.{k}" for k in inner.loaded], dropped=list(inner.dropped),
                               resampled=[f"encoder.{k}" for k in inner.resampled], norm_source=inner.norm_source)
    report.fresh = sorted(k for k in model.state_dict() if k not in report.loaded)
    return report
