#!/usr/bin/env bash
# Everything this project checks and times on a GPU, in one go, most important first.
#
#   bash bench/gpu_suite.sh [OUT]        (OUT: results folder, default bench/results/gpu)
#
# Needs CUDA and the package importable (pip install -e ".[dev,sevennet]" with a CUDA build of
# torch). Steps: the GPU tests (CUDA against CPU, float32 against float64, equivariance on
# CUDA, batched calls, a fine-tune on CUDA whose delta reproduces on the CPU, device neighbour
# lists against matscipy's); graph building with host against device neighbour lists
# (speed_neighbours.py, seconds); torch.compile of
# the MACE-MP-0-medium-shaped model (float32, then float64) and of SevenNet-0 against eager
# SparseCalc and the backend's own calculator in the same rounds, at 512 and 64 atoms (512
# first: the size closest to the 0.5 target); the speed suite, which then writes the "Speed on
# a GPU" section of docs/benchmarks.md from OUT (compile results included). About 20 minutes
# on an H100, three of them compiling per model; where one command may run 10 minutes at most,
# run the steps as separate commands. A step that fails does not stop the ones after it; the
# exit status is that of the last failure.
set -u
out=${1:-bench/results/gpu}
status=0
run() { echo "== $(date +%T) $*"; "$@" || status=$?; }

run python -m pytest -q -rs tests/test_gpu.py tests/test_calculator.py tests/test_fast_path.py tests/test_device_neighbours.py -k "cuda or gpu or cueq"
run python bench/speed_neighbours.py --device cuda --out "$out"
run python bench/speed_compile.py --model medium --dtype float32 --device cuda --supercells 4 2 --calls 10 --out "$out"
run python bench/speed_compile.py --model sevennet --device cuda --supercells 4 2 --calls 10 --out "$out"
run python bench/speed_compile.py --model medium --device cuda --supercells 4 2 --calls 10 --out "$out"
run python bench/speed_all.py --device cuda --out "$out" --docs
exit $status
