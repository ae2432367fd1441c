"""Stage `export`: the fine-tuned classifier -> models/export/ as ONNX, gated on parity.

Outputs:
  models/export/model.onnx       fp32 classifier, dynamic batch, one file, metadata inside
  models/export/model.int8.onnx  dynamic int8 quantization (``export.quantize``)
  models/export/model.fp16.onnx  optional fp16 variant for GPU serving (``export.fp16``)
  models/export/encoder.onnx     the pre-trained encoder as a feature extractor, [batch, embed_dim]
  reports/export/parity.json     onnxruntime vs PyTorch on the whole test split
Every file is written under a temporary name and renamed only after its gate
passes, so a failed export leaves the previous models untouched.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.shape_inference import quant_pre_process
from timm.models.vision_transformer import VisionTransformer

from mae_ops import __version__
from mae_ops.atomic import write_json
from mae_ops.config import Config, InputError
from mae_ops.data import PreparedData
from mae_ops.errors import UserError
from mae_ops.models.checkpoint import encoder_state_dict, load_state_dict
from mae_ops.models.classifier import load_classifier
from mae_ops.models.presets import preset_config
from mae_ops.reporting import file_sha256
from mae_ops.serving import open_session, run_logits

log = logging.getLogger(__name__)


class ParityError(UserError, RuntimeError):
    """The exported model does not compute what the PyTorch model computes."""


class Deployable(nn.Module):
    """pixels in [0, 1] -> (logits, probabilities); normalisation lives in the graph."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model((pixels - self.mean) / self.std)
        return logits, logits.softmax(dim=-1)


class Features(Deployable):
    """pixels in [0, 1] -> pooled encoder features (batch, embed_dim)."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.model((pixels - self.mean) / self.std)


def encoder_extractor(cfg: Config, data: PreparedData) -> VisionTransformer:
    """The pre-trained encoder as timm's ViT without head: mean of the patch tokens after the final norm."""
    arch = preset_config(cfg.model.preset)
    vit = VisionTransformer(
        img_size=data.img_size, patch_size=int(arch["patch_size"]), in_chans=data.channels, num_classes=0,
        embed_dim=int(arch["embed_dim"]), depth=int(arch["depth"]), num_heads=int(arch["num_heads"]),
        mlp_ratio=float(arch["mlp_ratio"]), qkv_bias=True, global_pool="avg", fc_norm=False,
    )  # fmt: skip
    state = load_state_dict(Path(cfg.pretrain.out_dir) / "encoder.pth")
    vit.load_state_dict(encoder_state_dict(state, grid_size=vit.patch_embed.grid_size[0]), strict=True)
    return vit.eval()


