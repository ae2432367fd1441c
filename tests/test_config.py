"""params.yaml validation, --set overrides and the CLI's refusal of bad params."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from mae_ops.config import Config, FinetuneConfig, ParamsError, apply_overrides, load_params
from tests.conftest import BIN, REPO, subprocess_env


def test_repo_params_are_valid_and_cover_documented_keys() -> None:
    cfg = load_params(REPO / "params.yaml")
    assert cfg.data.source == "mnist-5k"
    for key in ("img_size", "seed"):
        assert hasattr(cfg.data, key)
    for key in ("epochs", "batch_size", "mask_ratio", "norm_pix_loss", "device"):
        assert hasattr(cfg.pretrain, key)
    assert cfg.model.preset


def test_missing_default_file_means_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_params() == Config()


@pytest.mark.parametrize(
    ("override", "key", "hint"),
    [
        ("pretrain.mask_ratio=1.5", "pretrain.mask_ratio", "less than 1"),
        ("pretrain.mask_ratio=0", "pretrain.mask_ratio", "greater than 0"),
        ("pretrain.epochs=-3", "pretrain.epochs", "greater than or equal to 1"),
        ("pretrain.batch_size=many", "pretrain.batch_size", "valid integer"),
        ("data.img_size=30", "data.img_size", "divisible by the patch size"),
        ("pretrain.colour=red", "pretrain.colour", "unknown key; allowed keys: epochs"),
        ("training.epochs=3", "training", "unknown key; allowed keys: data, model, pretrain"),
        ("model.preset=resnet50", "model.preset", "must be one of"),
        ("pretrain.device=tpu", "pretrain.device", "auto, cpu, cuda"),
        ("data.channels=2", "data.channels", "'auto', 1 or 3"),
        ("pretrain.crop_scale=[0.9, 0.1]", "pretrain.crop_scale", "low <= high"),
        ("data.test_fraction=0.6", "data.val_fraction", "must be < 1"),
        ("pretrain.fast=sometimes", "pretrain.fast", "'auto', 'on' or 'off'"),
        ("pretrain.compile_mode=turbo", "pretrain.compile_mode", "'max-autotune'"),
        ("pretrain.num_workers=-1", "pretrain.num_workers", "'auto' or an integer >= 0"),
        ("finetune.num_workers=two", "finetune.num_workers", "'auto' or an integer >= 0"),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_range(override: str, key: str, hint: str) -> None:
    with pytest.raises(ParamsError) as err:
        load_params(REPO / "params.yaml", [override, "data.val_fraction=0.5"] if "test_fraction" in override
                    else [override])  # fmt: skip
    message = str(err.value)
    assert key in message
    assert hint in message


def test_overrides_parse_yaml_values() -> None:
    raw = apply_overrides({"pretrain": {"epochs": 1}}, ["pretrain.epochs=7", "pretrain.crop_scale=[0.5, 1]",
                                                       "pretrain.hflip=false", "data.source=/some/dir"])  # fmt: skip
    assert raw == {"pretrain": {"epochs": 7, "crop_scale": [0.5, 1], "hflip": False}, "data": {"source": "/some/dir"}}
    cfg = load_params(REPO / "params.yaml", ["pretrain.epochs=7"])
    assert cfg.pretrain.epochs == 7


@pytest.mark.parametrize("bad", ["novalue", "=3", "pretrain.epochs=[1"])
def test_malformed_overrides(bad: str) -> None:
    with pytest.raises(ParamsError, match="invalid override"):
        load_params(REPO / "params.yaml", [bad])


def test_unparseable_params_file(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("data: [unclosed\n")
    with pytest.raises(ParamsError, match="cannot parse"):
        load_params(tmp_path / "p.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ParamsError, match="mapping"):
        load_params(tmp_path / "list.yaml")
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")


@pytest.mark.parametrize("command", ["prepare", "pretrain"])
def test_cli_exits_2_and_writes_nothing(tmp_path: Path, command: str) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"pretrain": {"mask_ratio": 1.5}}))
    proc = subprocess.run(
        [str(BIN / "mae-ops"), command, "--set", "data.img_size=28"],
        cwd=tmp_path, capture_output=True, text=True, env=subprocess_env(), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "pretrain.mask_ratio" in proc.stderr and "less than 1" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_cli_set_is_validated_the_same_way(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(BIN / "mae-ops"), "check-params", "--params", str(REPO / "params.yaml"), "--set", "pretrain.epochs=0"],
        cwd=tmp_path, capture_output=True, text=True, env=subprocess_env(), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "pretrain.epochs" in proc.stderr
    ok = subprocess.run(
        [str(BIN / "mae-ops"), "check-params", "--params", str(REPO / "params.yaml"), "--set", "pretrain.epochs=3"],
        cwd=tmp_path, capture_output=True, text=True, env=subprocess_env(), timeout=120,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(ok.stdout)["pretrain"]["epochs"] == 3


def test_bare_on_off_in_yaml_mean_the_switch_words() -> None:
    """YAML 1.1 reads on/off as booleans; the switches take them back as words."""
    cfg = load_params(REPO / "params.yaml", ["pretrain.fast=off", "pretrain.amp=off", "finetune.amp=off"])
    assert (cfg.pretrain.fast, cfg.pretrain.amp, cfg.finetune.amp) == ("off", "off", "off")
    assert load_params(REPO / "params.yaml", ["pretrain.fast=on"]).pretrain.fast == "on"


def test_fine_tuning_recipes_fill_what_params_leave_out() -> None:
    """The reference recipe (the paper's, for photos) is the schema's default; the digits demo
    names the small-data one; a key set explicitly wins over its recipe."""
    ref = load_params(REPO / "params.yaml", ["finetune.recipe=reference"]).finetune
    assert (ref.crop_scale, ref.hflip, ref.randaug) == ((0.08, 1.0), True, "rand-m9-mstd0.5-inc1")
    assert (ref.mixup, ref.cutmix, ref.random_erase, ref.label_smoothing, ref.layer_decay) == (
        0.8,
        1.0,
        0.25,
        0.1,
        0.75,
    )
    large = load_params(REPO / "params.yaml", ["finetune.recipe=reference", "model.preset=mae_vit_large_patch16",
                                               "data.img_size=224"]).finetune  # fmt: skip
    assert large.layer_decay == 0.65
    mine = load_params(REPO / "params.yaml", ["finetune.recipe=reference", "finetune.mixup=0.2"]).finetune
    assert mine.mixup == 0.2 and mine.cutmix == 1.0
    demo = load_params(REPO / "params.yaml").finetune
    assert demo.recipe == "small-data" and (demo.mixup, demo.crop_scale, demo.layer_decay) == (0.0, None, 0.9)
    assert FinetuneConfig().recipe == "reference" and FinetuneConfig().mixup == 0.8


def test_a_vit_from_random_weights_gets_no_layer_decay_unless_params_give_one() -> None:
    """init: scratch takes layer decay 1.0 from either recipe (and for ViT-L, not the reference's
    0.65): it exists to keep pre-trained blocks near their weights; a layer_decay set explicitly wins."""
    for recipe in ("reference", "small-data"):
        scratch = load_params(REPO / "params.yaml", [f"finetune.recipe={recipe}", "finetune.init=scratch"]).finetune
        assert scratch.layer_decay == 1.0 and scratch.init == "scratch"
        assert load_params(REPO / "params.yaml", [f"finetune.recipe={recipe}"]).finetune.layer_decay < 1.0
    large = load_params(REPO / "params.yaml", ["finetune.recipe=reference", "finetune.init=scratch",
                                               "model.preset=mae_vit_large_patch16", "data.img_size=224"])  # fmt: skip
    assert large.finetune.layer_decay == 1.0
    mine = load_params(REPO / "params.yaml", ["finetune.init=scratch", "finetune.layer_decay=0.8"]).finetune
    assert mine.layer_decay == 0.8
    demo = load_params(REPO / "params.yaml").finetune  # the demo's: pre-trained, small-data's 0.9
    assert demo.with_params({"init": "scratch"}).layer_decay == 1.0  # a change of init, as a baseline makes it
    assert mine.with_params({"init": "pretrain"}).with_params({"init": "scratch"}).layer_decay == 0.8


def test_a_searched_recipe_brings_its_defaults_and_keeps_explicit_keys() -> None:
    """``recipe`` is tunable: a trial (or the final model) with another recipe gets that
    recipe's augmentation, except for the keys params.yaml sets explicitly; the other
    params (lr, epochs) stay as they were."""
    cfg = load_params(REPO / "params.yaml", ["finetune.rotate=5.0", "finetune.base_lr=0.004",
                                             "hpo.space={recipe: {choices: [small-data, reference]}}"])  # fmt: skip
    assert cfg.hpo.space["recipe"].choices == ["small-data", "reference"]
    small = cfg.finetune
    ref = small.with_params({"recipe": "reference", "drop_path": 0.05})
    assert ref.recipe == "reference" and (ref.mixup, ref.crop_scale, ref.hflip) == (0.8, (0.08, 1.0), True)
    assert ref.rotate == 5.0 and ref.base_lr == 0.004 and ref.drop_path == 0.05  # explicit and tuned keys win
    assert ref.epochs == small.epochs
    back = ref.with_params({"recipe": "small-data"})  # and back: small-data's own defaults again
    assert (back.mixup, back.crop_scale, back.rotate, back.drop_path) == (0.0, None, 5.0, 0.05)
    same = small.with_params({"base_lr": 0.01})  # no recipe among the params: nothing else moves
    assert same.model_dump() == {**small.model_dump(), "base_lr": 0.01}
    scratch = small.with_params({"init": "scratch", "layer_decay": 1.0}).with_params({"recipe": "reference"})
    assert scratch.layer_decay == 1.0  # a baseline's fixed choice is explicit too
    with pytest.raises(ParamsError, match="cannot tune"):
        load_params(REPO / "params.yaml", ["hpo.space={epochs: {choices: [1, 2]}}"])
