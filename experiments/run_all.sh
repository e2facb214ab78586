#!/bin/bash
# The evaluate-cost benchmark of issue 3, then the five 3-seed studies of issue 27, one after another. Each study runs
# rblab-study's default of one single-thread run per core. The studies' runs took about 14 job-hours when measured
# (2026-12-07, with one to three jobs sharing the 2 cores), so roughly 7-8 hours of wall time on 2 CPU cores. Never start
# a second copy beside it, because it would share the cores and distort every timing. A stopped study resumes when
# it is run again.
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
$BIN/rblab-study experiments/studies/afa.yaml
