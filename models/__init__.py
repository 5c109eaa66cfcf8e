"""Single-device model code: the video ViT family, position embeddings, masks, VideoMAE and conversions.

Nothing in this package knows about processes, devices or precision.
"""

from models.videomae import PretrainModelConfig, VideoMAE
from models.vit import ClassifierConfig, VisionTransformer, ViTConfig, build_classifier

__all__ = [
    "ClassifierConfig",
    "PretrainModelConfig",
    "ViTConfig",
    "VideoMAE",
    "VisionTransformer",
    "build_classifier",
]
