"""Checkpoint conversion between our parameter names, official VideoMAE releases and Hugging Face VideoMAE.

Our names are those of the official MCG-NJU release (see ``models/vit.py`` and ``models/videomae.py``), so
official checkpoints need little more than unwrapping and prefix handling. Hugging Face ``transformers``
stores separate q/k/v projections and its own module names; ``hf_to_ours`` / ``ours_to_hf`` translate
between the two layouts. Every function raises on keys it does not recognise instead of passing them on,
so a checkpoint from another architecture fails loudly here rather than half-loading later.

Position tables never need converting: the sin-cos tables of both layouts are fixed and not stored.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

StateDict = dict[str, torch.Tensor]
HFNaming = Literal["v4", "v5"]

# Checkpoint containers, tried in this order, and the prefixes that training wrappers add to every key.
CONTAINER_KEYS = ("model", "module", "model_state", "state_dict")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP / DeepSpeed, torch.compile


def _installed_hf_naming() -> HFNaming:
    """The q/v bias naming of the installed transformers (v5 when it is not installed)."""
    try:
        major = int(importlib.metadata.version("transformers").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return "v5"
    return "v4" if major < 5 else "v5"


DEFAULT_HF_NAMING: HFNaming = _installed_hf_naming()


@dataclass
class ConversionReport:
    """What a conversion did besides copying keys unchanged."""

    dropped: list[str] = field(default_factory=list)  # source keys left out on purpose
    renamed: int = 0  # kept keys whose name changed (wrapper prefixes such as ``module.`` not counted)


def _raise_unrecognised(keys: Iterable[str], what: str) -> None:
    keys = sorted(keys)
    if keys:
        shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
        raise ValueError(f"unrecognised keys in {what}: {shown}")


def _put(out: StateDict, key: str, value: torch.Tensor, source: str) -> None:
    """Insert ``key``, refusing to overwrite: two source keys mapping to one target is a naming clash."""
    if key in out:
        raise ValueError(f"two source keys map to {key!r} (the second is {source!r})")
    out[key] = value


# ---- unwrapping ------------------------------------------------------------------------------------------------


def _strip_wrappers(key: str) -> str:
    # Wrappers can nest in either order (a compiled model inside DDP, or the reverse).
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def unwrap_state_dict(obj: Mapping) -> StateDict:
    """The tensor state dict inside a checkpoint, with wrapper prefixes removed.

    ``obj`` is a state dict or a checkpoint dict holding one under ``model``, ``module``, ``model_state`` or
    ``state_dict`` (nested containers are followed). ``module.`` (DataParallel/DDP/DeepSpeed) and
    ``_orig_mod.`` (torch.compile) prefixes are stripped from every key.
    """
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a state dict or checkpoint dict, got {type(obj).__name__}")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            f"no state dict found: entries {sorted(map(str, not_tensors))[:10]} are not tensors and none of "
            f"{CONTAINER_KEYS} holds a dict"
        )
    out: StateDict = {}
    for key, value in obj.items():
        _put(out, _strip_wrappers(key), value, key)
    return out


# ---- official VideoMAE / VideoMAE V2 ---------------------------------------------------------------------------

# Official parameter names (ours), as regular expressions matched against whole keys.
_BLOCK_PARAM = (
    r"blocks\.\d+\.(?:(?:norm1|norm2|attn\.proj|mlp\.fc1|mlp\.fc2)\.(?:weight|bias)"
    r"|attn\.qkv\.weight|attn\.q_bias|attn\.v_bias|gamma_1|gamma_2)"
)
# Our own additions to the official layout: learnable separable (MAE-ST) or factorized (VIMPAC) position tables, a cls
# token, and the code embedding and its norm of a transformer over tokenizer codes (models.vimpac.TokenViT).
_OWN_EMBEDDINGS = (r"cls_token|pos_embed\.(?:spatial|temporal|height|width|cls)|token_embed\.weight"
                   r"|embed_norm\.(?:weight|bias)")
# VIMPAC's "T,H|W" layers (models.vimpac.FactorizedBlock): attention along time, then along height and width, then MLP.
_FACTORIZED_BLOCK_PARAM = (
    r"blocks\.\d+\.(?:(?:time|space)\.(?:proj\.(?:weight|bias)|qkv\.weight|q_bias|v_bias)"
    r"|(?:norm_time|norm_space|norm_mlp|mlp\.fc1|mlp\.fc2)\.(?:weight|bias))"
)
_CLASSIFIER_KEY = re.compile(
    rf"patch_embed\.proj\.(?:weight|bias)|{_BLOCK_PARAM}|{_FACTORIZED_BLOCK_PARAM}"
    rf"|(?:norm|fc_norm|head)\.(?:weight|bias)|{_OWN_EMBEDDINGS}"
)
_PRETRAIN_KEY = re.compile(
    rf"encoder\.(?:patch_embed\.proj\.(?:weight|bias)|{_BLOCK_PARAM}|norm\.(?:weight|bias)|{_OWN_EMBEDDINGS})"
    rf"|encoder_to_decoder\.weight|mask_token|decoder\.(?:{_BLOCK_PARAM}|(?:norm|head)\.(?:weight|bias))"
    rf"|decoder_pos_embed\.(?:spatial|temporal)"
)


def _is_pretrain_only(key: str) -> bool:
    """VideoMAE's decoder, or VIMPAC's token and contrastive heads."""
    return (key.startswith(("decoder.", "decoder_pos_embed.", "token_head.", "contrastive_head."))
            or key in ("encoder_to_decoder.weight", "mask_token"))


def _classifier_name(source: str) -> str:
    """A checkpoint key under our classifier's name: VideoMAE V2 wraps the ViT as ``backbone``, pre-training
    checkpoints prefix it with ``encoder``."""
    return source.removeprefix("backbone.").removeprefix("encoder.")


def _head_pooling(keys: Collection[str]) -> Optional[Literal["mean", "token"]]:
    """What a checkpoint's classification head was trained on (None without a head): ``'mean'``, the mean of the
    tokens through ``fc_norm``, or ``'token'``, one token after the final ``norm`` (the cls token, or with
    ``use_mean_pooling=False`` in official and Hugging Face VideoMAE, which have none, the first patch token)."""
    if "head.weight" not in keys:
        return None
    if "fc_norm.weight" in keys:
        return "mean"
    return "token" if "norm.weight" in keys else None


def _refuse_head_of_other_pooling(keys: Collection[str], global_pool: str) -> None:
    """A trained head fed other features than it was trained on is another model: refuse it, saying what to set."""
    trained = _head_pooling(keys)
    if trained is None or trained == ("mean" if global_pool == "mean" else "token"):
        return
    if trained == "token":
        raise ValueError(
            "the checkpoint's classification head was trained on one token after the final LayerNorm (official or "
            "Hugging Face VideoMAE saved with use_mean_pooling=False: the first patch token, as VideoMAE has no cls "
            "token), but global_pool='mean' would feed it the mean of the tokens through a new fc_norm, which is "
            "another model. Set model.global_pool=first (cls for a model with a cls token) to load it as trained, "
            "or leave head.weight/head.bias out of the checkpoint to fine-tune only its encoder"
        )
    raise ValueError(
        f"the checkpoint's classification head was trained on the mean of the tokens through fc_norm "
        f"(use_mean_pooling=True), but global_pool={global_pool!r} would feed it one token after a final "
        f"LayerNorm the checkpoint does not have. Set model.global_pool=mean to load it as trained"
    )


def official_to_classifier(
    sd: Mapping, *, global_pool: Literal["mean", "cls", "first"] = "mean"
) -> tuple[StateDict, ConversionReport]:
    """Official VideoMAE / VideoMAE V2 checkpoint → state dict of our classifier (``build_classifier``).

    Accepts pre-training checkpoints (``encoder.`` prefix plus decoder keys), fine-tuned ones (plain keys) and
    V2 ones with a ``backbone.`` prefix, wrapped or not (see ``unwrap_state_dict``). Pre-training-only keys
    (decoder, ``encoder_to_decoder``, ``mask_token``) are dropped and listed in the report. With mean pooling
    the encoder's final ``norm`` is dropped too: our mean-pooling classifier has no final norm (it starts a
    fresh ``fc_norm``), exactly as VideoMAE's fine-tuning discards it. Load the result with ``strict=False``
    when the head (and ``fc_norm``) are new. A head trained with the other pooling (``fc_norm`` for mean pooling,
    the final ``norm`` for one token) is refused: fed other features, it would be another classifier.
    """
    sd = unwrap_state_dict(sd)
    _refuse_head_of_other_pooling({_classifier_name(k) for k in sd}, global_pool)
    report = ConversionReport()
    out: StateDict = {}
    unknown = []
    for source, value in sd.items():
        base = source.removeprefix("backbone.")
        key = _classifier_name(source)
        if _is_pretrain_only(base) or (global_pool == "mean" and key in ("norm.weight", "norm.bias")):
            report.dropped.append(source)
        elif _CLASSIFIER_KEY.fullmatch(key):
            _put(out, key, value, source)
            report.renamed += key != source
        else:
            unknown.append(source)
    _raise_unrecognised(unknown, "official VideoMAE checkpoint (classifier conversion)")
    return out, report


def official_to_pretrain(sd: Mapping) -> tuple[StateDict, ConversionReport]:
    """Official VideoMAE pre-training checkpoint → state dict of our ``VideoMAE``.

    Our pre-training names are the official ones, so this only unwraps and checks that every key belongs to
    the pre-training model (a fine-tuned checkpoint, for instance, is refused). LayerScale (``init_values`` in the
    official code, which builds encoder and decoder blocks with it) keeps its names: ``encoder.blocks.N.gamma_1``
    and ``decoder.blocks.N.gamma_1``/``gamma_2`` load into a model with ``encoder.layer_scale_init`` /
    ``decoder.layer_scale_init`` set.
    """
    sd = unwrap_state_dict(sd)
    unknown = [k for k in sd if not _PRETRAIN_KEY.fullmatch(k)]
    _raise_unrecognised(unknown, "official VideoMAE pre-training checkpoint")
    return sd, ConversionReport()


# ---- Hugging Face transformers ---------------------------------------------------------------------------------

_HF_PATCH_EMBED = "videomae.embeddings.patch_embeddings.projection"
_HF_QKV = ("query", "key", "value")  # order of the chunks in our fused qkv weight
_HF_QV_BIAS = {  # our q/v bias → HF name; transformers v5 folded them into the Linear layers
    "v4": {"attn.q_bias": "attention.attention.q_bias", "attn.v_bias": "attention.attention.v_bias"},
    "v5": {"attn.q_bias": "attention.attention.query.bias", "attn.v_bias": "attention.attention.value.bias"},
}


def _weight_and_bias(ours: str, hf: str) -> dict[str, str]:
    return {f"{ours}.{p}": f"{hf}.{p}" for p in ("weight", "bias")}


def _hf_outer_names(pretrain: bool) -> dict[str, str]:
    """Our key → HF key for every parameter outside the transformer blocks."""
    if pretrain:
        return {
            **_weight_and_bias("encoder.patch_embed.proj", _HF_PATCH_EMBED),
            **_weight_and_bias("encoder.norm", "videomae.layernorm"),
            "encoder_to_decoder.weight": "encoder_to_decoder.weight",
            "mask_token": "mask_token",
            **_weight_and_bias("decoder.norm", "decoder.norm"),
            **_weight_and_bias("decoder.head", "decoder.head"),
        }
    return {
        **_weight_and_bias("patch_embed.proj", _HF_PATCH_EMBED),
        **_weight_and_bias("norm", "videomae.layernorm"),
        **_weight_and_bias("fc_norm", "fc_norm"),
        **_weight_and_bias("head", "classifier"),
    }


def _hf_block_lists(pretrain: bool) -> dict[str, str]:
    """Our block list → HF layer list."""
    if pretrain:
        return {"encoder.blocks": "videomae.encoder.layer", "decoder.blocks": "decoder.decoder_layers"}
    return {"blocks": "videomae.encoder.layer"}


def _hf_block_names(naming: HFNaming) -> dict[str, str]:
    """Our name → HF name inside one block, except the fused qkv weight (split into three)."""
    return {
        **_weight_and_bias("norm1", "layernorm_before"),
        **_weight_and_bias("norm2", "layernorm_after"),
        **_weight_and_bias("attn.proj", "attention.output.dense"),
        **_weight_and_bias("mlp.fc1", "intermediate.dense"),
        **_weight_and_bias("mlp.fc2", "output.dense"),
        **_HF_QV_BIAS[naming],
    }


def _split_block_key(key: str, lists: Mapping[str, str]) -> tuple[str, str] | None:
    """``'encoder.blocks.3.norm1.weight'`` → (``'videomae.encoder.layer.3'``, ``'norm1.weight'``) with
    ``lists`` mapping source list → target list; None when ``key`` is not inside a block."""
    for source, target in lists.items():
        match = re.fullmatch(rf"{re.escape(source)}\.(\d+)\.(.+)", key)
        if match:
            return f"{target}.{match[1]}", match[2]
    return None


def _invert(mapping: Mapping[str, str]) -> dict[str, str]:
    return {v: k for k, v in mapping.items()}


def hf_to_ours(sd: Mapping, *, pretrain: bool) -> StateDict:
    """Hugging Face ``VideoMAEForPreTraining`` (``pretrain=True``) or ``VideoMAEForVideoClassification`` state
    dict → our ``VideoMAE`` or classifier state dict.

    Separate q/k/v weights are fused into ``attn.qkv.weight``; q/v biases are accepted under both the
    transformers v4 (``q_bias``/``v_bias``) and v5 (``query.bias``/``value.bias``) names. HF has no k bias and
    neither do we, so nothing is lost. A classification state dict without the ``videomae.`` prefix (a bare
    ``VideoMAEModel``) is accepted too. A classifier saved with ``use_mean_pooling=True`` has ``fc_norm`` and
    loads into ``global_pool='mean'``; one saved with ``use_mean_pooling=False`` has the final ``norm`` instead and
    loads into ``global_pool='first'`` (HF feeds its classifier the first token, VideoMAE having no cls token).
    """
    sd = unwrap_state_dict(sd)
    if not pretrain and not any(k.startswith("videomae.") for k in sd):
        sd = {f"videomae.{k}": v for k, v in sd.items()}
    outer = _invert(_hf_outer_names(pretrain))
    lists = _invert(_hf_block_lists(pretrain))
    inner = {**_invert(_hf_block_names("v4")), **_invert(_hf_block_names("v5"))}
    out: StateDict = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}  # our block prefix → {query, key, value} weights
    unknown = []
    for key, value in sd.items():
        if key in outer:
            _put(out, outer[key], value, key)
            continue
        block = _split_block_key(key, lists)
        if block is not None:
            prefix, name = block
            part = re.fullmatch(r"attention\.attention\.(query|key|value)\.weight", name)
            if part:
                qkv.setdefault(prefix, {})[part[1]] = value
                continue
            if name in inner:
                _put(out, f"{prefix}.{inner[name]}", value, key)
                continue
        unknown.append(key)
    _raise_unrecognised(unknown, "Hugging Face VideoMAE state dict")
    for prefix, parts in qkv.items():
        missing = [p for p in _HF_QKV if p not in parts]
        if missing:
            raise ValueError(f"{prefix}: HF attention lacks the {', '.join(missing)} weight(s) needed to fuse qkv")
        out[f"{prefix}.attn.qkv.weight"] = torch.cat([parts[p] for p in _HF_QKV], dim=0)
    if pretrain and "encoder.norm.weight" not in out:
        # HF builds videomae.layernorm only with use_mean_pooling=False, as VideoMAE's pre-training configs set.
        raise ValueError(
            "HF pre-training state dict has no videomae.layernorm (built with use_mean_pooling=True), but our "
            "pre-training encoder ends with a LayerNorm as in the official layout; use use_mean_pooling=False"
        )
    return out


def ours_to_hf(sd: Mapping, *, pretrain: bool, naming: HFNaming = DEFAULT_HF_NAMING) -> StateDict:
    """Our ``VideoMAE`` (``pretrain=True``) or classifier state dict → Hugging Face ``VideoMAEForPreTraining`` /
    ``VideoMAEForVideoClassification`` state dict (a ``global_pool='mean'`` classifier for ``use_mean_pooling=True``,
    a ``'first'`` one for ``use_mean_pooling=False``).

    ``naming`` picks the q/v bias names: ``'v4'`` (``q_bias``/``v_bias``, what v4 checkpoints on the Hub use)
    or ``'v5'`` (``query.bias``/``value.bias``, the modules of transformers >= 5); the default follows the
    installed transformers. No k bias is emitted (HF's key projection has none). Parameters HF cannot hold
    (LayerScale, cls token, learnable position tables) are refused.
    """
    sd = unwrap_state_dict(sd)
    outer = _hf_outer_names(pretrain)
    lists = _hf_block_lists(pretrain)
    inner = _hf_block_names(naming)
    out: StateDict = {}
    unknown = []
    for key, value in sd.items():
        if key in outer:
            _put(out, outer[key], value, key)
            continue
        block = _split_block_key(key, lists)
        if block is not None:
            prefix, name = block
            if name == "attn.qkv.weight":
                for part, chunk in zip(_HF_QKV, value.chunk(3, dim=0)):
                    # clone: views of one storage would be refused by safetensors' save_file.
                    _put(out, f"{prefix}.attention.attention.{part}.weight", chunk.clone(), key)
                continue
            if name in inner:
                _put(out, f"{prefix}.{inner[name]}", value, key)
                continue
        unknown.append(key)
    _raise_unrecognised(unknown, "our state dict (conversion to Hugging Face)")
    return out


# ---- loading pre-trained weights into a classifier ---------------------------------------------------------


@dataclass
class LoadReport:
    """What ``load_into_classifier`` did, for the log: nothing is dropped or reshaped silently."""

    loaded: list[str] = field(default_factory=list)  # keys copied into the model
    dropped: list[str] = field(default_factory=list)  # checkpoint keys left out on purpose (decoder, old head)
    resampled: list[str] = field(default_factory=list)  # position tables resized to the model's grid
    fresh: list[str] = field(default_factory=list)  # model keys the checkpoint did not provide (a new head)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        for title, keys in (("dropped", self.dropped), ("resampled", self.resampled), ("fresh", self.fresh)):
            if keys:
                lines.append(f"{title}: {', '.join(sorted(keys))}")
        return "; ".join(lines)


_FRESH_HEAD = ("head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias")
# Where our models' blocks live → the config field that gives them LayerScale.
_CLASSIFIER_LAYER_SCALE = {"blocks.": "model.encoder.layer_scale_init"}
_PRETRAIN_LAYER_SCALE = {"encoder.blocks.": "model.encoder.layer_scale_init",
                         "decoder.blocks.": "model.decoder.layer_scale_init"}


def _looks_like_hf(sd: Mapping) -> bool:
    return any(k.startswith(("videomae.", "classifier.")) for k in sd)


def _has_layer_scale(keys: Iterable[str], blocks: str) -> bool:
    return any(k.startswith(blocks) and k.endswith((".gamma_1", ".gamma_2")) for k in keys)


def _check_layer_scale(checkpoint: Iterable[str], model: Iterable[str], fields: Mapping[str, str]) -> None:
    """Refuse a checkpoint whose blocks have LayerScale where the model's have none, or the reverse, naming the
    config field that decides it: a plain missing/unexpected ``gamma_1`` does not say what to change."""
    checkpoint, model = set(checkpoint), set(model)
    problems = []
    for blocks, config_key in fields.items():
        has, wants = _has_layer_scale(checkpoint, blocks), _has_layer_scale(model, blocks)
        if has and not wants:
            problems.append(f"the checkpoint's {blocks}N have LayerScale ({blocks}N.gamma_1/gamma_2; official "
                            f"VideoMAE's init_values) but the model's do not: set {config_key} to a nonzero value "
                            f"(e.g. {config_key}=0.1; the checkpoint's values replace it)")
        elif wants and not has:
            problems.append(f"the model's {blocks}N have LayerScale but the checkpoint's do not: set {config_key}=0")
    if problems:
        raise ValueError("; ".join(problems))


def _drop_head_of_other_size(sd: StateDict, own: Mapping[str, torch.Tensor]) -> list[str]:
    """Remove from ``sd`` a head that does not fit the model's (another class count); returns what it removed, under
    the classifier's names."""
    dropped = []
    for source in list(sd):
        key = _classifier_name(source)
        if key in ("head.weight", "head.bias") and (key not in own or sd[source].shape != own[key].shape):
            dropped.append(key)
            del sd[source]
    return dropped


def load_into_classifier(model, checkpoint: Mapping) -> LoadReport:
    """Load a pre-trained or fine-tuned checkpoint (ours, official VideoMAE / V2, or Hugging Face) into our
    classifier ``model``, strictly but for a new head.

    * Pre-training-only weights (decoder, ``encoder_to_decoder``, ``mask_token``) are dropped explicitly, and a
      head of another class count too; both are listed in the report.
    * Learnable separable position tables learned for another frame count or resolution are resampled to the
      model's grid (time and space separately); the fixed sin-cos table is rebuilt by the model itself, so a
      16-frame pre-training loads into an 8- or 32-frame classifier.
    * A head of the model's class count trained with the other pooling (``fc_norm`` for mean pooling, the final
      ``norm`` for one token, as Hugging Face's ``use_mean_pooling=False``) is refused, naming ``global_pool``.
    * Blocks with LayerScale in the checkpoint and not in the model, or the reverse, are refused naming
      ``model.encoder.layer_scale_init``.
    * Any other missing, unexpected or mis-shaped key is an error naming it: only ``head`` and ``fc_norm`` may be
      fresh.
    """
    from models.pos_embed import resample_spatial, resample_temporal

    sd = unwrap_state_dict(checkpoint)
    if _looks_like_hf(sd):
        sd = hf_to_ours(sd, pretrain=any(k.startswith("decoder.") for k in sd))
    own = model.state_dict()
    # A head of another class count goes before the conversion, which refuses heads trained for other pooling.
    dropped_head = _drop_head_of_other_size(sd, own)
    sd, conversion = official_to_classifier(sd, global_pool=model.global_pool)
    report = LoadReport(dropped=[*conversion.dropped, *dropped_head])
    _check_layer_scale(sd, own, _CLASSIFIER_LAYER_SCALE)
    grid = model.cfg.grid
    if "pos_embed.spatial" in sd and sd["pos_embed.spatial"].shape != own["pos_embed.spatial"].shape:
        sd["pos_embed.spatial"] = resample_spatial(sd["pos_embed.spatial"], grid[1:])
        report.resampled.append("pos_embed.spatial")
    # temporal: MAE-ST's and VIMPAC's time table; height, width: VIMPAC's factorized space, each linear along its axis
    for key, length in (("pos_embed.temporal", grid[0]), ("pos_embed.height", grid[1]), ("pos_embed.width", grid[2])):
        if key in sd and key in own and sd[key].shape != own[key].shape:
            sd[key] = resample_temporal(sd[key], length)
            report.resampled.append(key)
    wrong_shape = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if wrong_shape:
        details = ", ".join(f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in wrong_shape)
        raise ValueError(f"checkpoint tensors do not fit the model: {details}")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    not_fresh = [k for k in missing if k not in _FRESH_HEAD]
    if not_fresh or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {sorted(not_fresh)}, "
                         f"unexpected {sorted(unexpected)}")
    report.loaded = [k for k in sd if k not in unexpected]
    report.fresh = sorted(missing)
    return report


