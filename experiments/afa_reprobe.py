"""Run AFA's Stage II mechanism probe again on finished Stage II runs, with the measurements added after they were made
(W1 on examples crafted against BN_{K-1} alone, which do not aim at the weight generator). Same probe set, grid, PGD
and seed as the run's own probe callback; one JSON line per run to experiments/results/afa_reprobe.jsonl.

    python experiments/afa_reprobe.py afa-search-w32-n10k-e6-stem afa-search-w32-n10k-e6-per_layer"""
import json
import sys
import time
from pathlib import Path

from robustbench_lab.data import load_arrays
from robustbench_lab.probes import afa_mechanism
from robustbench_lab.train import Run, method_probes

xt, yt = load_arrays('cifar10', 'test')
for name in sys.argv[1:]:
    r = Run.load(name)
    c = r.config
    if not (c['method'] == 'afa' and c['afa_stage'] == 2): raise SystemExit(f'{name}: not an AFA Stage II run')
    probe, t = method_probes({**c, 'probes': True}, xt, yt)[0], time.time()  # the callback the run itself measured with
    p = afa_mechanism(r.model(), probe.x, probe.y, probe.grid, steps=probe.steps, seed=probe.seed)
    print(f"{name} ({time.time() - t:.0f}s): white-box rho {p['rho']:.3f}, W1 {p['w1_mean'][0]:.4f} -> {p['w1_mean'][-1]:.4f}; "
          f"on BN_K-1's examples rho {p['rho_transfer']:.3f}, W1 {p['w1_transfer_mean'][0]:.4f} -> {p['w1_transfer_mean'][-1]:.4f}", flush=True)
    Path('experiments/results').mkdir(parents=True, exist_ok=True)
    with open('experiments/results/afa_reprobe.jsonl', 'a') as f: f.write(json.dumps(dict(run=name, n=len(probe.x), **p)) + '\n')
