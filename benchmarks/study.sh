#!/usr/bin/env bash
# The pre-training studies in the README ("Is pre-training worth it on my data?"),
# each in a project of its own under WORK; stop one and run it again to resume.
#   bash benchmarks/study.sh digits [WORK] [--set key=value ...]
#       the embedded digits: 5 pre-training epochs as the base (quick, but still on the
#       digits' loss plateau), 15 and 40 epochs (the demo's) to show it, a 10-epoch
#       fine-tune, 9 settings (about 9 minutes on 2 CPU cores)
#   bash benchmarks/study.sh cifar10 FOLDER [WORK] [--set key=value ...]
#       FOLDER holds train/<class>/*.jpg and test/<class>/*.jpg (the CIFAR-10 subset):
#       32 px, 8 pre-training epochs as the base, a 15-epoch fine-tune, 20 % of the
#       training images for validation, seeds 0 and 1, 18 runs (about 100 minutes on 2 CPU cores)
# Results: WORK/project/reports/study/{summary.md,results.csv,results.json,*.png}; each setting is a
# DVC experiment of WORK/project (`dvc exp show` there).
set -euo pipefail
which=${1:?usage: study.sh digits|cifar10 [FOLDER] [WORK] [--set key=value ...]}
shift
case "$which" in
  digits)
    work=$(realpath -m "${1:-work/study-digits}"); shift $(( $# >= 1 ? 1 : 0 ))
    sets=(--set data.source=mnist-5k --set pretrain.epochs=5 --set pretrain.warmup_epochs=1 --set study.finetune_epochs=10)
    sweeps=(--sweep pretrain.mask_ratio=0.25,0.5,0.75,0.9 --sweep pretrain.epochs=5,15,40
            --sweep model.decoder_depth=1,2,4 --sweep pretrain.norm_pix_loss=false,true) ;;
  cifar10)
    src=$(realpath "${1:?usage: study.sh cifar10 FOLDER [WORK] [--set key=value ...]}"); shift
    work=$(realpath -m "${1:-work/study-cifar10}"); shift $(( $# >= 1 ? 1 : 0 ))
    sets=(--set "data.source=$src" --set data.img_size=32 --set data.crop_pct=1 --set data.val_fraction=0.2
          --set pretrain.epochs=8 --set pretrain.warmup_epochs=1 --set "pretrain.crop_scale=[0.2, 1.0]"
          --set pretrain.hflip=true --set finetune.recipe=small-data --set finetune.hflip=true
          --set study.finetune_epochs=15 --set "study.seeds=[0, 1]")
    sweeps=(--sweep pretrain.mask_ratio=0.25,0.5,0.75,0.9 --sweep pretrain.epochs=4,8,16
            --sweep model.decoder_depth=1,2,4 --sweep pretrain.norm_pix_loss=false,true) ;;
  *) echo "usage: study.sh digits|cifar10 [FOLDER] [WORK] [--set key=value ...]" >&2; exit 2 ;;
esac
repo=$(cd "$(dirname "$0")/.." && pwd)
# a project of its own (a clone of this one): the study's DVC experiments live in its git and
# its DVC cache, and the demo's data/, models/ and reports/ stay as they are
[ -d "$work/project/.git" ] || git clone -q "$repo" "$work/project"
cd "$work/project"
mae-ops study "${sets[@]}" "$@" "${sweeps[@]}"
