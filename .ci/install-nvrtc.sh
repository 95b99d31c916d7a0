#!/usr/bin/env bash
# Installs NVRTC from NVIDIA's `nvidia-cuda-nvrtc` wheel, so CI (no GPU, no CUDA toolkit) can
# compile every kernel. Pinned to CUDA 13.0, the GPU machine's toolkit and driver (580).
# Prints one line on stdout, for `eval "$(bash .ci/install-nvrtc.sh)"`:
#   export EP_NVRTC_PATH=<folder holding libnvrtc.so.13>
# Installs into $EP_NVRTC_DIR (default: .whl/nvrtc in the repository, git-ignored);
# does nothing when that version is already there.
set -euo pipefail
version=13.0.88
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${EP_NVRTC_DIR:-$root/.whl/nvrtc}
lib=$dest/nvidia/cu13/lib
if [ ! -f "$lib/libnvrtc.so.13" ] || [ ! -d "$dest/nvidia_cuda_nvrtc-$version.dist-info" ]; then
  command -v python3 >/dev/null || { echo "install-nvrtc: python3 is needed to install the wheel" >&2; exit 1; }
  rm -rf "$dest"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --target "$dest" \
    "nvidia-cuda-nvrtc==$version" >&2
fi
[ -f "$lib/libnvrtc.so.13" ] || { echo "install-nvrtc: $lib/libnvrtc.so.13 missing after install" >&2; exit 1; }
echo "export EP_NVRTC_PATH=$lib"
