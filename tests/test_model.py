"""The MAE model: masking, loss, patches, and compatibility with timm and the
official checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from mae_ops.models.checkpoint import encoder_state_dict, load_mae, load_state_dict
from mae_ops.models.mae import (
    MaskedAutoencoderViT,
    create_mae,
    mae_vit_base_patch16,
    sincos_pos_embed_1d,
    sincos_pos_embed_2d,
)


@pytest.fixture
def micro() -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    return create_mae("mae_vit_micro_patch4", img_size=16, in_chans=3)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_random_masking_invariants(micro: MaskedAutoencoderViT, ratio: float) -> None:
    n, num_tokens, dim = 5, 16, 8
    x = torch.randn(n, num_tokens, dim)
    kept, mask, ids_restore = micro.random_masking(x, ratio)
    len_keep = int(num_tokens * (1 - ratio))
    assert kept.shape == (n, len_keep, dim)
    # exactly len_keep visible per sample, mask is binary
    assert torch.all(mask.sum(1) == num_tokens - len_keep)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    # ids_restore is a permutation that inverts the shuffle
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    assert torch.equal(torch.sort(ids_restore, 1).values, torch.arange(num_tokens).expand(n, -1))
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(num_tokens).expand(n, -1))
    # kept tokens are exactly the ones the mask marks visible, in shuffle order
    ids_keep = ids_shuffle[:, :len_keep]
    assert torch.equal(kept, torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim)))
    for i in range(n):
        assert torch.all(mask[i, ids_keep[i]] == 0)
        assert mask[i].sum() == num_tokens - len(set(ids_keep[i].tolist()))


def test_masking_is_per_sample_and_follows_noise(micro: MaskedAutoencoderViT) -> None:
    x = torch.randn(2, 16, 4)
    noise = torch.stack([torch.arange(16.0), torch.arange(16.0).flip(0)])
    _, mask, _ = micro.random_masking(x, 0.75, noise)
    assert mask[0, :4].sum() == 0 and mask[0, 4:].sum() == 12  # low noise is kept
    assert mask[1, -4:].sum() == 0 and mask[1, :-4].sum() == 12


def test_loss_ignores_predictions_on_visible_patches(micro: MaskedAutoencoderViT) -> None:
    imgs = torch.randn(3, 3, 16, 16)
    loss, pred, mask = micro(imgs, mask_ratio=0.75)
    tampered = pred.detach().clone()
    tampered[mask == 0] += 100.0  # change only visible-patch predictions
    assert torch.allclose(micro.forward_loss(imgs, tampered, mask), loss.detach())
    tampered[mask == 1] += 1.0  # ...and a change on removed patches does matter
    assert not torch.allclose(micro.forward_loss(imgs, tampered, mask), loss.detach())


def test_norm_pix_loss_targets_are_standardised_patches() -> None:
    torch.manual_seed(0)
    model = create_mae("mae_vit_micro_patch4", img_size=16, in_chans=1, norm_pix_loss=True)
    imgs = torch.rand(2, 1, 16, 16) * 5 + 3
    target = model.patchify(imgs)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    mask = torch.ones(2, 16)
    assert model.forward_loss(imgs, target, mask).item() == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("chans", [1, 3])
def test_patchify_round_trip(chans: int) -> None:
    model = create_mae("mae_vit_micro_patch4", img_size=16, in_chans=chans)
    imgs = torch.randn(2, chans, 16, 16)
    patches = model.patchify(imgs)
    assert patches.shape == (2, 16, 4 * 4 * chans)
    assert torch.equal(model.unpatchify(patches), imgs)
    # patch 0 is the top-left 4x4 block, channel last inside the patch
    assert torch.equal(patches[0, 0].view(4, 4, chans), imgs[0, :, :4, :4].permute(1, 2, 0))
    assert torch.equal(patches[0, 1].view(4, 4, chans), imgs[0, :, :4, 4:8].permute(1, 2, 0))


def test_sincos_layout_is_w_first() -> None:
    dim, grid = 16, 3
    table = sincos_pos_embed_2d(dim, grid, cls_token=True)
    assert table.shape == (grid * grid + 1, dim) and table.dtype == np.float64
    assert np.all(table[0] == 0)  # cls position
    pos = table[1:].reshape(grid, grid, dim)  # (row, col, dim)
    for r in range(grid):
        for c in range(grid):
            np.testing.assert_allclose(pos[r, c, : dim // 2], sincos_pos_embed_1d(dim // 2, np.array([c]))[0])
            np.testing.assert_allclose(pos[r, c, dim // 2 :], sincos_pos_embed_1d(dim // 2, np.array([r]))[0])
    # 1-D: sin half then cos half, frequencies 1/10000^(2i/d)
    emb = sincos_pos_embed_1d(4, np.array([1.0]))
    np.testing.assert_allclose(emb[0], [np.sin(1), np.sin(1e-2), np.cos(1), np.cos(1e-2)])


def test_encoder_without_masking_equals_timm_forward_features(micro: MaskedAutoencoderViT) -> None:
    micro.eval()
    vit = timm.create_model(
        "vit_base_patch16_224", pretrained=False, num_classes=0, img_size=16, patch_size=4,
        in_chans=3, embed_dim=32, depth=2, num_heads=2,
    )  # fmt: skip
    vit.load_state_dict(encoder_state_dict(micro.state_dict()), strict=True)
    vit.eval()
    imgs = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        latent, mask, ids_restore = micro.forward_encoder(imgs, mask_ratio=0.0)
        tokens = torch.gather(latent[:, 1:], 1, ids_restore.unsqueeze(-1).expand(-1, -1, latent.shape[-1]))
        ours = torch.cat([latent[:, :1], tokens], dim=1)
        theirs = vit.forward_features(imgs)
    assert mask.sum() == 0
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def _official_keys(depth: int, decoder_depth: int) -> set[str]:
    block = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
    wb = lambda name: {f"{name}.weight", f"{name}.bias"}  # noqa: E731
    keys = {"cls_token", "pos_embed", "mask_token", "decoder_pos_embed"}
    keys |= wb("patch_embed.proj") | wb("norm") | wb("decoder_embed") | wb("decoder_norm") | wb("decoder_pred")
    for i in range(depth):
        keys |= set().union(*(wb(f"blocks.{i}.{b}") for b in block))
    for i in range(decoder_depth):
        keys |= set().union(*(wb(f"decoder_blocks.{i}.{b}") for b in block))
    return keys


def test_base_preset_has_official_keys_and_loads_strictly_into_timm() -> None:
    model = mae_vit_base_patch16(norm_pix_loss=True)
    state = model.state_dict()
    assert set(state) == _official_keys(12, 8)
    assert state["pos_embed"].shape == (1, 197, 768)
    assert state["decoder_pos_embed"].shape == (1, 197, 512)
    assert state["decoder_pred.weight"].shape == (16 * 16 * 3, 512)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    vit.load_state_dict(encoder_state_dict(state), strict=True)
    assert torch.equal(vit.blocks[11].mlp.fc2.weight, model.blocks[11].mlp.fc2.weight)
    # other resolution: pos_embed resampled to the new grid
    vit_small_res = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=112)
    vit_small_res.load_state_dict(encoder_state_dict(state, grid_size=7), strict=True)
    assert vit_small_res.pos_embed.shape == (1, 50, 768)


@pytest.mark.parametrize("encoder_only", [False, True])
def test_official_checkpoint_file_loads(tmp_path, micro: MaskedAutoencoderViT, encoder_only: bool) -> None:
    state = micro.state_dict()
    if encoder_only:
        state = encoder_state_dict(state)
    torch.save({"model": state, "epoch": 799}, tmp_path / "mae_pretrain.pth")
    fresh = create_mae("mae_vit_micro_patch4", img_size=16, in_chans=3)
    missing = load_mae(fresh, tmp_path / "mae_pretrain.pth")
    assert torch.equal(fresh.blocks[1].attn.qkv.weight, micro.blocks[1].attn.qkv.weight)
    assert torch.equal(fresh.cls_token, micro.cls_token)
    assert bool(missing) == encoder_only
    assert all(k.startswith(("decoder_", "mask_token")) for k in missing)


def test_checkpoint_with_code_is_refused(tmp_path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match=r"(?i)weights_only|unsupported|global"):
        load_state_dict(tmp_path / "evil.pth")


def test_mismatched_checkpoint_is_refused(tmp_path, micro: MaskedAutoencoderViT) -> None:
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 32), "bogus.weight": torch.zeros(2)}}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="keys do not match"):
        load_mae(micro, tmp_path / "x.pth")


def test_unknown_preset() -> None:
    with pytest.raises(KeyError, match="unknown model preset"):
        create_mae("mae_vit_gigantic")
