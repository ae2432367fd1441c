"""Reading MAE checkpoints (ours and the official releases) and handing the
encoder to timm's VisionTransformer."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed

from mae_ops.errors import UserError
from mae_ops.models.mae import MaskedAutoencoderViT

DECODER_PREFIXES = ("decoder_", "mask_token")


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


def read_checkpoint(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` (never unpickles code); a missing,
    truncated or corrupt file is a CheckpointError naming it, not a traceback."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refused {path}: it holds pickled objects or code that a weights_only load does not run "
            "(never load untrusted pickles); save the weights alone (a state dict)"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:  # a truncated zip is an OSError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({first[:160]}): it is truncated or corrupt; "
            "delete it to start afresh, or restore it from a backup (`dvc checkout` for pipeline outputs)"
        ) from exc


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Model weights from a checkpoint file: ``{'model': state_dict}`` (official
    layout, full or encoder-only) or a bare state dict. Never unpickles code."""
    ckpt = read_checkpoint(path)
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a model checkpoint (expected {{'model': state_dict}} or a state dict)")
    # checkpoints saved from DDP or torch.compile wrappers carry a prefix
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def encoder_state_dict(
    state: dict[str, torch.Tensor], grid_size: int | None = None
) -> dict[str, torch.Tensor]:
    """Encoder part of an MAE state dict, loadable strictly into
    ``timm.create_model('vit_*', num_classes=0)``.

    ``grid_size`` (patches per side) resamples ``pos_embed`` when the target
    resolution differs from the checkpoint's.
    """
    enc = {k: v for k, v in state.items() if not k.startswith(DECODER_PREFIXES)}
    if grid_size is not None and "pos_embed" in enc:
        old_grid = int(round((enc["pos_embed"].shape[1] - 1) ** 0.5))
        if old_grid != grid_size:
            enc["pos_embed"] = resample_abs_pos_embed(
                enc["pos_embed"], new_size=[grid_size, grid_size], old_size=[old_grid, old_grid], num_prefix_tokens=1
            )
    return enc


def load_mae(model: MaskedAutoencoderViT, path: str | Path, strict: bool = True) -> list[str]:
    """Load a checkpoint into an MAE model; an encoder-only file leaves the
    decoder as initialised. Returns the keys that were not in the file."""
    state = load_state_dict(path)
    encoder_only = not any(k.startswith(DECODER_PREFIXES) for k in state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or (strict and missing and not encoder_only):
        raise CheckpointError(f"{path}: keys do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if strict and encoder_only and any(not k.startswith(DECODER_PREFIXES) for k in missing):
        raise CheckpointError(f"{path}: encoder keys missing: {[k for k in missing if not k.startswith(DECODER_PREFIXES)][:5]}")
    return list(missing)
