"""Spatial augmentation of video clips: uint8 in, uint8 out, the same random parameters on every frame.

A clip is a uint8 tensor of shape (T, C, H, W) with C = 3 (RGB), torchvision's layout for a batch of
images. Mean/std normalization is not done here: it happens later, on the device, on the whole batch.

Randomness comes only from the ``rng: random.Random`` argument, so a clip is reproducible from a seed.
Each random transform has a ``*_params`` function that draws its parameters from the rng and that the
transform itself uses: the parameters are drawn once per clip and applied to every frame, and tests
(or a visualizer) can see what was drawn. The one exception to "only the rng" is timm's RandAugment,
which draws from the global ``random`` and ``numpy.random``: :func:`rand_augment` seeds both from the rng
and restores their previous state afterwards.

Pipelines (:class:`AugmentConfig`, :func:`build_transform`, :func:`build_eval_views`) follow the
reference recipes:

* VideoMAE pre-training: multi-scale crop (TSN's GroupMultiScaleCrop) to 224, no flip;
* MAE-ST pre-training: random resized crop with area scale (0.5, 1) and flip;
* VideoMAE fine-tuning: RandAugment on the full frames, random resized crop with scale (0.08, 1), flip
  (not for SSv2), random erasing;
* testing: short side resized, then a centre crop or three crops along the long side.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple, Optional

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

# The normalization applied later on the device; needed here only to fill like VideoMAE does.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Clip = torch.Tensor  # uint8, (T, C, H, W)


class CropBox(NamedTuple):
    """A rectangle in pixel coordinates of a frame: rows [top, top + height), columns [left, left + width)."""

    top: int
    left: int
    height: int
    width: int


def _check_clip(clip: Clip) -> None:
    if clip.dtype != torch.uint8 or clip.ndim != 4:
        raise ValueError(f"expected a uint8 clip of shape (T, C, H, W), got {clip.dtype} {tuple(clip.shape)}")


def crop_and_resize(clip: Clip, box: CropBox, size: int) -> Clip:
    """Crop ``box`` from every frame and resize it to ``size`` x ``size`` (bilinear, antialiased).

    (T, C, H, W) -> (T, C, size, size).
    """
    return F.resized_crop(clip, box.top, box.left, box.height, box.width, [size, size],
                          interpolation=InterpolationMode.BILINEAR, antialias=True)


# --------------------------------------------------------------------------
# Multi-scale crop (VideoMAE pre-training)
# --------------------------------------------------------------------------


def _multi_scale_sides(base: int, size: int, scales: tuple[float, ...]) -> list[int]:
    """Candidate crop sides ``int(base * scale)``, snapped to ``size`` when within 2 px of it.

    The snap is GroupMultiScaleCrop's: a crop a pixel or two off the output size is taken at exactly
    that size so the final resize is the identity rather than a blur.
    """
    sides = [int(base * scale) for scale in scales]
    return [size if abs(side - size) < 3 else side for side in sides]


def _multi_scale_pairs(base: int, size: int, scales: tuple[float, ...],
                       max_distort: int) -> list[tuple[int, int]]:
    """All (crop_h, crop_w) whose scale indices differ by at most ``max_distort`` (bounds the distortion)."""
    sides = _multi_scale_sides(base, size, scales)
    return [(crop_h, crop_w)
            for i, crop_h in enumerate(sides)
            for j, crop_w in enumerate(sides)
            if abs(i - j) <= max_distort]


def fixed_crop_offsets(height: int, width: int, crop_h: int, crop_w: int,
                       more_fix_crop: bool = True) -> list[tuple[int, int]]:
    """(top, left) of the fixed crop grid: 4 corners and centre, plus 8 more positions with ``more_fix_crop``.

    The grid steps by a quarter of the free room, ``(height - crop_h) // 4``, so positions are multiples
    of the step (the bottom/right ones may stop up to 3 px short of the border, as in TSN).
    """
    step_h = (height - crop_h) // 4
    step_w = (width - crop_w) // 4
    grid = [(0, 0), (0, 4), (4, 0), (4, 4), (2, 2)]  # in steps (row, column): corners, then centre
    if more_fix_crop:
        grid += [(2, 0), (2, 4), (4, 2), (0, 2),  # middle of each edge
                 (1, 1), (1, 3), (3, 1), (3, 3)]  # quarter points
    return [(row * step_h, column * step_w) for row, column in grid]


def multi_scale_crop_params(height: int, width: int, size: int, rng: random.Random,
                            scales: tuple[float, ...] = (1, .875, .75, .66), max_distort: int = 1,
                            fix_crop: bool = True, more_fix_crop: bool = True) -> CropBox:
    """Draw a GroupMultiScaleCrop box for a ``height`` x ``width`` frame.

    Crop height and width are each ``short_side * scale`` for scales whose indices differ by at most
    ``max_distort``; the position is one of the fixed grid (``fix_crop``) or uniform. A snapped side
    larger than the frame (a frame up to 2 px smaller than ``size``) is clamped to the frame.
    """
    pairs = _multi_scale_pairs(min(height, width), size, tuple(scales), max_distort)
    crop_h, crop_w = rng.choice(pairs)
    crop_h, crop_w = min(crop_h, height), min(crop_w, width)
    if fix_crop:
        top, left = rng.choice(fixed_crop_offsets(height, width, crop_h, crop_w, more_fix_crop))
    else:
        top, left = rng.randint(0, height - crop_h), rng.randint(0, width - crop_w)
    return CropBox(top, left, crop_h, crop_w)


def multi_scale_crop(clip: Clip, size: int, rng: random.Random, scales: tuple[float, ...] = (1, .875, .75, .66),
                     max_distort: int = 1, fix_crop: bool = True, more_fix_crop: bool = True) -> Clip:
    """VideoMAE's multi-scale crop, then resize to ``size`` x ``size``. (T, C, H, W) -> (T, C, size, size)."""
    _check_clip(clip)
    box = multi_scale_crop_params(clip.shape[-2], clip.shape[-1], size, rng, scales, max_distort,
                                  fix_crop, more_fix_crop)
    return crop_and_resize(clip, box, size)


