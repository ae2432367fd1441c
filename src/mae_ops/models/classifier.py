"""The fine-tuned classifier: timm's VisionTransformer with the MAE encoder's
weights; global average pooling + fc_norm for fine-tuning, or a frozen encoder
with BatchNorm (no affine) + linear head for linear probing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from mae_ops.models.checkpoint import CheckpointError, encoder_state_dict, load_state_dict, read_checkpoint
from mae_ops.models.presets import preset_config


def build_classifier(
    preset: str, img_size: int, in_chans: int, num_classes: int, *,
    global_pool: str = "avg", drop_path: float = 0.0, linprobe: bool = False,
) -> VisionTransformer:  # fmt: skip
    arch = preset_config(preset)
    model = VisionTransformer(
        img_size=img_size, patch_size=int(arch["patch_size"]), in_chans=in_chans, num_classes=num_classes,
        embed_dim=int(arch["embed_dim"]), depth=int(arch["depth"]), num_heads=int(arch["num_heads"]),
        mlp_ratio=float(arch["mlp_ratio"]), qkv_bias=True, global_pool=global_pool,
        fc_norm=global_pool == "avg", drop_path_rate=drop_path,
    )  # fmt: skip
    # a near-zero head keeps the first updates from wrecking the pre-trained features
    nn.init.trunc_normal_(model.head.weight, std=2e-5)
    nn.init.zeros_(model.head.bias)
    if linprobe:  # the reference's probe starts from std 0.01: LARS steps scale with the weight's norm
        nn.init.trunc_normal_(model.head.weight, std=0.01)
        model.head = nn.Sequential(nn.BatchNorm1d(model.embed_dim, affine=False, eps=1e-6), model.head)
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith("head.")
    return model


def feature_extractor(preset: str, img_size: int, in_chans: int, encoder: str | Path) -> VisionTransformer:
    """The pre-trained encoder as timm's ViT without a head, for embeddings: the mean of
    the patch tokens after the final norm, no masking (the same image, the same vector)."""
    arch = preset_config(preset)
    vit = VisionTransformer(
        img_size=img_size, patch_size=int(arch["patch_size"]), in_chans=in_chans, num_classes=0,
        embed_dim=int(arch["embed_dim"]), depth=int(arch["depth"]), num_heads=int(arch["num_heads"]),
        mlp_ratio=float(arch["mlp_ratio"]), qkv_bias=True, global_pool="avg", fc_norm=False,
    )  # fmt: skip
    vit.load_state_dict(encoder_state_dict(load_state_dict(encoder), grid_size=vit.patch_embed.grid_size[0]))
    return vit.eval()


def load_encoder(model: VisionTransformer, source: str | Path | dict[str, torch.Tensor]) -> list[str]:
    """Copy MAE encoder weights (our checkpoint, an official one, or a state
    dict) into the classifier; ``pos_embed`` is resampled to the model's grid.
    Returns the classifier keys left at their initial values (head, fc_norm)."""
    state = load_state_dict(source) if not isinstance(source, dict) else source
    enc = encoder_state_dict(state, grid_size=model.patch_embed.grid_size[0])
    if isinstance(model.norm, nn.Identity):  # avg pooling uses fc_norm instead of the final norm
        enc = {k: v for k, v in enc.items() if not k.startswith("norm.")}
    own = model.state_dict()
    wrong_shape = [k for k, v in enc.items() if k in own and own[k].shape != v.shape]
    if wrong_shape:
        raise CheckpointError(
            f"encoder weights do not fit the classifier: shapes differ for {wrong_shape[:5]} "
            "(is model.preset the one the checkpoint was trained with?)"
        )
    missing, unexpected = model.load_state_dict(enc, strict=False)
    allowed_missing = ("head.", "fc_norm.")
    bad = [k for k in missing if not k.startswith(allowed_missing)]
    if unexpected or bad:
        raise CheckpointError(
            f"encoder weights do not fit the classifier: missing {bad[:5]}, unexpected {unexpected[:5]} "
            "(is model.preset the one the checkpoint was trained with?)"
        )
    return list(missing)


def classifier_checkpoint(model: nn.Module, args: dict[str, Any]) -> dict:
    """The checkpoint layout that ``load_classifier`` (evaluation, export) reads back."""
    return {"model": model.state_dict(), "args": args}


def load_classifier(path: str | Path, map_location: str = "cpu") -> tuple[VisionTransformer, dict[str, Any]]:
    ckpt = read_checkpoint(path)
    a = ckpt["args"]
    model = build_classifier(
        a["preset"], a["img_size"], a["in_chans"], len(a["classes"]),
        global_pool=a["global_pool"], linprobe=a["mode"] == "linprobe",
    )  # fmt: skip
    model.load_state_dict(ckpt["model"])
    return model.eval(), a
