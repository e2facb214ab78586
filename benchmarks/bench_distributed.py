"""One process against `nproc` processes on the same machine: the overhead of the distributed code path (issue 13).

    python benchmarks/bench_distributed.py --nproc 2 --pairs 3

Trains PGD-10 PGD-AT on `small_cnn` (the first `--n-train` CIFAR-10 images, one epoch, batch 128) with `train(nproc=1)` and
`train(nproc=N)` alternately; reports the training throughput (the learner's own training-time accounting, rank 0) and
the wall time of the whole call (process start, group set-up, evaluation included). On a 2-core machine two processes
share the cores a single process already uses with two threads, so this shows overhead, not scaling.
"""
import argparse
import json
import platform
import statistics
import tempfile
import time

import torch

from robustbench_lab.train import train


def one(nproc, n_train, runs_dir, k):
    t = time.perf_counter()
    run = train(dataset='cifar10', arch='small_cnn', n_train=n_train, epochs=1, batch_size=128, nproc=nproc, run_name=f'p{nproc}-{k}',
                runs_dir=runs_dir, n_eval=200, n_report=200, progress=False, seed=0)
    return run.metrics[-1]['train_img_per_s'], time.perf_counter() - t


if __name__ == '__main__':
    p = argparse.ArgumentParser()
    p.add_argument('--nproc', type=int, default=2)
    p.add_argument('--pairs', type=int, default=3)
    p.add_argument('--n-train', type=int, default=2048)
    a = p.parse_args()
    rows = {1: [], a.nproc: []}
    with tempfile.TemporaryDirectory() as d:
        one(1, 256, d, 'warm')
        for k in range(a.pairs):
            for n in (1, a.nproc):
                rows[n].append(one(n, a.n_train, d, k))
            print(f"pair {k + 1}: " + '  '.join(f'nproc={n}: {v[-1][0]:.1f} img/s, {v[-1][1]:.1f} s' for n, v in rows.items()), flush=True)
    print(json.dumps(dict(bench='distributed_overhead', arch='small_cnn', n_train=a.n_train, pairs=a.pairs,
                          img_per_s={n: [r[0] for r in v] for n, v in rows.items()}, wall_s={n: [r[1] for r in v] for n, v in rows.items()},
                          throughput_ratio_median=statistics.median([b[0]/s[0] for s, b in zip(rows[1], rows[a.nproc])]),
                          machine=f'{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}')))
