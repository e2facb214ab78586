#!/bin/bash
# The small-scale comparisons of issues 5-8 and the evaluate-cost benchmark of issue 3, one after another
# (never in parallel: two jobs on two cores distort every timing). About 1.5-2 hours on 2 CPU cores.
set -e
cd "$(dirname "$0")/.."
export RBLAB_DATA=${RBLAB_DATA:-../shared/data}
PY=${PY:-.venv/bin/python}
BIN=$(dirname "$PY")
mkdir -p experiments/results
$PY benchmarks/bench_attacks.py evaluate --suite hfat --n 1000 > experiments/results/bench_evaluate_hfat.json
$BIN/rblab-study experiments/studies/hfat.yaml
$BIN/rblab-study experiments/studies/hfat_steps.yaml
$BIN/rblab-study experiments/studies/dynat.yaml
$BIN/rblab-study experiments/studies/f2at.yaml
$PY experiments/afa_cifar.py