def to_onnx(module: nn.Module, example: torch.Tensor, dest: Path, outputs: list[str], opset: int,
            metadata: dict[str, str]) -> None:  # fmt: skip
    """torch's dynamo exporter with a dynamic batch axis, one self-contained file, checked."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    torch.onnx.export(
        module, (example,), str(dest), input_names=["pixels"], output_names=outputs, opset_version=opset,
        dynamo=True, dynamic_shapes={"pixels": {0: batch}}, external_data=False, optimize=True, verbose=False,
    )  # fmt: skip
    proto = onnx.load(str(dest))
    onnx.helper.set_model_props(proto, metadata)
    onnx.save(proto, str(dest))
    onnx.checker.check_model(str(dest), full_check=True)


def _test_pixels(data: PreparedData) -> tuple[np.ndarray, np.ndarray]:
    ids = data.indices("test")
    if len(ids) == 0:
        raise InputError("the test split is empty: parity needs test images")
    return np.asarray(data.images[ids], dtype=np.float32) / 255.0, data.labels[ids]


def run(cfg: Config) -> dict:
    ex = cfg.export
    torch.set_num_threads(ex.threads)
    model_path = Path(cfg.finetune.out_dir) / "model.pth"
    if not model_path.exists():
        raise InputError(f"{model_path} not found: run `mae-ops finetune` first")
    model, args = load_classifier(model_path)
    data = PreparedData(cfg.data.out_dir)
    pixels, labels = _test_pixels(data)
    deployable = Deployable(model, args["mean"], args["std"]).eval()
    metadata = {
        "classes": json.dumps(args["classes"]), "img_size": str(args["img_size"]), "channels": str(args["in_chans"]),
        "mean": json.dumps(args["mean"]), "std": json.dumps(args["std"]), "input": "pixels: float32 NCHW in [0, 1]",
        "model_sha256": file_sha256(model_path), "params_hash": cfg.section_hash("model", "finetune", "hpo"),
        "data_hash": args.get("data_hash", ""), "mae_ops_version": __version__, "preset": args["preset"],
    }  # fmt: skip

    out, reports = Path(ex.out_dir), Path(ex.reports_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out) as tmp_dir:
        tmp = Path(tmp_dir)
        example = torch.from_numpy(pixels[:2])
        to_onnx(deployable, example, tmp / "model.onnx", ["logits", "probabilities"], ex.opset, metadata)

        # --- parity gate: the whole test split, onnxruntime vs PyTorch -----
        with torch.no_grad():
            ref = torch.cat([deployable(torch.from_numpy(pixels[i : i + 256]))[0] for i in range(0, len(pixels), 256)])
        ref = ref.numpy()
        got = run_logits(open_session(tmp / "model.onnx", "cpu", ex.threads), pixels)
        parity = {
            "num_images": len(pixels),
            "max_abs_diff": float(np.abs(got - ref).max()),
            "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
            "tolerance": ex.max_abs_diff,
            "torch_top1": float((ref.argmax(1) == labels).mean()),
            "onnx_top1": float((got.argmax(1) == labels).mean()),
        }
        parity["passed"] = parity["max_abs_diff"] <= ex.max_abs_diff and parity["top1_agreement"] == 1.0
        write_json(reports / "parity.json", parity)
        if not parity["passed"]:
            raise ParityError(
                f"ONNX parity failed: max |logit diff| {parity['max_abs_diff']:.2e} (allowed {ex.max_abs_diff:.0e}), "
                f"top-1 agreement {parity['top1_agreement']:.4f}; {out} left as it was"
            )
        published = {"model.onnx": tmp / "model.onnx"}

        # --- int8, gated on accuracy ------------------------------------------
        if ex.quantize:
            quant_pre_process(str(tmp / "model.onnx"), str(tmp / "model.pre.onnx"), skip_symbolic_shape=False)
            quantize_dynamic(str(tmp / "model.pre.onnx"), str(tmp / "model.int8.onnx"), weight_type=QuantType.QInt8,
                             per_channel=ex.per_channel)  # fmt: skip
            _copy_metadata(tmp / "model.onnx", tmp / "model.int8.onnx")
            q = run_logits(open_session(tmp / "model.int8.onnx", "cpu", ex.threads), pixels)
            int8_top1 = float((q.argmax(1) == labels).mean())
            parity.update(int8_top1=int8_top1, int8_drop=parity["onnx_top1"] - int8_top1,
                          int8_max_drop=ex.max_int8_drop)  # fmt: skip
            write_json(reports / "parity.json", parity)
            if parity["int8_drop"] > ex.max_int8_drop:
                raise ParityError(
                    f"int8 model loses {parity['int8_drop']:.2%} top-1 (allowed {ex.max_int8_drop:.2%}); "
                    "set export.quantize=false or export.per_channel=true"
                )
            published["model.int8.onnx"] = tmp / "model.int8.onnx"

        if ex.fp16:
            from onnxruntime.transformers.float16 import convert_float_to_float16

            proto = convert_float_to_float16(onnx.load(str(tmp / "model.onnx")), keep_io_types=True)
            onnx.save(proto, str(tmp / "model.fp16.onnx"))
            published["model.fp16.onnx"] = tmp / "model.fp16.onnx"

        # --- the pre-trained encoder as a feature extractor -----------------------
        if ex.encoder:
            extractor = Features(encoder_extractor(cfg, data), args["mean"], args["std"]).eval()
            to_onnx(extractor, example, tmp / "encoder.onnx", ["features"], ex.opset,
                    {**metadata, "output": "features: float32 [batch, embed_dim]"})  # fmt: skip
            with torch.no_grad():
                f_ref = extractor(example).numpy()
            sess = open_session(tmp / "encoder.onnx", "cpu", ex.threads)
            f_got = sess.run(["features"], {"pixels": pixels[:2]})[0]
            parity["encoder_max_abs_diff"] = float(np.abs(f_got - f_ref).max())
            if parity["encoder_max_abs_diff"] > ex.max_abs_diff:
                raise ParityError(f"encoder ONNX parity failed: {parity['encoder_max_abs_diff']:.2e}")
            published["encoder.onnx"] = tmp / "encoder.onnx"

        for name, src in published.items():  # every gate passed: publish
            src.replace(out / name)
        for stale in ("model.int8.onnx", "model.fp16.onnx", "encoder.onnx"):
            if stale not in published:
                (out / stale).unlink(missing_ok=True)
    parity["files"] = {name: (out / name).stat().st_size for name in published}
    write_json(reports / "parity.json", parity)
    log.info("exported %s: max |diff| %.2e, top-1 agreement %.4f", ", ".join(published),
             parity["max_abs_diff"], parity["top1_agreement"])  # fmt: skip
    return parity


def _copy_metadata(src: Path, dest: Path) -> None:
    props = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props}
    proto = onnx.load(str(dest))
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(dest))
