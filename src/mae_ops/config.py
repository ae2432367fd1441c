"""One validated schema for params.yaml; every stage reads its section from it.

Errors name the key and what is allowed, e.g.
``pretrain.mask_ratio: Input should be less than 1 (got 1.5)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal, get_type_hints

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from mae_ops.errors import UserError
from mae_ops.images import TYPE_BITS
from mae_ops.models.presets import PRESETS, preset_config

DEFAULT_PARAMS = Path("params.yaml")
EMBEDDED_SOURCES = ("mnist-5k",)  # data sets shipped in a package, not folders


class ParamsError(UserError, ValueError):
    """Invalid params: the message names every bad key and what is allowed."""


class InputError(UserError, ValueError):
    """Valid params, but what they point at cannot be used (missing folder,
    models trained on other data, an empty split, ...)."""


_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)(?P<secret>[^@\s]+)(?P<at>@)")
STORAGE_PASSWORD_ENV = "MAE_OPS_STORAGE_PASSWORD"


def redact(text: str) -> str:
    """Hide the password of every URL in ``text`` (``scheme://user:***@host``)."""
    return _URL_PASSWORD.sub(r"\g<head>***\g<at>", text)


def _check_device(v: str) -> str:
    head, _, idx = v.partition(":")
    if head not in ("auto", "cpu", "cuda", "mps") or (idx and (head != "cuda" or not idx.isdigit())):
        raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
    return v


DeviceName = Annotated[str, AfterValidator(_check_device)]


def _ordered_range(v: tuple[float, float], upper: float | None) -> tuple[float, float]:
    if not 0.0 < v[0] <= v[1] or (upper is not None and v[1] > upper):
        bound = f" <= {upper:g}" if upper is not None else ""
        raise ValueError(f"must be [low, high] with 0 < low <= high{bound}")
    return v


UnitRange = Annotated[tuple[float, float], AfterValidator(partial(_ordered_range, upper=1.0))]
PositiveRange = Annotated[tuple[float, float], AfterValidator(partial(_ordered_range, upper=None))]


def _yaml_switch(v: Any) -> Any:
    """YAML reads a bare on/off as true/false: take them back as the words."""
    return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


Switch = Annotated[Literal["auto", "on", "off"], BeforeValidator(_yaml_switch)]
Precision = Annotated[Literal["auto", "bf16", "fp16", "off"], BeforeValidator(_yaml_switch)]
AutoCount = Annotated[int, Field(ge=1)] | Literal["auto"]  # processes or workers: a number, or one per visible GPU


def _workers(v: Any) -> Any:
    if v != "auto" and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
        raise ValueError(f"must be 'auto' or an integer >= 0 (got {v!r})")
    return v


LoaderWorkers = Annotated[int | Literal["auto"], BeforeValidator(_workers)]  # host loader processes

# keys that change how fast or where a run goes, not what it computes: left out
# of the fingerprints that decide whether a checkpoint or a study can be resumed
# (the number of processes is not one of them: the fingerprints name the world size itself)
RUNTIME_KEYS = frozenset({"device", "amp", "fast", "compile_mode", "num_workers", "nproc_per_node", "save_every",
                          "auto_resume", "eval_every", "monitor_every", "out_dir", "checkpoint_dir",
                          "reports_dir"})  # fmt: skip


def semantic_params(section: BaseModel, *also_ignore: str) -> dict[str, Any]:
    """A section's params without the runtime-only keys."""
    skip = RUNTIME_KEYS | set(also_ignore)
    return {k: v for k, v in section.model_dump(mode="json").items() if k not in skip}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    source: str = Field("mnist-5k", description="'mnist-5k' (embedded) or a folder of labelled images")
    unlabeled_dirs: list[str] = Field(default_factory=list, description="extra unlabeled image folders")
    img_size: int = Field(28, ge=8, le=1024)
    crop_pct: float | Literal["auto"] = Field(
        "auto",
        description="evaluation: resize to img_size / crop_pct, centre crop img_size; auto: 1 for the "
        "embedded digits (whole 28 px images), 0.875 (timm's and the reference's) for folders of photos",
    )
    store_size: int | Literal["auto"] = Field(
        "auto",
        description="side of the stored images (>= img_size): pre-training crops sample from them; "
        "auto: round(img_size / crop_pct), e.g. 256 for 224",
    )
    channels: Literal["auto", 1, 3] = "auto"
    bit_depth: int = Field(
        TYPE_BITS,
        ge=8,
        le=TYPE_BITS,
        description="bits the values of 16/32-bit integer files use: 0..2**bit_depth - 1 becomes 0..255 "
        "(12 for a 12-bit sensor's frames saved as 16-bit files; higher values clip); 8-bit and float files "
        "are unaffected; travels with the exported model so that predict decodes the same way",
    )
    seed: int = Field(0, ge=0)
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    label_fraction: float = Field(0.1, gt=0.0, le=1.0)
    labels_per_class: int | None = Field(None, ge=1)
    out_dir: str = "data/prepared"

    @field_validator("source")
    @classmethod
    def _source_nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be 'mnist-5k' or a folder path")
        return v

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> DataConfig:
        if self.test_fraction + self.val_fraction >= 1.0:
            raise ValueError("data.test_fraction + data.val_fraction must be < 1")
        if self.crop_pct != "auto" and not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"data.crop_pct must be in (0, 1] (got {self.crop_pct})")
        if self.store_size != "auto" and not self.img_size <= self.store_size <= 4096:
            raise ValueError(f"data.store_size must be between data.img_size ({self.img_size}) and 4096 "
                             f"(got {self.store_size})")  # fmt: skip
        return self

    def eval_crop_pct(self) -> float:
        if self.crop_pct != "auto":
            return float(self.crop_pct)
        return 1.0 if self.source in EMBEDDED_SOURCES else 0.875

    def stored_size(self) -> int:
        """The side images are stored at: more pixels than training uses, for the crops."""
        if self.store_size != "auto":
            return int(self.store_size)
        return max(self.img_size, int(self.img_size / self.eval_crop_pct() + 1e-6))  # timm's floor


