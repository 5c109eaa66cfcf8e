"""HOG targets: our device HOG against scikit-image's on real photographs, MaskFeat's variant against its
definition, and the per-token arrangement the decoder predicts."""

import math

import numpy as np
import pytest
import torch

from models.hog import HOGConfig, hog
from models.videomae import PretrainModelConfig, TargetConfig, VideoMAE
from models.vit import ViTConfig

skimage = pytest.importorskip("skimage")
from skimage import data as skimage_data  # noqa: E402
from skimage.feature import hog as skimage_hog  # noqa: E402

# scikit-image's parameters for the same definition: 9 unsigned bins, 8×8 cells, one cell per block (each cell's
# histogram normalized by itself), L2; its gradient is the central difference, zero on the border rows / columns.
SKIMAGE = dict(orientations=9, pixels_per_cell=(8, 8), cells_per_block=(1, 1), block_norm="L2", feature_vector=False)
CENTRAL = HOGConfig(gradient="central", gaussian_window=0)


def ours(image: np.ndarray, cfg: HOGConfig = CENTRAL) -> np.ndarray:
    """(H, W) float image → (H/8, W/8, 9), scikit-image's layout."""
    frames = torch.from_numpy(image).float()[None, None]
    return hog(frames, cfg)[0, 0].permute(1, 2, 0).numpy()


def theirs(image: np.ndarray) -> np.ndarray:
    return skimage_hog(image, **SKIMAGE)[:, :, 0, 0, :]


@pytest.mark.parametrize("name", ["camera", "astronaut", "coffee"])
def test_our_hog_is_scikit_images_on_photographs(name):
    """Per channel: scikit-image takes, per pixel, the channel of largest gradient, MaskFeat keeps every channel, so
    each channel is compared as a grey image. The same numbers up to float32 (we compute in float32, scikit-image in
    float64), the astronaut's near-flat dark cells included."""
    image = getattr(skimage_data, name)().astype(np.float64) / 255
    channels = [image] if image.ndim == 2 else [image[..., k] for k in range(3)]
    for channel in channels:
        channel = channel[: channel.shape[0] // 8 * 8, : channel.shape[1] // 8 * 8]
        a, b = ours(channel), theirs(channel)
        assert a.shape == b.shape and np.abs(b).max() > 0.5
        np.testing.assert_allclose(a, b, atol=2e-4)


def test_maskfeat_variant_follows_its_definition():
    """Sobel gradients, magnitudes weighted by a tiled 16×16 Gaussian, hard unsigned bins, means over 8×8 cells,
    L2 per cell and channel: recomputed here pixel by pixel."""
    rng = np.random.default_rng(0)
    frame = rng.random((2, 16, 16))
    cfg = HOGConfig()
    out = hog(torch.from_numpy(frame)[None].float(), cfg)[0].double().numpy()  # (2, 9, 2, 2)
    padded = np.pad(frame, ((0, 0), (1, 1), (1, 1)), mode="reflect")
    g = np.exp(-0.5 * ((np.arange(16) - 7.5) / 8) ** 2)
    window = np.outer(g, g) / np.outer(g, g).mean()
    for c in range(2):
        hist = np.zeros((9, 2, 2))
        for y in range(16):
            for x in range(16):
                q = padded[c, y:y + 3, x:x + 3]  # Sobel: right minus left column, bottom minus top row, (1, 2, 1)
                gx = (q[0, 2] - q[0, 0]) + 2 * (q[1, 2] - q[1, 0]) + (q[2, 2] - q[2, 0])
                gy = (q[2, 0] - q[0, 0]) + 2 * (q[2, 1] - q[0, 1]) + (q[2, 2] - q[0, 2])
                angle = math.atan2(gy, gx) % math.pi
                hist[min(int(angle / math.pi * 9), 8), y // 8, x // 8] += math.hypot(gx, gy) * window[y, x]
        hist /= 64  # cell means
        hist /= np.sqrt((hist**2).sum(axis=0, keepdims=True) + 1e-10)
        np.testing.assert_allclose(out[c], hist, rtol=1e-4, atol=1e-5)


def test_hog_targets_are_each_tokens_cells_in_order():
    encoder = ViTConfig(arch="vit_debug", num_frames=4, img_size=32, patch_size=16, tubelet_size=2)
    for frames, per_frame in (("tubelet", 2), ("first", 1)):
        model = VideoMAE(PretrainModelConfig(encoder, target=TargetConfig(kind="hog", frames=frames)))
        video = torch.randn(2, 3, 4, 32, 32)
        targets = model.targets(video)  # (B, N, frames · 2·2 cells · C · 9)
        assert targets.shape == (2, 2 * 2 * 2, per_frame * 4 * 3 * 9)
        assert model.decoder.head.out_features == targets.shape[-1]
        pixels = model.pixels(video)
        t, y, x = 1, 0, 1  # token (t, y, x) of the (2, 2, 2) grid
        token = t * 4 + y * 2 + x
        for f in range(per_frame):
            frame = pixels[:, :, t * 2 + f]  # (B, C, H, W)
            cells = hog(frame, model.cfg.target.hog)[:, :, :, 2 * y:2 * y + 2, 2 * x:2 * x + 2]  # (B, C, 9, 2, 2)
            expected = cells.permute(0, 3, 4, 1, 2).reshape(2, -1)  # (cy, cx, C, bins)
            got = targets[:, token].reshape(2, per_frame, -1)[:, f]
            torch.testing.assert_close(got, expected)


def test_a_hog_model_scores_the_histograms_of_the_hidden_tokens():
    """The loss is the MSE between the decoder's output and the HOG targets of exactly the hidden tokens, and the
    gradient reaches the encoder."""
    from models.masking import MaskConfig, build_mask_generator

    encoder = ViTConfig(arch="vit_debug", num_frames=4, img_size=32, patch_size=16, tubelet_size=2)
    torch.manual_seed(0)
    model = VideoMAE(PretrainModelConfig(encoder, target=TargetConfig(kind="hog", frames="first")))
    video = torch.randn(2, 3, 4, 32, 32)
    mask, _ = build_mask_generator(MaskConfig(kind="random", ratio=0.75), encoder.grid)(2, torch.device("cpu"),
                                                                                      torch.Generator())
    loss, pred, _ = model(video, mask)
    targets = model.targets(video)[mask].reshape(2, -1, 4 * 3 * 9)
    torch.testing.assert_close(loss, ((pred - targets) ** 2).mean())
    loss.backward()
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="whole cells in a patch"):
        PretrainModelConfig(ViTConfig(arch="vit_debug", patch_size=12, img_size=48),
                            target=TargetConfig(kind="hog"))
