#!/usr/bin/env bash
# Installs what the repo needs on a fresh machine: the Python packages (pinned by constraints.txt) and,
# when run as root, Fashion-MNIST from its Debian package. Safe to run again: it skips what is present.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" - <<'PY' 2>/dev/null
import importlib.metadata as md, re, sys
pins = dict(re.match(r"([A-Za-z0-9_.-]+)==(\S+)", l).groups()
            for l in open("constraints.txt") if re.match(r"[A-Za-z0-9_.-]+==", l))
sys.exit(any(md.version(name) != version for name, version in pins.items()))
PY
then
    echo "[setup] installing Python packages (requirements.txt, pinned by constraints.txt)"
    "$PYTHON" -m pip install -q --disable-pip-version-check -r requirements.txt -c constraints.txt
fi

FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        echo "[setup] installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
        apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null
    else
        echo "[setup] Fashion-MNIST is not installed and this is not root: run 'sudo apt-get install" \
             "dataset-fashion-mnist', or let torchvision download it where internet exists." >&2
    fi
fi