def load_into_pretrain(model, checkpoint: Mapping) -> ConversionReport:
    """Load a pre-training checkpoint (ours, official VideoMAE, or Hugging Face ``VideoMAEForPreTraining``) into our
    ``VideoMAE`` ``model``, strictly: every tensor of the model comes from the checkpoint, none is left over.

    Blocks with LayerScale in the checkpoint and not in the model, or the reverse, are refused naming the config
    field to set (``model.encoder.layer_scale_init``, ``model.decoder.layer_scale_init``).
    """
    sd = unwrap_state_dict(checkpoint)
    if _looks_like_hf(sd):
        sd = hf_to_ours(sd, pretrain=True)
    sd, report = official_to_pretrain(sd)
    _check_layer_scale(sd, model.state_dict(), _PRETRAIN_LAYER_SCALE)
    model.load_state_dict(sd)
    return report


@dataclass
class EncoderLoadReport(LoadReport):
    """``LoadReport`` of an encoder read out on every token, plus where its final norm came from."""

    # "norm" (the checkpoint's final norm), "fc_norm", "fresh" (ones / zeros) or "none" (post-norm blocks: no final
    # norm to load)
    norm_source: str = "norm"
    # the checkpoint's mean-pooling fc_norm (weight, bias) when it had no final norm and it was not copied into
    # one: what that checkpoint's classifier applied to the mean of the tokens
    fc_norm: Optional[dict[str, torch.Tensor]] = None

    def __str__(self) -> str:
        return f"{super().__str__()}; final norm: {self.norm_source}"


