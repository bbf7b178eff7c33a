#!/usr/bin/env bash
# Installs what the repo needs on a fresh machine: the Python packages (pinned by constraints.txt), the repo itself
# as an editable package and, when run as root, Fashion-MNIST from its Debian package. Safe to run again: it skips
# what is present.
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

# The repo itself, installed editable so that `python tools/X.py` imports its packages without path edits. An
# editable install points the environment at one clone: install again when `engine` resolves to another clone.
CLONE=$(pwd -P)
INSTALLED=$(cd / && "$PYTHON" -c 'import importlib.util as u; s = u.find_spec("engine"); print(s.origin if s else "")' \
            2>/dev/null || true)
if [ "$INSTALLED" != "$CLONE/engine/__init__.py" ]; then
    echo "[setup] installing this clone ($CLONE) as an editable package${INSTALLED:+ (was: ${INSTALLED%/engine/__init__.py})}"
    ISOLATION=--no-build-isolation  # setuptools present: build offline with it
    "$PYTHON" -c "import setuptools" 2>/dev/null || ISOLATION=
    "$PYTHON" -m pip install -q --disable-pip-version-check --no-deps $ISOLATION -e .
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
