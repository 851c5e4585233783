#!/usr/bin/env bash
# One prepared run on a GPU machine (the `device` tool, 15 minutes of device time in all):
# the CUDA tests, then issue 11's GPU figures, each part under its own time limit so that one
# slow part cannot use up the rest (570 s in all: one command within the device's 10
# minutes). Figures go to stdout and to $OUT/gpu_check.log.
#
# The device image has torch (CUDA), numpy, scipy, matplotlib, h5py, hypothesis and pytest;
# poplds's other dependencies travel as wheels (Python 3.12), fetched here beforehand:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl zarr==3.1.6 numcodecs donfig crc32c \
#     typing_extensions dask toolz cloudpickle partd locket fsspec pynwb hdmf ruamel.yaml \
#     jsonschema referencing rpds-py attrs jsonschema-specifications pandas
# and then, with carry [".whl"]:
#   run: bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-/tmp/poplds-gpu}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:src
else
  export PYTHONPATH=src
fi
export PYTHONUNBUFFERED=1
log="$OUT/gpu_check.log"
part() {  # part SECONDS NAME COMMAND...
  local limit=$1 name=$2
  shift 2
  echo "## $name (limit ${limit} s)" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | grep -v "INFO" | tee -a "$log"
}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$log"
part 90 "CUDA tests" python3 -m pytest -q -x tests -k "cuda"
# N = 1e6, T = 1e4 held in GPU memory (two recordings of 550 000 neurons x 5000 steps)
part 170 "scale, in GPU memory" python3 benchmarks/bench_stitched.py scale \
  --neurons 1000000 --time 10000 --device cuda --max-passes 500 --workdir /tmp/s1
# the same streamed from the store
part 140 "scale, streamed" python3 benchmarks/bench_stitched.py scale \
  --neurons 1000000 --time 10000 --device cuda --max-passes 500 --stream --reuse --workdir /tmp/s1
# N = 1e7 streamed: T = 1000 (two recordings of 500 steps; 22 GB of float32, stored raw by the
# `auto` codec), because the machine's 64 GB disk cannot hold T = 2000 (44 GB) beside the rest;
# the 1e6 store goes first
rm -rf /tmp/s1
part 110 "scale, 1e7 neurons streamed" python3 benchmarks/bench_stitched.py scale \
  --neurons 10000000 --time 1000 --device cuda --max-passes 100 --stream --workdir /tmp/s2
part 60 "N-PLDS, 1000 neurons x 1000 trials x 100 bins, k = 10" \
  python3 benchmarks/bench_nplds.py large --neurons 1000 --trials 1000 --bins 100 --k 10