class ModelConfig(_Section):
    preset: str = "mae_vit_tiny_patch4"
    decoder_depth: int | None = Field(None, ge=1, le=16, description="MAE decoder blocks; null: the preset's")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        if v not in PRESETS:
            raise ValueError(f"must be one of {sorted(PRESETS)}")
        return v


class PretrainConfig(_Section):
    epochs: int = Field(40, ge=1)
    batch_size: int = Field(256, ge=1)
    accum_iter: int = Field(1, ge=1, description="gradient accumulation steps")
    base_lr: float = Field(1.5e-4, gt=0.0, description="lr = base_lr * effective batch / 256")
    min_lr: float = Field(0.0, ge=0.0)
    warmup_epochs: float = Field(5, ge=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0)
    norm_pix_loss: bool = True
    crop_scale: UnitRange = (0.2, 1.0)
    hflip: bool = True
    device: DeviceName = Field("auto", description="auto | cpu | cuda | cuda:N")
    amp: Precision = "auto"
    fast: Switch = Field(
        "auto", description="torch.compile, fused AdamW, data resident on the device; auto: on with CUDA"
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    fp8: bool = Field(
        False, description="FP8 matmuls in the blocks' large linear layers (torchao float8; fast path, CUDA >= sm89)"
    )
    init: str | None = Field(
        None,
        description="continue pre-training from this MAE checkpoint ({'model': ...}: an official *_full.pth, "
        "a mae.pth, or encoder-only); null: from scratch",
    )
    nproc_per_node: AutoCount = Field(
        "auto",
        description="DDP processes the stage starts on this machine (elastic launch); auto: one per visible GPU, "
        "1 on a CPU; each takes batch_size, so the effective batch and the lr grow with them",
    )
    seed: int = Field(0, ge=0)
    save_every: int = Field(5, ge=1, description="checkpoint every N epochs (and at the end)")
    monitor_every: int = Field(
        5,
        ge=0,
        description="score the encoder every N epochs and at the end (k-NN and linear probe on the "
        "validation split, in history.csv); 0 = off",
    )
    auto_resume: bool = Field(True, description="continue a matching interrupted run")
    num_workers: LoaderWorkers = Field(
        "auto", description="host loader processes when the data is not on the device; auto: 0 on CPU, up to 8 on CUDA"
    )
    shuffle: Literal["auto", "global", "windows"] = Field(
        "auto",
        description="global: a fresh permutation of every image each epoch (DistributedSampler); windows: shards in "
        "a fresh order, 4 at a time, their images shuffled among themselves, the next ones read ahead (a store "
        "larger than memory then streams at the disk's sequential speed); auto: windows when the images are read "
        "on the host and take more than half the RAM",
    )

    out_dir: str = "models/pretrain"
    checkpoint_dir: str = "checkpoints/pretrain"
    reports_dir: str = "reports/pretrain"


# fine-tuning augmentation and regularisation, by recipe; a key set in params.yaml wins over its recipe
RECIPES: dict[str, dict[str, Any]] = {
    # He et al. 2021, appendix A.1 (ViT-B; layer_decay 0.65 for ViT-L): for photos
    "reference": {
        "crop_scale": (0.08, 1.0), "hflip": True, "randaug": "rand-m9-mstd0.5-inc1", "mixup": 0.8, "cutmix": 1.0,
        "label_smoothing": 0.1, "random_erase": 0.25, "drop_path": 0.1, "layer_decay": 0.75,
        "translate": 0.0, "rotate": 0.0, "scale": (1.0, 1.0),
    },
    # a few hundred labels and a CPU budget (the digits demo; see the README for what was measured)
    "small-data": {
        "crop_scale": None, "hflip": False, "randaug": "", "mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.1,
        "random_erase": 0.0, "drop_path": 0.1, "layer_decay": 0.9, "translate": 0.1, "rotate": 10.0,
        "scale": (0.9, 1.1),
    },
}  # fmt: skip
RECIPE_LAYER_DECAY = {"mae_vit_large_patch16": 0.65}  # the reference's per-model layer decay, where not 0.75
# layer decay keeps pre-trained lower blocks near their weights; random ones it only slows
# (0.75 over 12 blocks: the patch embedding at 2 % of the lr), so init: scratch goes without
SCRATCH_LAYER_DECAY = 1.0


class FinetuneConfig(_Section):
    mode: Literal["finetune", "linprobe"] = "finetune"
    recipe: Literal["reference", "small-data"] = Field(
        "reference", description="defaults for the augmentation keys below (RECIPES); a key set explicitly wins"
    )
    init: str = Field("pretrain", description="pretrain | scratch | path to an MAE checkpoint (.pth)")
    epochs: int = Field(60, ge=1)
    batch_size: int = Field(64, ge=2)
    base_lr: float = Field(1e-3, gt=0.0, description="lr = base_lr * batch / 256")
    min_lr: float = Field(1e-6, ge=0.0)
    warmup_epochs: float = Field(5, ge=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    layer_decay: float = Field(0.75, gt=0.0, le=1.0, description="lr scale per block from the head down")
    drop_path: float = Field(0.1, ge=0.0, lt=1.0)
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    mixup: float = Field(0.0, ge=0.0, description="Mixup alpha, 0 = off")
    cutmix: float = Field(0.0, ge=0.0, description="CutMix alpha, 0 = off")
    translate: float = Field(0.1, ge=0.0, le=0.5, description="random shift, fraction of the image side")
    rotate: float = Field(10.0, ge=0.0, le=180.0, description="random rotation, degrees")
    scale: PositiveRange = (0.9, 1.1)
    hflip: bool = False
    crop_scale: UnitRange | None = Field(
        None,
        description="RandomResizedCrop area range from the stored image, e.g. [0.08, 1.0] (the reference, "
        "for photos); null: random shift/rotation/zoom (translate, rotate, scale), then the evaluation crop",
    )
    randaug: str = Field(
        "",
        description="timm RandAugment spec, e.g. rand-m9-mstd0.5-inc1; empty = off (runs per image on the "
        "host, in num_workers loader processes)",
    )
    random_erase: float = Field(0.0, ge=0.0, le=1.0, description="RandomErasing probability")
    global_pool: Literal["avg", "token"] = "avg"
    linprobe_epochs: int = Field(100, ge=1)
    linprobe_lr: float = Field(0.1, gt=0.0, description="linear probe base lr: lr = linprobe_lr * batch / 256")
    linprobe_optimizer: Literal["lars", "adamw"] = Field("lars", description="lars: the reference's linear probe")
    linprobe_pool: Literal["token", "avg"] = Field(
        "token", description="token: the [CLS] token after the pre-trained norm (the reference); avg: patch mean"
    )
    eval_every: int = Field(5, ge=1, description="validate every N epochs (and at the end)")
    device: DeviceName = "auto"
    amp: Precision = "auto"
    fast: Switch = Field(
        "auto",
        description="labelled images resident on the device (when they fit and randaug is off) and "
        "torch.compile; auto: on with CUDA (the same batches and math)",
    )
    num_workers: LoaderWorkers = Field(
        "auto",
        description="host loader processes (they read the labelled images and run RandAugment) when the "
        "images are not on the device; auto: 0 on CPU, up to 8 per GPU process on CUDA",
    )
    nproc_per_node: AutoCount = Field(
        1,
        description="DDP processes of the final fine-tuning and the scratch baseline (trials run one each); "
        "auto: one per visible GPU; each takes batch_size, the lr follows the effective batch",
    )
    seed: int = Field(0, ge=0)
    save_every: int = Field(10, ge=1)

    _given: frozenset[str] = PrivateAttr(default=frozenset())  # keys set explicitly, not by the recipe

    @model_validator(mode="wrap")
    @classmethod
    def _recipe_defaults(cls, data: Any, handler: ModelWrapValidatorHandler[FinetuneConfig]) -> FinetuneConfig:
        if isinstance(data, dict) and data.get("recipe", "reference") in RECIPES:
            recipe = RECIPES[data.get("recipe", "reference")]
            if data.get("init") == "scratch":
                recipe = {**recipe, "layer_decay": SCRATCH_LAYER_DECAY}
            model = handler({**recipe, **data})
            model._given = frozenset(data)
            return model
        return handler(data)

    def with_params(self, params: dict[str, Any]) -> FinetuneConfig:
        """These params with ``params`` set on top (a search's choice, a baseline's change). A
        ``recipe`` among them brings its own defaults for the augmentation keys not set
        explicitly, as a recipe in params.yaml does; so does ``init: scratch`` (its layer decay)."""
        values = self.model_dump()
        if "recipe" in params or params.get("init") == "scratch":
            values = {k: v for k, v in values.items() if k in self._given or k not in RECIPES[self.recipe]}
        model = FinetuneConfig.model_validate({**values, **params})
        model._given = self._given | set(params)
        return model

    auto_resume: bool = True
    out_dir: str = "models/finetune"
    checkpoint_dir: str = "checkpoints/finetune"
    reports_dir: str = "reports/finetune"


class SearchDim(_Section):
    """One tuned knob: a float range (log-uniform when ``log``) or a list of choices."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[float | int | str | bool] | None = None

    @model_validator(mode="after")
    def _range_or_choices(self) -> SearchDim:
        if self.choices is not None:
            if not self.choices or self.low is not None or self.high is not None:
                raise ValueError("give either non-empty choices or low/high, not both")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError("needs low < high (or choices)")
        elif self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


TUNABLE = ("recipe", "base_lr", "layer_decay", "weight_decay", "drop_path", "label_smoothing", "mixup", "cutmix",
           "translate", "rotate", "random_erase", "warmup_epochs")  # fmt: skip


def _default_space() -> dict[str, SearchDim]:
    return {
        # a few hundred labels rarely want the reference's photo augmentation: the search decides
        "recipe": SearchDim(choices=["small-data", "reference"]),
        "base_lr": SearchDim(low=3e-4, high=1e-2, log=True),
        "layer_decay": SearchDim(low=0.5, high=0.95),
        "weight_decay": SearchDim(low=0.01, high=0.3, log=True),
        "drop_path": SearchDim(low=0.0, high=0.3),
    }


class HpoConfig(_Section):
    enabled: bool = True
    n_trials: int = Field(10, ge=1)
    timeout_s: float | None = Field(None, gt=0.0, description="stop starting trials after this long")
    epochs: int = Field(20, ge=1, description="epochs per trial")
    workers: AutoCount = Field(
        1,
        description="local worker processes sharing the study; auto: one per visible GPU, each pinned to its own "
        "(CUDA_VISIBLE_DEVICES), 1 on a CPU. With GPUs, N workers take them in turn",
    )
    storage: str = Field("sqlite:///optuna/finetune.db", description="SQLAlchemy URL (PostgreSQL for many machines)")
    study_name: str = "mae-ops-finetune"
    seed: int = Field(0, ge=0)
    pruner: Literal["median", "hyperband", "none"] = "median"
    startup_trials: int = Field(3, ge=0, description="trials run in full before pruning starts")
    warmup_epochs: int = Field(4, ge=0, description="epochs a trial runs before it may be pruned")
    retrain: bool = Field(True, description="retrain with the best params for finetune.epochs (else keep the trial)")
    trial_dir: str = Field(
        "checkpoints/finetune/hpo", description="trial models when retrain is false: a disk every worker shares"
    )
    space: dict[str, SearchDim] = Field(default_factory=_default_space)
    reports_dir: str = "reports/hpo"

    @field_validator("storage")
    @classmethod
    def _no_password(cls, v: str) -> str:
        if redact(v) != v:
            raise ValueError(
                "holds a password, which would be written to params.yaml, dvc.lock, the registry and the "
                "flow's records: leave it out of the URL and set PGPASSWORD or ~/.pgpass (PostgreSQL), "
                f"or {STORAGE_PASSWORD_ENV}"
            )
        return v

    @field_validator("space")
    @classmethod
    def _known_knobs(cls, v: dict[str, SearchDim]) -> dict[str, SearchDim]:
        unknown = sorted(set(v) - set(TUNABLE))
        if unknown:
            raise ValueError(f"cannot tune {unknown}; tunable finetune keys: {list(TUNABLE)}")
        return v


class EvaluateConfig(_Section):
    baseline: Literal["scratch", "none"] = "scratch"
    linprobe: bool = True
    classical: bool = Field(True, description="logistic regression / k-NN on raw pixels, k-NN on MAE features")
    batch_size: int = Field(256, ge=1)
    device: DeviceName = "auto"
    baselines_dir: str = "models/baselines"
    baselines_reports_dir: str = "reports/baselines"
    near_duplicates: float | None = Field(
        0.995,
        ge=-1.0,
        le=1.0,
        description="report pairs of images in different splits whose pre-trained encoder "
        "features have at least this cosine similarity (reports/data/near_duplicates.csv); null = off",
    )
    reports_dir: str = "reports/eval"
    data_reports_dir: str = "reports/data"
    metrics_file: str = "reports/metrics.json"


class ExportConfig(_Section):
    opset: int = Field(18, ge=17, le=23)
    fuse: bool = Field(True, description="onnxruntime's transformer fusions (attention, LayerNorm, GELU)")
    quantize: bool = Field(True, description="also publish an int8 model (dynamic or static, gated on accuracy)")
    per_channel: bool = Field(False, description="per-channel weights for dynamic int8 (static int8 always is)")
    calibration_images: int = Field(256, ge=0, description="training images calibrating static int8; 0 = off")
    max_int8_drop: float = Field(0.01, ge=0.0, le=1.0, description="largest allowed validation top-1 loss of int8")
    benchmark_runs: int = Field(200, ge=0, description="timed batch-1 runs per model in the stage's benchmark; 0 = off")
    openvino: bool = Field(
        True, description="when the openvino package is installed: time it as the peer and serve with it where faster"
    )
    seed: int = Field(0, ge=0)
    fp16: bool = Field(False, description="also publish an fp16 model for GPU serving")
    encoder: bool = Field(True, description="also export the pre-trained encoder as a feature extractor")
    external_data_mb: int = Field(
        1536, ge=0, description="weights above this go to <name>.onnx.data beside each model (protobuf's 2 GiB limit)"
    )
    max_abs_diff: float = Field(1e-4, gt=0.0, description="parity gate on logits, fp32")
    threads: int = Field(2, ge=1)
    out_dir: str = "models/export"
    reports_dir: str = "reports/export"


class RetrainConfig(_Section):
    schedule: str = Field("0 3 * * 1", description="cron schedule of the retraining deployment")
    deployment: str = "mae-ops-retrain"
    promote_tolerance: float = Field(0.0, ge=0.0, le=1.0, description="challenger may be this much worse")
    registry_dir: str = "registry"
    dvc_remote: str = Field(
        "dvc-store", description="folder (relative to the project) or URL to `dvc push` to after a run; empty = no push"
    )
    commit_lock: bool = Field(True, description="git-commit dvc.lock, params and reports after a run")

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str) -> str:
        if len(v.split()) not in (5, 6):
            raise ValueError("must be a cron expression with 5 fields, e.g. '0 3 * * 1'")
        return v


class StudyConfig(_Section):
    """`mae-ops study`: pre-training settings swept one at a time from the params above, each
    a DVC experiment of the pipeline scored without the full fine-tuning budget (the
    monitor's k-NN and linear probe, a short fine-tune without search)."""

    sweeps: dict[str, list[Any]] = Field(
        default_factory=lambda: {
            "pretrain.mask_ratio": [0.25, 0.5, 0.75, 0.9],
            "pretrain.epochs": [5, 10, 20, 40],
            "model.decoder_depth": [1, 2, 4],
            "pretrain.norm_pix_loss": [False, True],
        },
        description="params key -> values; every other key as in the params",
    )
    finetune_epochs: int = Field(15, ge=0, description="a short fine-tune per setting (0: k-NN and linear probe only)")
    finetune_warmup_epochs: float | None = Field(
        None, ge=0.0, description="the short fine-tune's warm-up; null: finetune.warmup_epochs scaled to its length"
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0], min_length=1,
        description="each setting pre-trained and probed once per seed (pretrain.seed, finetune.seed); "
        "tables show the mean, the checks pair every seed's predictions image by image",
    )  # fmt: skip
    knn_k: int = Field(
        20,
        ge=1,
        description="k of `mae-ops probe`'s k-NN (fixed: no choice made on the validation "
        "split); the study's k-NN is the pre-training monitor's (k = 20)",
    )
    reports_dir: str = "reports/study"

    @field_validator("sweeps")
    @classmethod
    def _known_keys(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            section, _, name = key.partition(".")
            if section not in ("pretrain", "model") or not name:
                raise ValueError(f"{key!r}: sweep pretrain.* or model.* keys (pre-training settings)")
            if not values:
                raise ValueError(f"{key!r}: give at least one value")
        return v


class Config(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    hpo: HpoConfig = Field(default_factory=HpoConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)
    study: StudyConfig = Field(default_factory=StudyConfig)

    @model_validator(mode="before")
    @classmethod
    def _recipe_layer_decay(cls, data: Any) -> Any:
        """The reference recipe's layer decay depends on the model (0.65 for ViT-L; none from scratch)."""
        if not isinstance(data, dict):
            return data
        ft, preset = data.get("finetune"), (data.get("model") or {}).get("preset")
        reference = isinstance(ft, dict) and ft.get("recipe", "reference") == "reference"
        if reference and ft.get("init") != "scratch" and "layer_decay" not in ft and preset in RECIPE_LAYER_DECAY:
            return {**data, "finetune": {**ft, "layer_decay": RECIPE_LAYER_DECAY[preset]}}
        return data

    @model_validator(mode="after")
    def _image_fits_patches(self) -> Config:
        patch = int(preset_config(self.model.preset)["patch_size"])
        if self.data.img_size % patch:
            raise ValueError(
                f"data.img_size ({self.data.img_size}) must be divisible by the patch size "
                f"({patch}) of model.preset {self.model.preset!r}"
            )
        patches = (self.data.img_size // patch) ** 2
        visible = int(patches * (1 - self.pretrain.mask_ratio))  # as the MAE keeps them
        if visible < 1:
            raise ValueError(
                f"pretrain.mask_ratio ({self.pretrain.mask_ratio:g}) leaves {visible} of {patches} patches visible "
                f"at data.img_size {self.data.img_size} with patch {patch}: the encoder would see nothing; "
                f"use at most {1 - 1 / patches:.4f}"
            )
        return self

    def outputs(self, root: str | Path = ".") -> Outputs:
        """The files the stages hand to each other, the pipeline's summary and the registry,
        under ``root`` (absolute paths in the params stay as they are)."""
        d, p, f, h, e, x = self.data, self.pretrain, self.finetune, self.hpo, self.evaluate, self.export
        at = Path(root)
        return Outputs(
            prepared=at / d.out_dir, manifest=at / d.out_dir / "manifest.json",
            encoder=at / p.out_dir / "encoder.pth", pretrain_metrics=at / p.reports_dir / "metrics.json",
            reconstruction_png=at / p.reports_dir / "reconstruction.png", loss_png=at / p.reports_dir / "loss.png",
            finetune_model=at / f.out_dir / "model.pth", finetune_metrics=at / f.reports_dir / "metrics.json",
            learning_curve_png=at / f.reports_dir / "learning_curve.png",
            hpo_best=at / h.reports_dir / "best_params.json",
            hpo_history_png=at / h.reports_dir / "optimization_history.png",
            baselines_metrics=at / e.baselines_reports_dir / "metrics.json", metrics=at / e.metrics_file,
            deployed=at / e.reports_dir / "deployed.json", confusion_png=at / e.reports_dir / "confusion_matrix.png",
            model_onnx=at / x.out_dir / "model.onnx", int8_onnx=at / x.out_dir / "model.int8.onnx",
            encoder_onnx=at / x.out_dir / "encoder.onnx", parity=at / x.reports_dir / "parity.json",
            benchmark=at / x.reports_dir / "benchmark.json",
        )  # fmt: skip

    def section_hash(self, *sections: str) -> str:
        """Stable short hash of some sections, used to match checkpoints to runs."""
        payload = {s: getattr(self, s).model_dump(mode="json") for s in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Outputs:
    """Where each stage leaves what others read: the one home of these paths (``Config.outputs``;
    tests check that dvc.yaml tracks each under the stage that writes it)."""

    prepared: Annotated[Path, "prepare"]
    manifest: Annotated[Path, "prepare"]
    encoder: Annotated[Path, "pretrain"]
    pretrain_metrics: Annotated[Path, "pretrain"]
    reconstruction_png: Annotated[Path, "pretrain"]
    loss_png: Annotated[Path, "pretrain"]
    finetune_model: Annotated[Path, "finetune"]
    finetune_metrics: Annotated[Path, "finetune"]
    learning_curve_png: Annotated[Path, "finetune"]
    hpo_best: Annotated[Path, "finetune"]  # the search runs inside the finetune stage
    hpo_history_png: Annotated[Path, "finetune"]
    baselines_metrics: Annotated[Path, "baselines"]
    metrics: Annotated[Path, "evaluate"]  # every model's test top-1
    deployed: Annotated[Path, "evaluate"]  # the model to ship, chosen on validation
    confusion_png: Annotated[Path, "evaluate"]
    model_onnx: Annotated[Path, "export"]
    int8_onnx: Annotated[Path, "export"]
    encoder_onnx: Annotated[Path, "export"]
    parity: Annotated[Path, "export"]
    benchmark: Annotated[Path, "export"]

    def of_stage(self, stage: str) -> dict[str, Path]:
        """The outputs written by ``stage`` (each field's annotation names its stage)."""
        hints = get_type_hints(Outputs, include_extras=True)
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if hints[f.name].__metadata__[0] == stage
        }

    @property
    def pictures(self) -> list[Path]:
        return [self.reconstruction_png, self.loss_png, self.learning_curve_png, self.hpo_history_png,
                self.confusion_png]  # fmt: skip


def project_outputs(repo: Path) -> Outputs:
    """The outputs of the project at ``repo``, by its params.yaml (the defaults without one)."""
    params = repo / "params.yaml"
    return (load_params(params) if params.exists() else Config()).outputs(repo)


# --------------------------------------------------------------------- loading
def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "params"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            parent = _section_model(e["loc"][:-1])
            if parent is not None:
                msg += f"; allowed keys: {', '.join(parent.model_fields)}"
            lines.append(f"  {key}: {msg}")
            continue
        got = e.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(redact(f"  {key}: {msg}{shown}"))
    return "invalid params:\n" + "\n".join(lines)


def _section_model(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a params dict."""
    out = json.loads(json.dumps(raw))  # deep copy of plain data
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ParamsError(f"invalid override {item!r}: expected section.key=value")
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ParamsError(f"invalid override {item!r}: {part} is not a section")
            node = nxt
        try:
            node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as exc:
            raise ParamsError(f"invalid override {item!r}: cannot parse value ({exc})") from exc
    return out


def validate(raw: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(_format_errors(exc)) from None


def load_params(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read params.yaml (missing file = all defaults), apply overrides, validate."""
    path = Path(path) if path is not None else DEFAULT_PARAMS
    raw: Any = {}
    if path.exists():
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ParamsError(f"cannot parse {path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ParamsError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    elif path != DEFAULT_PARAMS:
        raise ParamsError(f"params file not found: {path}")
    return validate(apply_overrides(raw, overrides or []))
