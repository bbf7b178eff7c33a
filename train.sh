#!/usr/bin/env bash
# bash train.sh                 the offline demo: RSD from the shipped ConvNeXt teacher to a DeiT student on
#                               Fashion-MNIST, on CPU (installs what is missing first)
# bash train.sh --flag ...      the demo with overrides, e.g. `bash train.sh --distiller vanilla` (no teacher)
# bash train.sh N -c PRESET [args]
#                               a config (e.g. a paper pair of configs/presets/) on N GPUs via torchrun, with
#                               just the given arguments; DATA_DIR, when set, is passed as the data folder
# bash train.sh N [args]        the paper's default pair (Swin-T -> ResNet18, CIFAR-100, RSD) on N GPUs via
#                               torchrun; DATA_DIR and TEACHER_CKPT override the default paths
set -euo pipefail
cd "$(dirname "$0")"

if [ $# -eq 0 ] || [[ "$1" == -* ]]; then
    bash tools/setup_env.sh
    exec python3 train.py --config configs/demo/rsd.yaml "$@"
fi

if ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: the first argument must be the number of GPUs (e.g. bash train.sh 8), got '$1'" >&2
    exit 2
fi
NPROC=$1
shift

for arg in "$@"; do
    if [[ "$arg" == -c* || "$arg" == --config || "$arg" == --config=* ]]; then
        exec torchrun --nproc_per_node "$NPROC" train.py ${DATA_DIR:+"$DATA_DIR"} "$@"
    fi
done

DATA_DIR=${DATA_DIR:-data/cifar100}
TEACHER_CKPT=${TEACHER_CKPT:-pretrained/swin_tiny_patch4_window7_224_cifar100.pth}
exec torchrun --nproc_per_node "$NPROC" train.py "$DATA_DIR" --config configs/cifar/cnn.yaml \
    --model resnet18 --teacher swin_tiny_patch4_window7_224 --teacher-pretrained "$TEACHER_CKPT" \
    --num-classes 100 --distiller rsd "$@"
