"""How a study's runs should share this machine: a 4-run study (PGD-AT and TRADES x 2 seeds on 1,280 CIFAR-10 images,
small_cnn, 1 epoch) run whole, from fresh run folders, under each execution setting in turn, rounds interleaved (each
round in another order), wall time of the whole study per setting.

    python benchmarks/bench_study.py --rounds 3 > bench_study.json

Settings: run_study's local executor with 1 run at a time and 2 intra-op threads (sequential), with 2 runs at once and
1 thread each (parallel), and the in-process debug executor with 2 threads (sequential, no process per run)."""
import argparse
import json
import os
import platform
import shutil
import tempfile
import time

import torch

from robustbench_lab.study import run_study

SPEC = dict(name='bench', base=dict(dataset='cifar10', arch='small_cnn', n_train=1280, epochs=1, batch_size=128, lr=0.1, n_eval=100,
                                    n_report=100, hider_n=50),
            grid=dict(objective=['pgdat', 'trades']), seeds=[0, 1])
SETTINGS = {'local, 1 run at a time, 2 threads': dict(executor='local', parallel=1, threads=2),
            'local, 2 runs at once, 1 thread each': dict(executor='local', parallel=2, threads=1),
            'debug (in-process), 2 threads': dict(executor='debug', threads=2)}


def once(setting):
    d = tempfile.mkdtemp(prefix='bench-study-')
    try:
        torch.set_num_threads(2)  # the debug executor trains in this process
        t = time.perf_counter()
        study = run_study(SPEC, runs_dir=d, progress=False, **SETTINGS[setting])
        wall = time.perf_counter() - t
        assert (study.status().state == 'done').all()
        return wall
    finally: shutil.rmtree(d, ignore_errors=True)


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--rounds', type=int, default=3)
    a = ap.parse_args()
    names = list(SETTINGS)
    walls = {k: [] for k in names}
    for i in range(a.rounds):
        for k in names[i % len(names):] + names[:i % len(names)]:  # a rotated order each round
            walls[k].append(once(k))
    base = names[0]
    print(json.dumps(dict(bench='study', spec=SPEC, rounds=a.rounds, machine=f'{platform.machine()} {os.cpu_count()} cores',
                          torch=torch.__version__, seconds=walls,
                          ratio_to_sequential_local={k: [b/w for b, w in zip(walls[base], v)] for k, v in walls.items()}), indent=1))
