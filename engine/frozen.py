"""Frozen, exported models that a task runs in front of (or beside) the one it trains: a trained tokenizer, the
frozen encoder of a probe. Each loads from what another run exported, in eval mode, without gradients; a file
that does not hold what was asked for is a one-line ``ConfigError`` naming the setting that gave it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from engine import checkpoint
from engine.config import ConfigError, load_config
from models.convert import unwrap_state_dict
from models.probe import FeatureEncoder
from models.tokenizer import TokenizerConfig, VQTokenizer
from models.vit import ViTConfig

log = logging.getLogger("train")


def load_tokenizer(cfg: TokenizerConfig, path: str) -> VQTokenizer:
    """A trained tokenizer from its export, frozen (eval mode, no gradients)."""
    model = VQTokenizer(cfg)
    try:
        model.load_state_dict(checkpoint.load_weights(path))
    except RuntimeError as err:
        raise ConfigError(f"{path} does not hold a tokenizer of {cfg}: {' '.join(str(err).split())}") from None
    return model.eval().requires_grad_(False)


def load_trained_tokenizer(path: str, setting: str = "model.target.tokenizer") -> VQTokenizer:
    """The tokenizer a ``run_scripts/tokenizer.py`` run exported to ``path`` (its weights.pt), built with the
    architecture of the run's config.yaml beside it, frozen. ``setting``: the config key that gave ``path``."""
    config = Path(path).parent / "config.yaml"
    if not Path(path).is_file() or not config.is_file():
        raise ConfigError(f"{setting}={path}: expected the weights.pt of a run_scripts/tokenizer.py run, with "
                          f"its config.yaml beside it")
    # the run's model section alone: the architecture, whatever the tokenizer run's other settings were
    try:
        run_config = yaml.safe_load(config.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{setting}={path}: {config} is not valid yaml: {' '.join(str(err).split())}") from None
    section = run_config.get("model") if isinstance(run_config, dict) else None
    if not isinstance(section, dict):
        raise ConfigError(f"{setting}={path}: {config} has no model section: not the config of a "
                          "run_scripts/tokenizer.py run")
    try:
        return load_tokenizer(load_config(TokenizerConfig, section), path)
    except ConfigError as err:
        raise ConfigError(f"{setting}={path}: the model section of {config}: {err}") from None


@dataclass
class ProbeModelConfig:
    """The ``model`` section of a frozen-encoder evaluation (linear, k-NN, attentive probes)."""

    encoder: ViTConfig = field(default_factory=ViTConfig)  # the frozen encoder: its geometry must be the checkpoint's
    num_classes: int = 400  # classes of the probes
    # the encoder's weights: our pre-training export or step directory, a fine-tuned checkpoint, an official
    # VideoMAE / V2 release or a Hugging Face VideoMAE checkpoint; "" = the encoder at random initialisation
    # (a baseline: what the probe reads out of the architecture alone)
    init: str = ""
    # an encoder over tokenizer codes (VIMPAC): the weights.pt of the tokenizer it was pre-trained on; "" = pixels
    tokenizer: str = ""


_ENCODER_KEYS = ("patch_embed.proj.weight", "videomae.embeddings.patch_embeddings.projection.weight",
                 "token_embed.weight")


def build_feature_encoder(model: ProbeModelConfig, last_k: int) -> FeatureEncoder:
    """The frozen encoder with the weights of ``model.init`` (eval mode, no gradients), or at random initialisation
    when it is empty. A checkpoint holding no encoder, or one of another geometry, is the user's mistake."""
    tokenizer = load_trained_tokenizer(model.tokenizer, "model.tokenizer") if model.tokenizer else None
    encoder = FeatureEncoder(model.encoder, last_k, tokenizer)
    if model.init:
        weights = unwrap_state_dict(checkpoint.read_checkpoint(model.init))
        if not any(key.endswith(_ENCODER_KEYS) for key in weights):
            shown = ", ".join(sorted(weights)[:6]) + (", ..." if len(weights) > 6 else "")
            raise ConfigError(f"{model.init} holds no video ViT encoder (no patch embedding among its "
                              f"{len(weights)} tensors: {shown})")
        try:
            report = encoder.load(weights)
        except (ValueError, KeyError) as err:
            raise ConfigError(f"{model.init} does not fit model.encoder ({model.encoder.arch}, "
                              f"{model.encoder.num_frames}x{model.encoder.img_size}², patch "
                              f"{model.encoder.tubelet_size}x{model.encoder.patch_size}²): {err}") from None
        log.info("frozen encoder from %s: %s", model.init, report)
    else:
        log.warning("model.init is empty: probing the encoder at random initialisation")
    return encoder.eval().requires_grad_(False)