# Checkpoint keys of a final LayerNorm over every token / of mean pooling's fc_norm, in the layouts that
# load_into_classifier reads: ours and official (plain, "encoder." in pre-training, "backbone." in VideoMAE V2), HF.
_FINAL_NORM_KEYS = ("norm.weight", "encoder.norm.weight", "backbone.norm.weight", "videomae.layernorm.weight")
_FC_NORM_KEYS = ("fc_norm.weight", "backbone.fc_norm.weight")
_NORM = ("norm.weight", "norm.bias")
_FC_NORM = ("fc_norm.weight", "fc_norm.bias")


def load_into_encoder(encoder, checkpoint: Mapping, *, norm_from_fc_norm: bool = False) -> EncoderLoadReport:
    """Load anything ``load_into_classifier`` reads (our pre-training or fine-tuned checkpoints, official VideoMAE
    / V2 ones, Hugging Face ones) into ``encoder``, a ``VisionTransformer`` without head whose final ``norm``
    applies to every token (``global_pool="none"``: what a detector or a probe reads). Its rules hold (strict but
    for the head; separable position tables resampled to the encoder's grid; LayerScale and shape mismatches, a
    checkpoint of another width for instance, are errors); the checkpoint's classification head is dropped.

    The encoder's final ``norm``:

    * a checkpoint with a final norm (pre-training, or fine-tuned on one token: HF ``use_mean_pooling=False``)
      gives it: these are the features its blocks were trained to feed;
    * a mean-pooling fine-tuned checkpoint has none (VideoMAE discards it for fine-tuning) but ``fc_norm``, trained
      on the mean of the tokens for the old classes. By default ``norm`` then starts fresh (weight 1, bias 0) and
      ``fc_norm`` is dropped from the encoder but returned in the report: this is what VideoMAE's published AVA
      results start from (its detector loads such checkpoints non-strictly, so its ``norm`` keeps its
      initialisation), and a LayerNorm's affine part is relearned within the first steps, whereas ``fc_norm``'s
      gains were fitted to pooled features and the Kinetics head. ``norm_from_fc_norm=True`` copies ``fc_norm``
      into ``norm`` instead (for a comparison).

    The checkpoint goes through a temporary classifier with the encoder's configuration, pooling with the norm the
    checkpoint has: "first" (norm kept) or "mean" (fc_norm kept); its weights are then copied over. Returns what
    was loaded, dropped, resampled and left fresh, under the encoder's names (dropped keys under the checkpoint's).
    """
    from dataclasses import replace

    from torch import nn

    sd = unwrap_state_dict(checkpoint)
    has_norm = any(k in sd for k in _FINAL_NORM_KEYS)
    has_fc_norm = any(k in sd for k in _FC_NORM_KEYS)
    final_norm = isinstance(encoder.norm, nn.LayerNorm)  # post-norm blocks end on a norm: there is no final one
    pool = "first" if has_norm or not (final_norm or has_fc_norm) else "mean"
    # drop_path and checkpointing change no weight; the temporary model needs neither.
    classifier = encoder.rebuilt(replace(encoder.cfg, checkpointing="none", drop_path=0.0), global_pool=pool)
    inner = load_into_classifier(classifier, sd)
    weights = classifier.state_dict()
    fc_norm = {k: weights.pop(k) for k in _FC_NORM if k in weights}

    report = EncoderLoadReport(dropped=list(inner.dropped), resampled=list(inner.resampled))
    loaded = [k for k in inner.loaded if k not in _FC_NORM]
    if not final_norm:
        report.norm_source = "none"
        if has_fc_norm:
            report.fc_norm = {k.removeprefix("fc_norm."): fc_norm[k] for k in _FC_NORM}
    elif has_norm:
        report.norm_source = "norm"
    elif has_fc_norm and norm_from_fc_norm:
        report.norm_source = "fc_norm"
        weights.update({norm: fc_norm[fc] for norm, fc in zip(_NORM, _FC_NORM)})
        loaded += list(_NORM)
    else:
        report.norm_source = "fresh"
        norm = encoder.norm
        weights.update({"norm.weight": torch.ones_like(norm.weight), "norm.bias": torch.zeros_like(norm.bias)})
        report.dropped += [k for k in _FC_NORM if k in inner.loaded]
        if has_fc_norm:
            report.fc_norm = {k.removeprefix("fc_norm."): fc_norm[k] for k in _FC_NORM}
    encoder.load_state_dict(weights)
    report.loaded = loaded
    report.fresh = sorted(k for k in encoder.state_dict() if k not in loaded)
    return report
