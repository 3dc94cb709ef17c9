#!/usr/bin/env bash
# Make faiss-gpu the only FAISS in this environment (run after `pip install .[gpu]` on GPU nodes).
#
# faiss-cpu (a default dependency) and faiss-gpu (the `gpu` extra) both ship the `faiss` module. Installed
# side by side, whichever unpacked last wins, and leftover CPU-only files (e.g. `_swigfaiss_avx512.so`,
# which faiss's loader prefers on AVX-512 machines) can shadow the GPU build. Uninstall both, then install
# the GPU wheel alone.
set -euo pipefail
version="${FAISS_VERSION:-1.15.1}"
python -m pip uninstall -y faiss-cpu faiss-gpu >/dev/null
python -m pip install --quiet --no-deps "faiss-gpu==${version}"
python -c "import faiss; print('faiss', faiss.__version__, 'GPU build:', hasattr(faiss, 'StandardGpuResources'))"
