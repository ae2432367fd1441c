#!/usr/bin/env bash
# Continued pre-training against pre-training from scratch, at equal epochs, on the
# CIFAR-10 subset (the README's "Continue pre-training from existing weights"):
#   bash benchmarks/continue_study.sh FOLDER [WORK] [--set key=value ...]
# FOLDER holds train/<class>/*.jpg and test/<class>/*.jpg. The "existing weights" are
# an MAE pre-trained for 16 epochs on the training images of the first five classes
# (airplane .. deer); the target is the other five (dog .. truck), whose images that MAE
# never saw.
# `mae-ops study` then pre-trains on the target's training images for 8 epochs twice,
# from scratch and from those weights (--sweep pretrain.init), seeds 0 and 1, and scores
# both on the target's validation split with the same probes (k-NN, linear probe, a
# 15-epoch fine-tune). About 20 minutes on 2 CPU cores.
# Results: WORK/project/reports/study/{summary.md,results.csv,results.json,*.png}.
set -euo pipefail
src=$(realpath "${1:?usage: continue_study.sh FOLDER [WORK] [--set key=value ...]}"); shift
work=$(realpath -m "${1:-work/continue-cifar10}"); shift $(( $# >= 1 ? 1 : 0 ))
mapfile -t classes < <(ls "$src/train" | sort)
mkdir -p "$work/source" "$work/target"
for i in "${!classes[@]}"; do
  c=${classes[$i]}
  if (( i < ${#classes[@]} / 2 )); then  # hard links: no copy of the pictures
    [ -d "$work/source/$c" ] || cp -al "$src/train/$c" "$work/source/$c"
  else
    for split in train test; do
      [ -d "$work/target/$split/$c" ] || { mkdir -p "$work/target/$split"; cp -al "$src/$split/$c" "$work/target/$split/$c"; }
    done
  fi
done
common=(--set data.img_size=32 --set data.crop_pct=1 --set model.preset=mae_vit_tiny_patch4
        --set pretrain.warmup_epochs=1 --set "pretrain.crop_scale=[0.2, 1.0]" --set pretrain.hflip=true)
cd "$(dirname "$0")/.."  # the project: the study runs its flow from there

# the existing weights: the first five classes' training images, no split held out
mae-ops prepare --params params.yaml "${common[@]}" --set "data.source=$work/source" --set data.test_fraction=0 \
    --set data.val_fraction=0 --set "data.out_dir=$work/source-data"
mae-ops pretrain --params params.yaml "${common[@]}" --set "data.out_dir=$work/source-data" --set pretrain.epochs=16 \
    --set "pretrain.out_dir=$work/source-model" --set "pretrain.checkpoint_dir=$work/source-model/checkpoints" \
    --set "pretrain.reports_dir=$work/source-reports"

# the target: the other five classes, from scratch and continued, at equal epochs
sets=("${common[@]}" --set "data.source=$work/target" --set data.val_fraction=0.2 --set pretrain.epochs=8
      --set finetune.recipe=small-data --set finetune.hflip=true --set study.finetune_epochs=15
      --set "study.seeds=[0, 1]" "$@")
# the study in a project of its own (a clone of this one): its DVC experiments live there
repo=$(pwd)
[ -d "$work/project/.git" ] || git clone -q "$repo" "$work/project"
cd "$work/project"
mae-ops study "${sets[@]}" --sweep "pretrain.init=null,$work/source-model/mae.pth"
