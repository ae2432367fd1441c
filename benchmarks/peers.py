"""The peers our pre-training step is measured against, each run by its own code.

  official           facebookresearch/mae's ``models_mae.py``, imported from a clone given by
                     path (its licence is non-commercial: nothing of it is copied here), with the
                     work ``engine_pretrain.train_one_epoch`` does per step: the per-step lr of
                     ``util/lr_sched.py``, fp16 autocast, the loss read back (``loss.item()``),
                     ``util/misc.py``'s ``NativeScalerWithGradNormCount`` (scaled backward,
                     unscale, gradient norm, step, update), ``zero_grad`` and
                     ``torch.cuda.synchronize()``; AdamW (0.9, 0.95) over timm's weight-decay
                     groups, as ``main_pretrain.py`` builds it.
  official_compiled  the same model with the switches any user can add: bf16 autocast (so no
                     GradScaler), ``torch.compile`` and fused AdamW, and no host sync per step
                     (the loss stays on the device): the strongest official step that leaves the
                     model file alone.
  hf_compiled        Hugging Face's ``ViTMAEForPreTraining`` (SDPA attention) with bf16,
                     ``torch.compile`` and fused AdamW: a second, independent implementation.

Every peer starts from the weights of our model: the official model loads our state dict as it
is (the names are the official ones), Hugging Face's gets them renamed (``qkv`` split in three).
On the same batches and masks the loss curves are then comparable step for step.
"""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from timm.optim import param_groups_weight_decay

LR, WEIGHT_DECAY, BETAS = 1e-4, 0.05, (0.9, 0.95)  # the same for every mode: the curves must share them

# What the 2021 code needs from today's packages, supplied around it (the code itself unchanged):
COMPAT = [
    "numpy.float = float (util/pos_embed.py uses the alias numpy 1.24 removed)",
    "torch._six.inf = math.inf (util/misc.py imports it; torch 2.0 removed torch._six)",
    "timm Block called without qk_scale (models_mae.py passes qk_scale=None; timm 0.9 removed it)",
    "timm.optim.param_groups_weight_decay for optim_factory.add_weight_decay (renamed in timm 0.9)",
]


@dataclass
class Official:
    """The official code's modules, imported from a clone."""

    repo: Path
    models_mae: types.ModuleType
    misc: types.ModuleType
    lr_sched: types.ModuleType
    commit: str | None = None
    compat: list[str] = field(default_factory=lambda: list(COMPAT))


def import_official(repo: Path) -> Official:
    """Import ``models_mae``, ``util.misc`` and ``util.lr_sched`` from a clone of
    facebookresearch/mae, with the compatibility shims of ``COMPAT`` around them."""
    repo = Path(repo).resolve()
    if not (repo / "models_mae.py").is_file():
        raise SystemExit(f"--official-repo {repo}: no models_mae.py there (a clone of facebookresearch/mae)")
    if not hasattr(np, "float"):
        np.float = float  # type: ignore[attr-defined]
    sys.modules.setdefault("torch._six", types.SimpleNamespace(inf=math.inf))  # type: ignore[arg-type]
    import timm.models.vision_transformer as vit

    timm_block = vit.Block

    class Block(timm_block):  # type: ignore[misc, valid-type]
        def __init__(self, *args, qk_scale=None, **kwargs) -> None:
            super().__init__(*args, **kwargs)

    sys.path.insert(0, str(repo))
    vit.Block = Block  # models_mae does `from timm.models.vision_transformer import Block` at import
    try:
        models_mae = importlib.import_module("models_mae")
        misc = importlib.import_module("util.misc")
        lr_sched = importlib.import_module("util.lr_sched")
    finally:
        vit.Block = timm_block
    rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    return Official(repo, models_mae, misc, lr_sched, rev.stdout.strip() or None if rev.returncode == 0 else None)


def official_model(official: Official, cfg: dict, img_size: int, in_chans: int,
                   state: dict[str, torch.Tensor]) -> torch.nn.Module:  # fmt: skip
    """The official MaskedAutoencoderViT of a preset's architecture (the class its
    ``mae_vit_*_dec512d8b`` functions build), loaded with our weights (strict: same names).
    Its patchify assumes 3 channels: RGB only."""
    if in_chans != 3:
        raise ValueError(f"the official model takes RGB images (3 channels), not {in_chans}: use --in-chans 3")
    model = official.models_mae.MaskedAutoencoderViT(
        img_size=img_size, patch_size=cfg["patch_size"], in_chans=in_chans, embed_dim=cfg["embed_dim"],
        depth=cfg["depth"], num_heads=cfg["num_heads"], decoder_embed_dim=cfg["decoder_embed_dim"],
        decoder_depth=cfg["decoder_depth"], decoder_num_heads=cfg["decoder_num_heads"], mlp_ratio=cfg["mlp_ratio"],
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), norm_pix_loss=True,
    )  # fmt: skip
    model.load_state_dict(state, strict=True)
    return model


# our block's names -> Hugging Face's (two spellings: transformers 5.2x, and the older one)
_HF_LAYER = {
    "norm1": ["layernorm_before"],
    "norm2": ["layernorm_after"],
    "attn.proj": ["attention.o_proj", "attention.output.dense"],
    "mlp.fc1": ["mlp.fc1", "intermediate.dense"],
    "mlp.fc2": ["mlp.fc2", "output.dense"],
}
_HF_QKV = [("attention.q_proj", "attention.k_proj", "attention.v_proj"),
           ("attention.attention.query", "attention.attention.key", "attention.attention.value")]  # fmt: skip
