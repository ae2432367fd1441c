"""Writing and reading MAE checkpoints (ours and the official releases) and handing
the encoder to timm's VisionTransformer."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv

from mae_ops.atomic import save_with
from mae_ops.errors import UserError
from mae_ops.models.mae import MaskedAutoencoderViT, sincos_pos_embed_2d

DECODER_PREFIXES = ("decoder_", "mask_token")


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


def write_checkpoint(path: str | Path, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` atomically, the same bytes for the same ``obj``: given
    a path, torch names the archive inside after the file, here a random temporary one, so
    a re-run that trains the same weights would look changed to DVC and re-run every stage
    after it."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: the archive inside is always "archive/"
            torch.save(obj, fh)

    save_with(path, write)


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


def _channels(weight: torch.Tensor, in_chans: int, patch: int) -> torch.Tensor:
    """The decoder's pixel predictions (p*p*C rows, channel last) for ``in_chans``
    channels: a grey model predicts the mean of the colour rows; a colour model
    repeats the grey row."""
    old = weight.shape[0] // (patch * patch)
    rows = weight.reshape(patch * patch, old, *weight.shape[1:])
    rows = rows.mean(1, keepdim=True) if in_chans == 1 else rows.expand(-1, in_chans, *rows.shape[2:])
    return rows.reshape(patch * patch * in_chans, *weight.shape[1:]).clone()


def _is_sincos(table: torch.Tensor) -> bool:
    """Whether a (1, 1 + g*g, D) position table is the fixed 2-D sin-cos table of its grid."""
    grid = int(round((table.shape[1] - 1) ** 0.5))
    want = torch.from_numpy(sincos_pos_embed_2d(table.shape[-1], grid, cls_token=True)).float()
    return torch.allclose(table[0].float(), want, atol=1e-4)


def continue_from(model: MaskedAutoencoderViT, path: str | Path) -> list[str]:
    """Start ``model`` from the MAE weights in ``path`` (``{'model': state_dict}``: an
    official ``*_full.pth``, this project's ``mae.pth``, or an encoder-only file), fitted
    to the model's image size and channels; returns what was adapted, one line each.

    - encoder-only: the decoder keeps its fresh initialisation;
    - another ``img_size``: a fixed sin-cos position table is the model's own for its
      grid (the same function of the grid); a learned one is resampled (timm);
    - other channels: the patch projection as timm adapts a first conv (grey sums the
      colour filters), the decoder's pixel rows averaged (colour to grey) or repeated;
    - anything else that differs (another preset or decoder depth) is a CheckpointError
      naming the first key."""
    state = load_state_dict(path)
    own = model.state_dict()
    notes: list[str] = []
    if not any(k.startswith(DECODER_PREFIXES) for k in state):
        notes.append("encoder-only checkpoint: the decoder starts from a fresh initialisation")
        own_keys = {k for k in own if not k.startswith(DECODER_PREFIXES)}
    else:
        own_keys = set(own)
    missing, unexpected = sorted(own_keys - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        key = (missing or unexpected)[0]
        where = "missing from the checkpoint" if missing else "not in model.preset's model"
        raise CheckpointError(f"pretrain.init {path}: {key} is {where} ({len(missing)} missing, "
                              f"{len(unexpected)} extra keys): another model.preset or model.decoder_depth?")  # fmt: skip
    patch = model.patch_size
    for key in sorted(set(state) & own_keys):
        value, want = state[key], own[key]
        if value.shape == want.shape:
            continue
        if key in ("pos_embed", "decoder_pos_embed") and value.shape[-1] == want.shape[-1]:
            if _is_sincos(value):
                state[key] = want.clone()
                note = "fixed sin-cos table made for the model's grid"
            else:
                grid, old = model.patch_embed.grid_size[0], int(round((value.shape[1] - 1) ** 0.5))
                state[key] = resample_abs_pos_embed(value, new_size=[grid, grid], old_size=[old, old],
                                                    num_prefix_tokens=1)  # fmt: skip
                note = "learned table resampled"
            notes.append(f"{key}: {value.shape[1] - 1} patches in the checkpoint, {want.shape[1] - 1} here ({note})")
        elif key == "patch_embed.proj.weight" and value.shape[0] == want.shape[0] and value.shape[2:] == want.shape[2:]:
            state[key] = adapt_input_conv(want.shape[1], value, base_chans=value.shape[1])
            notes.append(f"{key}: {value.shape[1]} input channels in the checkpoint, {want.shape[1]} here (adapted)")
        elif key.startswith("decoder_pred.") and value.shape[1:] == want.shape[1:] and 1 in (
            value.shape[0] // patch**2, want.shape[0] // patch**2,
        ):  # fmt: skip
            state[key] = _channels(value, want.shape[0] // patch**2, patch)
            notes.append(f"{key}: pixel rows for {value.shape[0] // patch**2} channels mapped to "
                         f"{want.shape[0] // patch**2}")  # fmt: skip
        else:
            raise CheckpointError(f"pretrain.init {path}: {key} is {list(value.shape)} in the checkpoint and "
                                  f"{list(want.shape)} in the model: another model.preset, or data channels "
                                  "that cannot be mapped?")  # fmt: skip
    model.load_state_dict(state, strict=False)
    return notes
