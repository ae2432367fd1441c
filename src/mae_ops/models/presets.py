"""Named MAE architectures (plain data: importing this needs no torch)."""

from __future__ import annotations

# name -> architecture; image size, channels and the loss flag are chosen per run.
PRESETS: dict[str, dict[str, float | int]] = {
    # the paper's models (decoder 512-d, 8 blocks, 16 heads)
    "mae_vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "mae_vit_large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "mae_vit_huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    # 32-px photos (CIFAR-10) on a GPU: ViT-Ti's widths (192-d, 12 blocks, 3 heads) on 4-px patches,
    # a light decoder (short schedules on small images do well with one: DailyMAE, "MAE are
    # secretly efficient learners")
    "mae_vit_ti_patch4": dict(
        patch_size=4, embed_dim=192, depth=12, num_heads=3,
        decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4,
    ),
    # small models that train on a CPU in minutes (28-32 px images)
    "mae_vit_tiny_patch4": dict(
        patch_size=4, embed_dim=128, depth=6, num_heads=4,
        decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
    ),
    "mae_vit_micro_patch4": dict(
        patch_size=4, embed_dim=32, depth=2, num_heads=2,
        decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
    ),
}
_PAPER_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)


def preset_config(name: str) -> dict[str, float | int]:
    """Architecture of a named preset, with the paper's decoder as the default."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return {**_PAPER_DECODER, "mlp_ratio": 4.0, **PRESETS[name]}