_HF_TOP = {
    "cls_token": "vit.embeddings.cls_token",
    "pos_embed": "vit.embeddings.position_embeddings",
    "patch_embed.proj": "vit.embeddings.patch_embeddings.projection",
    "norm": "vit.layernorm",
    "decoder_embed": "decoder.decoder_embed",
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.decoder_pos_embed",
    "decoder_norm": "decoder.decoder_norm",
    "decoder_pred": "decoder.decoder_pred",
}


def hf_state(ours: dict[str, torch.Tensor], theirs: set[str]) -> dict[str, torch.Tensor]:
    """Our MAE state dict under Hugging Face ViTMAE's names (``theirs``: the target's keys)."""

    def pick(candidates: list[str]) -> str:
        found = [c for c in candidates if c in theirs]
        if not found:
            raise KeyError(f"none of {candidates} in the Hugging Face model")
        return found[0]

    out: dict[str, torch.Tensor] = {}
    for key, value in ours.items():
        module, _, leaf = key.rpartition(".")
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
        elif module in _HF_TOP:
            out[f"{_HF_TOP[module]}.{leaf}"] = value
        else:  # blocks.{i}.<part>.{weight,bias} or decoder_blocks.{i}...
            stack, index, part = module.split(".", 2)
            prefixes = ["decoder.decoder_layers"] if stack == "decoder_blocks" else ["vit.layers", "vit.encoder.layer"]
            if part == "attn.qkv":
                names = [f"{p}.{index}.{q}.{leaf}" for p in prefixes for q in (qkv[0] for qkv in _HF_QKV)]
                q = pick(names)
                spelling = next(s for s in _HF_QKV if q.endswith(f"{s[0]}.{leaf}"))
                base = q[: -len(f"{spelling[0]}.{leaf}")]
                for name, chunk in zip(spelling, value.chunk(3, dim=0), strict=True):
                    out[f"{base}{name}.{leaf}"] = chunk
            else:
                out[pick([f"{p}.{index}.{h}.{leaf}" for p in prefixes for h in _HF_LAYER[part]])] = value
    return out


def hf_model(cfg: dict, img_size: int, in_chans: int, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """transformers' ViTMAEForPreTraining of the same architecture (SDPA attention,
    LayerNorm eps 1e-6 and exact GELU as the official model), loaded with our weights."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    config = ViTMAEConfig(
        image_size=img_size, patch_size=cfg["patch_size"], num_channels=in_chans, hidden_size=cfg["embed_dim"],
        num_hidden_layers=cfg["depth"], num_attention_heads=cfg["num_heads"],
        intermediate_size=int(cfg["embed_dim"] * cfg["mlp_ratio"]), decoder_hidden_size=cfg["decoder_embed_dim"],
        decoder_num_hidden_layers=cfg["decoder_depth"], decoder_num_attention_heads=cfg["decoder_num_heads"],
        decoder_intermediate_size=int(cfg["decoder_embed_dim"] * cfg["mlp_ratio"]), qkv_bias=True,
        layer_norm_eps=1e-6, hidden_act="gelu", norm_pix_loss=True, attn_implementation="sdpa",
    )  # fmt: skip
    model = ViTMAEForPreTraining(config)
    model.load_state_dict(hf_state(state, set(model.state_dict())), strict=True)
    return model


class PeerStep:
    """One training step of a peer on a ready batch ``x`` (``noise``: the masking noise,
    for the models that take it; the official model draws its own from the global RNG)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, mask_ratio: float, *, compiled: bool,
                 official: Official | None, hf: bool) -> None:  # fmt: skip
        self.device, self.mask_ratio, self.hf, self.compiled = device, mask_ratio, hf, compiled
        cuda = device.type == "cuda"
        groups = param_groups_weight_decay(model, WEIGHT_DECAY)  # main_pretrain.py's add_weight_decay, renamed
        self.optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS, fused=(compiled and cuda) or None)
        self.dtype = torch.bfloat16 if compiled else torch.float16
        self.autocast_on = cuda  # the official autocast is CUDA's: fp32 on a CPU
        # fp16: the official loss scaler (a GradScaler; disabled by torch itself on a CPU)
        self.scaler = None if compiled or official is None else official.misc.NativeScalerWithGradNormCount()
        self.lr_sched = official.lr_sched if official is not None else None
        # the official per-step cosine schedule, held at LR: warm-up off, a horizon of 10^9 epochs
        self.schedule = types.SimpleNamespace(lr=LR, min_lr=0.0, warmup_epochs=0, epochs=10**9)
        self.model = model
        self.step_model: Callable = torch.compile(model) if compiled else model
        self.steps = 0

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast_on):
            if self.hf:
                return self.step_model(pixel_values=x, noise=noise).loss
            loss, _, _ = self.step_model(x, mask_ratio=self.mask_ratio)
            return loss

    def __call__(self, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        if self.lr_sched is not None:  # engine_pretrain: the lr set before every step
            self.lr_sched.adjust_learning_rate(self.optimizer, self.steps / 1000, self.schedule)
        loss = self.forward(x, noise)
        if self.scaler is not None:  # the official step as its engine runs it
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss is {loss_value}")
            self.scaler(loss, self.optimizer, parameters=self.model.parameters(), update_grad=True)
            self.optimizer.zero_grad()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
        else:
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
        self.steps += 1
        return loss.detach()
