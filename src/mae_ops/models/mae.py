"""Masked Autoencoder with a Vision Transformer backbone (He et al., 2021).

One file, no pipeline concerns. The interface and parameter names follow the
community's MAE code so that official checkpoints load unchanged; the ViT
blocks and patch embedding come from timm.

Shapes: N batch, C channels, H=W image side, p patch side, L=(H/p)**2 patches,
D encoder width, Dd decoder width.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from mae_ops.models.presets import PRESETS, preset_config  # noqa: F401 (re-exported)


def sincos_pos_embed_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, dim) sin/cos features, float64."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dim, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1).astype(np.float64), omega)  # (M, dim/2)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_pos_embed_2d(dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
    """Fixed 2-D sin-cos position table, (grid_size**2 [+1], dim).

    The first half of each vector encodes the column (w) coordinate and the
    second half the row (h) coordinate, with a w-first meshgrid: this is the
    layout the released MAE weights were trained with.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs dim divisible by 4, got {dim}")
    coords = np.arange(grid_size, dtype=np.float64)
    w_grid, h_grid = np.meshgrid(coords, coords)  # w varies fastest along a row
    table = np.concatenate(
        [sincos_pos_embed_1d(dim // 2, w_grid), sincos_pos_embed_1d(dim // 2, h_grid)], axis=1
    )
    if cls_token:
        table = np.concatenate([np.zeros((1, dim)), table], axis=0)
    return table


class MaskedAutoencoderViT(nn.Module):
    """MAE: ViT encoder on visible patches, light decoder reconstructing the rest."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_layer: Callable[..., nn.Module] = partial(nn.LayerNorm, eps=1e-6),
        norm_pix_loss: bool = False,
    ) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss

        # --- encoder -------------------------------------------------------
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # fixed sin-cos table, stored as a frozen parameter (as in the released weights)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(depth)
        )
        self.norm = norm_layer(embed_dim)

        # --- decoder -------------------------------------------------------
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)

        self.initialize_weights()

    # ------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        grid = self.patch_embed.grid_size[0]
        self.pos_embed.data.copy_(
            torch.from_numpy(sincos_pos_embed_2d(self.pos_embed.shape[-1], grid, cls_token=True))
            .float()
            .unsqueeze(0)
        )
        self.decoder_pos_embed.data.copy_(
            torch.from_numpy(sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1], grid, cls_token=True))
            .float()
            .unsqueeze(0)
        )
        # patch projection initialised like a linear layer, not a conv
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_module)

    @staticmethod
    def _init_module(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    # ------------------------------------------------------------- patches
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C), channel last inside each patch."""
        p, c = self.patch_size, self.in_chans
        n, _, h, w = imgs.shape
        if h != w or h % p:
            raise ValueError(f"image side {h}x{w} must be square and divisible by patch {p}")
        g = h // p
        x = imgs.reshape(n, c, g, p, g, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(n, g * g, p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, p*p*C) -> (N, C, H, W)."""
        p, c = self.patch_size, self.in_chans
        n, num_patches, _ = x.shape
        g = int(round(num_patches**0.5))
        if g * g != num_patches:
            raise ValueError(f"{num_patches} patches do not form a square grid")
        x = x.reshape(n, g, g, p, p, c)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(n, c, g * p, g * p)

    # ------------------------------------------------------------- masking
    def random_masking(
        self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep a random subset of tokens per sample.

        x: (N, L, D). Returns the kept tokens (N, L_keep, D), the binary mask
        (N, L; 1 = removed) in the original order, and ids_restore (N, L) that
        undoes the shuffle.
        """
        n, num_tokens, dim = x.shape
        len_keep = int(num_tokens * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, num_tokens, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
        # the inverse permutation by one scatter (cheaper than a second sort, same result)
        ranks = torch.arange(num_tokens, device=x.device).expand(n, -1)
        ids_restore = torch.empty_like(ids_shuffle).scatter_(1, ids_shuffle, ranks)
        ids_keep = ids_shuffle[:, :len_keep]
        x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        mask = (ids_restore >= len_keep).to(x.dtype)  # a token is removed iff its rank is past len_keep
        return x_kept, mask, ids_restore

    # ------------------------------------------------------------- forward
    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.patch_embed(imgs)  # (N, L, D)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)  # (N, L_keep, D)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # (N, 1 + L_keep, D)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """The encoder on every patch, no masking: (N, D), the mean of the patch tokens
        after the final norm (what the exported encoder.onnx gives)."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]  # (N, L, D)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # (N, 1 + L, D)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 1:, :].mean(dim=1)

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)  # (N, 1 + L_keep, Dd)
        n, num_patches = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, num_patches + 1 - x.shape[1], -1)
        x_patches = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # (N, L, Dd), shuffled order
        x_patches = torch.gather(
            x_patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2])
        )  # back to image order
        x = torch.cat([x[:, :1, :], x_patches], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))  # (N, 1 + L, p*p*C)
        return x[:, 1:, :]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over removed patches only."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # (N, L)
        return (per_patch * mask).sum() / mask.sum()

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)  # (N, L, p*p*C)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


def create_mae(
    name: str, img_size: int = 224, in_chans: int = 3, norm_pix_loss: bool = False, decoder_depth: int | None = None
) -> MaskedAutoencoderViT:
    arch = {**preset_config(name), **({"decoder_depth": decoder_depth} if decoder_depth else {})}
    return MaskedAutoencoderViT(img_size=img_size, in_chans=in_chans, norm_pix_loss=norm_pix_loss, **arch)


# community-style constructors, e.g. models_mae.mae_vit_base_patch16(norm_pix_loss=True)
def mae_vit_base_patch16(**kwargs) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(**{**preset_config("mae_vit_base_patch16"), **kwargs})


def mae_vit_large_patch16(**kwargs) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(**{**preset_config("mae_vit_large_patch16"), **kwargs})


def mae_vit_huge_patch14(**kwargs) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(**{**preset_config("mae_vit_huge_patch14"), **kwargs})
