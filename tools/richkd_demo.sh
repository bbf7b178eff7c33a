#!/usr/bin/env bash
# RichKD (L) on the offline demo, next to KD with the same recipe (configs/demo/rsd.yaml: 4 epochs over its
# class-balanced 15,000-image subset of Fashion-MNIST):
#   1. a second source of another family (the CIFAR ResNet-8x4, a ResNet) trained with train.py on the same
#      subset (SOURCE_EPOCHS epochs, no teacher);
#   2. its logits over the subset's clean images cached by tools/build_cache.py;
#   3. the demo student distilled by KD, and by RichKD (L) fusing the shipped ConvNeXt teacher with the cache,
#      run side by side, one core each.
# Prints each run's summary line. OUT (default output/richkd_demo) holds every run; finished steps are skipped
# and an interrupted run is resumed. On a 2-core CPU the source trains at ~100 img/s (about 8 min for 3 epochs).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-output/richkd_demo}
SOURCE_EPOCHS=${SOURCE_EPOCHS:-3}
SUBSET=$(python3 -c "import yaml; print(yaml.safe_load(open('configs/demo/rsd.yaml'))['train_subset'])")
mkdir -p "$OUT"

if ! grep -qs "Done:" "$OUT/source/log.txt"; then  # not finished: --resume auto continues it, or starts it
    python3 train.py -c configs/demo/teacher.yaml --model cifar_resnet8x4 --epochs "$SOURCE_EPOCHS" --drop-path 0 \
        --train-subset "$SUBSET" --output "$OUT" --experiment source --resume auto
fi
if [ -d "$OUT/cache" ] && ! python3 -c "from engine.cache import SourceCache; SourceCache('$OUT/cache')" 2>/dev/null; then
    echo "rebuilding $OUT/cache: written in an older cache format (or unreadable)"
    rm -rf "$OUT/cache"
fi
if [ ! -d "$OUT/cache" ]; then
    python3 tools/build_cache.py --dataset fashion_mnist --train-subset "$SUBSET" --img-size 32 --source cifar_resnet8x4 \
        --weights "$OUT/source/student_last.pth" --store logits --output "$OUT/cache"
fi
run() {  # name, extra train.py flags: skipped when finished, continued (--resume auto) when interrupted
    grep -qs "Done:" "$OUT/$1/log.txt" && return 0
    OMP_NUM_THREADS=1 python3 train.py -c configs/demo/rsd.yaml --output "$OUT" --experiment "$1" --resume auto \
        "${@:2}" > "$OUT/$1.log" 2>&1
}
run kd --distiller kd &
kd=$!
run richkd_L --distiller richkd --richkd-mode L --richkd-cache "$OUT/cache" &
richkd=$!
wait "$kd" || { echo "the KD run failed: see $OUT/kd.log" >&2; exit 1; }
wait "$richkd" || { echo "the RichKD run failed: see $OUT/richkd_L.log" >&2; exit 1; }
grep -h "Done:" "$OUT/source/log.txt" "$OUT/kd/log.txt" "$OUT/richkd_L/log.txt"