# --------------------------------------------------------------------------
# Random resized crop and flip (MAE-ST pre-training, fine-tuning)
# --------------------------------------------------------------------------


def _sample_box_shape(area: float, rng: random.Random, scale: tuple[float, float],
                      ratio: tuple[float, float]) -> tuple[int, int]:
    """(height, width) of a box covering ``scale`` of ``area`` with aspect ``width / height`` in ``ratio``.

    The aspect is log-uniform so that r and 1/r are equally likely.
    """
    target_area = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    width = int(round(math.sqrt(target_area * aspect)))
    height = int(round(math.sqrt(target_area / aspect)))
    return height, width


def _central_box(height: int, width: int, ratio: tuple[float, float]) -> CropBox:
    """The largest centred box with its aspect clamped into ``ratio`` (the fallback of RandomResizedCrop)."""
    aspect = width / height
    if aspect < min(ratio):
        box_w, box_h = width, int(round(width / min(ratio)))
    elif aspect > max(ratio):
        box_h, box_w = height, int(round(height * max(ratio)))
    else:
        box_h, box_w = height, width
    return CropBox((height - box_h) // 2, (width - box_w) // 2, box_h, box_w)


def random_resized_crop_params(height: int, width: int, rng: random.Random,
                               scale: tuple[float, float] = (0.5, 1.0),
                               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> CropBox:
    """Draw an Inception-style crop box: area fraction uniform in ``scale``, aspect log-uniform in ``ratio``.

    Up to 10 draws are tried for a box that fits the frame, then a centre crop is used (torchvision's
    RandomResizedCrop algorithm, drawing from ``rng``).
    """
    for _ in range(10):
        box_h, box_w = _sample_box_shape(height * width, rng, scale, ratio)
        if 0 < box_h <= height and 0 < box_w <= width:
            return CropBox(rng.randint(0, height - box_h), rng.randint(0, width - box_w), box_h, box_w)
    return _central_box(height, width, ratio)


def random_resized_crop(clip: Clip, size: int, rng: random.Random, scale: tuple[float, float] = (0.5, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Clip:
    """Random resized crop of the whole clip. (T, C, H, W) -> (T, C, size, size).

    MAE-ST pre-trains with ``scale=(0.5, 1)``; fine-tuning uses ``(0.08, 1)``.
    """
    _check_clip(clip)
    box = random_resized_crop_params(clip.shape[-2], clip.shape[-1], rng, scale, ratio)
    return crop_and_resize(clip, box, size)


def horizontal_flip(clip: Clip, rng: random.Random, p: float = 0.5) -> Clip:
    """Mirror every frame left-right with probability ``p``. Shape unchanged."""
    _check_clip(clip)
    return clip.flip(-1) if rng.random() < p else clip


# --------------------------------------------------------------------------
# RandAugment (fine-tuning), through timm
# --------------------------------------------------------------------------

_PIL_INTERPOLATION = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@functools.lru_cache(maxsize=16)
def _timm_rand_augment(config_str: str, translate_const: int,
                       interpolation: str) -> Callable[[Image.Image], Image.Image]:
    """timm's RandAugment for ``config_str``; cached because building it creates ~15 op objects per call."""
    from timm.data.auto_augment import rand_augment_transform  # timm is only needed when RandAugment is on

    hparams = {
        "translate_const": translate_const,
        # fill of the area that geometric ops uncover: the dataset mean, which normalizes to 0
        "img_mean": tuple(round(255 * m) for m in IMAGENET_MEAN),
        # one fixed filter: a random choice per op would be one more draw to keep in step across frames
        "interpolation": _PIL_INTERPOLATION[interpolation],
    }
    return rand_augment_transform(config_str, hparams)


def _to_pil(frame: torch.Tensor) -> Image.Image:
    """(C, H, W) uint8 tensor -> RGB PIL image."""
    return Image.fromarray(frame.permute(1, 2, 0).contiguous().numpy())


def _from_pil(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (C, H, W) uint8 tensor."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def rand_augment(clip: Clip, rng: random.Random, config_str: str = "rand-m7-n4-mstd0.5-inc1",
                 translate_const: Optional[int] = None, interpolation: str = "bicubic") -> Clip:
    """timm RandAugment with the same ops and magnitudes on every frame. Shape unchanged.

    timm draws everything from global state: which ops (``numpy.random.choice``), whether each op fires,
    its magnitude and its sign (``random``). Reseeding both generators with one seed (drawn from ``rng``)
    before each frame makes every frame replay exactly the same draws, because none of them depends on
    the pixels. The previous global states are restored afterwards, so callers' randomness is untouched.

    ``translate_const`` is the largest translation in pixels (default: 45% of the frame's short side;
    VideoMAE uses 45% of the crop size). Ops such as Equalize and AutoContrast still compute their
    lookup table from each frame's own histogram, as in VideoMAE: frames that differ may be remapped
    differently, identical frames stay identical.
    """
    _check_clip(clip)
    if translate_const is None:
        translate_const = int(0.45 * min(clip.shape[-2:]))
    transform = _timm_rand_augment(config_str, translate_const, interpolation)
    seed = rng.getrandbits(32)  # numpy seeds must fit in 32 bits
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        frames = []
        for frame in clip:
            random.seed(seed)
            np.random.seed(seed)
            frames.append(_from_pil(transform(_to_pil(frame))))
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return torch.stack(frames)


# --------------------------------------------------------------------------
# Random erasing (fine-tuning)
# --------------------------------------------------------------------------


def random_erasing_params(height: int, width: int, rng: random.Random, p: float = 0.25,
                          scale: tuple[float, float] = (0.02, 1 / 3),
                          ratio: tuple[float, float] = (0.3, 3.3)) -> Optional[CropBox]:
    """Draw the box to erase, or None (with probability ``1 - p``, or when 10 draws found no fitting box).

    timm's RandomErasing rule: area fraction uniform in ``scale``, aspect (height / width) log-uniform
    in ``ratio``, and the box strictly smaller than the frame.
    """
    if rng.random() >= p:
        return None
    for _ in range(10):
        box_w, box_h = _sample_box_shape(height * width, rng, scale, ratio)  # timm's aspect is h / w
        if 0 < box_h < height and 0 < box_w < width:
            return CropBox(rng.randint(0, height - box_h), rng.randint(0, width - box_w), box_h, box_w)
    return None


def _erase_fill(shape: tuple[int, int, int], mode: str, generator: torch.Generator,
                mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 fill of shape (C, h, w): what timm's fill after normalization looks like before it.

    timm fills normalized frames with N(0, 1) per pixel ("pixel"), one N(0, 1) per channel ("rand") or 0
    ("const"); mapping that through the inverse normalization, ``255 * (mean + std * z)``, gives the same
    pixels up to rounding and clipping to [0, 255] (which cuts the tails beyond about 2 sigma: 3-4% of
    the "pixel" samples).
    """
    channels = shape[0]
    if mode == "pixel":
        z = torch.randn(shape, generator=generator)
    elif mode == "rand":
        z = torch.randn((channels, 1, 1), generator=generator).expand(shape)
    elif mode == "const":
        z = torch.zeros(shape)
    else:
        raise ValueError(f"mode must be 'pixel', 'rand' or 'const', got {mode!r}")
    mean_t = torch.tensor(mean).view(-1, 1, 1)
    std_t = torch.tensor(std).view(-1, 1, 1)
    return (255 * (mean_t + std_t * z)).round().clamp(0, 255).to(torch.uint8)


def random_erasing(clip: Clip, rng: random.Random, p: float = 0.25, scale: tuple[float, float] = (0.02, 1 / 3),
                   ratio: tuple[float, float] = (0.3, 3.3), mode: str = "pixel",
                   mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> Clip:
    """Erase one random box through the whole clip (the same box and the same fill on every frame).

    Shape unchanged; the input is not modified. VideoMAE erases after normalization, with N(0, 1)
    noise; we erase the uint8 frames before it with ``255 * (mean + std * N(0, 1))``, which is the same
    fill once normalized, up to rounding and clipping (see :func:`_erase_fill`). ``mean``/``std`` must be the
    normalization applied later. (VideoMAE's timm RandomErasing, given a (T, C, H, W) tensor, treats T as
    a batch and erases an independent box per frame; here the box is a tube through time.)
    """
    _check_clip(clip)
    box = random_erasing_params(clip.shape[-2], clip.shape[-1], rng, p, scale, ratio)
    if box is None:
        return clip
    generator = torch.Generator().manual_seed(rng.getrandbits(63))  # the noise, too, comes from rng
    fill = _erase_fill((clip.shape[1], box.height, box.width), mode, generator, mean, std)
    erased = clip.clone()
    erased[:, :, box.top:box.top + box.height, box.left:box.left + box.width] = fill  # broadcast over T
    return erased


# --------------------------------------------------------------------------
# Evaluation views
# --------------------------------------------------------------------------


def resize_short_side(clip: Clip, size: int) -> Clip:
    """Resize every frame so its short side is ``size``, keeping the aspect (bilinear, antialiased).

    (T, C, H, W) -> (T, C, H', W') with min(H', W') = size.
    """
    _check_clip(clip)
    return F.resize(clip, size, interpolation=InterpolationMode.BILINEAR, antialias=True)


def _check_fits(clip: Clip, size: int) -> None:
    if size > min(clip.shape[-2:]):
        raise ValueError(f"crop of {size} px does not fit frames of {tuple(clip.shape[-2:])}; resize first")


def _crop(clip: Clip, box: CropBox) -> Clip:
    return clip[:, :, box.top:box.top + box.height, box.left:box.left + box.width]


def center_crop(clip: Clip, size: int) -> Clip:
    """The centred ``size`` x ``size`` crop. (T, C, H, W) -> (T, C, size, size)."""
    _check_clip(clip)
    _check_fits(clip, size)
    return _crop(clip, three_crop_boxes(clip.shape[-2], clip.shape[-1], size)[1])


def three_crop_boxes(height: int, width: int, size: int) -> list[CropBox]:
    """Three ``size`` x ``size`` boxes along the long side: start, centre, end; centred on the short side.

    Left/centre/right for landscape frames, top/centre/bottom for portrait ones (SlowFast's uniform
    crop); a square frame counts as landscape.
    """
    if height > width:
        left = (width - size) // 2
        return [CropBox(top, left, size, size) for top in (0, (height - size) // 2, height - size)]
    top = (height - size) // 2
    return [CropBox(top, left, size, size) for left in (0, (width - size) // 2, width - size)]


def three_crops(clip: Clip, size: int) -> list[Clip]:
    """The 3-crop test views (see :func:`three_crop_boxes`). (T, C, H, W) -> 3 x (T, C, size, size)."""
    _check_clip(clip)
    _check_fits(clip, size)
    return [_crop(clip, box) for box in three_crop_boxes(clip.shape[-2], clip.shape[-1], size)]


# --------------------------------------------------------------------------
# Pipelines from a config
# --------------------------------------------------------------------------

AugmentKind = Literal["multi_scale", "random_resized", "finetune", "center", "eval"]


@dataclass
class AugmentConfig:
    """Which augmentation a dataset applies to its uint8 clips."""

    # pipeline: VideoMAE pre-training, MAE-ST pre-training, VideoMAE fine-tuning, short side resized to the input size
    # then the centre crop (VIMPAC pre-training: no spatial augmentation), or test views
    kind: AugmentKind = "multi_scale"
    # eval: short side frames are resized to before cropping (VideoMAE: 256 for 1 view, = size for 3 views)
    short_side: int = 256
    # random horizontal flip (p = 0.5); off for SSv2, whose labels say left/right, and VideoMAE pre-training
    flip: bool = True
    # random_resized/finetune: range of the crop's area fraction (MAE-ST pre-training 0.5-1, fine-tuning 0.08-1)
    rrc_scale: tuple[float, float] = (0.5, 1.0)
    # finetune: timm RandAugment config string (VideoMAE: "rand-m7-n4-mstd0.5-inc1"); None = off
    rand_augment: Optional[str] = None
    # finetune: probability of erasing one random box through the whole clip (VideoMAE: 0.25); 0 = off
    erase_prob: float = 0.0
    # eval: 1 = centre crop, 3 = three crops along the long side
    num_spatial_views: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("multi_scale", "random_resized", "finetune", "center", "eval"):
            raise ValueError(f"kind must be multi_scale, random_resized, finetune, center or eval, got {self.kind!r}")
        if not 0 < self.rrc_scale[0] <= self.rrc_scale[1] <= 1:
            raise ValueError(f"rrc_scale must satisfy 0 < lo <= hi <= 1, got {self.rrc_scale}")
        if not 0 <= self.erase_prob <= 1:
            raise ValueError(f"erase_prob must be in [0, 1], got {self.erase_prob}")
        if self.num_spatial_views not in (1, 3):
            raise ValueError(f"num_spatial_views must be 1 or 3, got {self.num_spatial_views}")
        # Pre-training recipes have no RandAugment or erasing: asking for them there is a recipe mistake.
        if self.kind in ("multi_scale", "random_resized", "center") and (self.rand_augment or self.erase_prob > 0):
            raise ValueError(f"rand_augment and erase_prob are fine-tuning options, not for kind={self.kind!r}")


Transform = Callable[[Clip, random.Random], Clip]


@dataclass(frozen=True)
class Compose:
    """Apply ``steps`` in order, each called as ``step(clip, rng=rng)``, all drawing from the same rng.

    Steps are ``functools.partial`` of module functions, so a pipeline pickles into DataLoader workers
    under any start method (a closure would not under "spawn").
    """

    steps: tuple[Callable[..., Clip], ...]

    def __call__(self, clip: Clip, rng: random.Random) -> Clip:
        for step in self.steps:
            clip = step(clip, rng=rng)
        return clip


def build_transform(cfg: AugmentConfig, size: int) -> Transform:
    """The training pipeline ``(clip, rng) -> clip`` for ``cfg``: uint8 (T, C, H, W) -> (T, C, size, size).

    ``size`` is the model's input side (``ViTConfig.img_size``), the one owner of the clip geometry.

    Steps draw from the rng in a fixed order, so a seed determines the whole augmentation.
    """
    partial = functools.partial
    steps = []
    if cfg.kind == "multi_scale":
        steps.append(partial(multi_scale_crop, size=size))
    elif cfg.kind == "random_resized":
        steps.append(partial(random_resized_crop, size=size, scale=cfg.rrc_scale))
    elif cfg.kind == "finetune":
        if cfg.rand_augment:
            # Before the crop, on the full frames, as VideoMAE does; translations scale with the crop size.
            translate = int(0.45 * size)
            steps.append(partial(rand_augment, config_str=cfg.rand_augment, translate_const=translate))
        steps.append(partial(random_resized_crop, size=size, scale=cfg.rrc_scale))
    elif cfg.kind == "center":
        steps.append(partial(resized_center_crop, size=size))
    else:
        raise ValueError("kind='eval' has no random transform: use build_eval_views")
    if cfg.flip:
        steps.append(horizontal_flip)
    if cfg.erase_prob > 0:
        steps.append(partial(random_erasing, p=cfg.erase_prob))
    return Compose(tuple(steps))


def resized_center_crop(clip: Clip, rng: random.Random, size: int) -> Clip:
    """The short side resized to ``size``, then the centred square: the same for every draw (``rng`` unused)."""
    return center_crop(resize_short_side(clip, size), size)


def eval_views(clip: Clip, short_side: int, size: int, num_spatial_views: int) -> list[Clip]:
    """Resize the short side to ``short_side``, then take 1 centre crop or 3 crops of ``size``.

    uint8 (T, C, H, W) -> ``num_spatial_views`` clips of (T, C, size, size).
    """
    resized = resize_short_side(clip, short_side)
    if num_spatial_views == 3:
        return three_crops(resized, size)
    return [center_crop(resized, size)]


def build_eval_views(cfg: AugmentConfig, size: int) -> Callable[[Clip], list[Clip]]:
    """The test pipeline ``clip -> views`` for ``cfg`` (see :func:`eval_views`); picklable."""
    if cfg.short_side < size:
        raise ValueError(f"eval crops need short_side >= size, got {cfg.short_side} < {size}")
    return functools.partial(eval_views, short_side=cfg.short_side, size=size,
                             num_spatial_views=cfg.num_spatial_views)
