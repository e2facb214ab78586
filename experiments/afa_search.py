"""AFA: look for a CPU budget at which the mechanism engages (issue 15). Trains a Stage I model and one or more Stage II
weight generators on it, with the mechanism probe every `probe_every` epochs, and prints the probe's verdict per epoch.

    python experiments/afa_search.py --label w32-n10k --width 32 --n-train 10000 --stage1-epochs 10 --placements stem per_layer
    python experiments/afa_search.py --label w32-n10k-e6-sb --stage1-label w32-n10k-e6 --stage1-epochs 6 --samples strong_branch
    python experiments/afa_search.py --label w32-n10k-e6-src --stage1-label w32-n10k-e6 --stage1-epochs 6 --stage2-epochs 2 \
        --probe-every 1 --source runs/hfat-c10-standard-s0            # + W1 on a separately trained model's examples (issue 29)

Engaged means (issue 15): W1(eps) monotone in eps with |Spearman rho| >= 0.8, and the fused model at least as accurate as
each kept branch on most of the eps grid. Runs land in runs/afa-search-<label>-*; one JSON line per Stage II goes to
experiments/results/afa_search.jsonl."""
import argparse
import json
import time
from pathlib import Path

import sys; sys.path.insert(0, 'experiments')
from common import finished_or_train


p = argparse.ArgumentParser()
p.add_argument('--label', required=True)
p.add_argument('--width', type=int, default=32)
p.add_argument('--n-train', type=int, default=10000)
p.add_argument('--K', type=int, default=5)
p.add_argument('--stage1-epochs', type=int, default=10)
p.add_argument('--stage2-epochs', type=int, default=20)
p.add_argument('--stage2-lr', type=float, default=0.01)
p.add_argument('--clean-prob', type=float, default=0.2)
p.add_argument('--placements', nargs='+', default=['stem'])
p.add_argument('--samples', default='fused', help="Stage II samples: PGD against the fused model (fused), BN_{K-1} alone (strong_branch) or the source model (transfer)")
p.add_argument('--source', default=None, help='afa_source: a separately trained model (run name or folder); the probe adds W1 on its examples')
p.add_argument('--stage1-label', default=None, help='reuse the Stage I run of this label (default: --label)')
p.add_argument('--probe-every', type=int, default=4)
p.add_argument('--probe-n', type=int, default=256)
a = p.parse_args()

budget = dict(preset='afa-paper', dataset='cifar10', arch='small_cnn', width=a.width, n_train=a.n_train, afa_K=a.K, seed=0,
              n_eval=500, progress=False, resume='auto')
t0 = time.time()
s1 = finished_or_train(f'afa-search-{a.stage1_label or a.label}-stage1', afa_stage=1, epochs=a.stage1_epochs, suite='monitor', n_report=500, **budget)
print(f'Stage I: {time.time() - t0:.0f}s, clean {s1.report.clean_accuracy:.3f}, PGD-20 {s1.report.robust_accuracy["PGD-20"]:.3f}', flush=True)
for placement in a.placements:
    t1 = time.time()
    s2 = finished_or_train(f'afa-search-{a.label}-{placement}', afa_stage=2, afa_from=str(s1.dir), afa_placement=placement,
               epochs=a.stage2_epochs, lr=a.stage2_lr, afa_clean_prob=a.clean_prob, afa_samples=a.samples, suite='afa', n_report=500,
               probe_n=a.probe_n, probe_every=a.probe_every, afa_source=a.source, **budget)
    probes = [dict(epoch=m['epoch'] + 1, **{k[6:]: m[k] for k in m if k.startswith('probe_')}) for m in s2.metrics if 'probe_rho' in m]
    for pr in probes:
        print(f"  {placement} epoch {pr['epoch']}: rho {pr['rho']:.3f} (on BN_K-1's examples {pr.get('rho_transfer', float('nan')):.3f}, on the source's {pr.get('rho_source', float('nan')):.3f}), W1 {pr['w1_mean'][0]:.3f} -> {pr['w1_mean'][-1]:.3f}, "
              f"fused >= best branch on {100*pr['fused_at_least_best']:.0f}% of eps, flat {pr['flat']}", flush=True)
    last = probes[-1]
    row = dict(label=a.label, placement=placement, width=a.width, n_train=a.n_train, K=a.K, stage1_epochs=a.stage1_epochs,
               stage2_epochs=a.stage2_epochs, stage2_lr=a.stage2_lr, clean_prob=a.clean_prob, samples=a.samples, source=a.source, seconds_stage1=sum(m.get('train_seconds', 0) for m in s1.metrics),
               seconds_stage2=sum(m.get('train_seconds', 0) for m in s2.metrics), clean=s2.report.clean_accuracy, robust=s2.report.robust_accuracy,
               engaged=abs(last['rho']) >= 0.8 and last['fused_at_least_best'] >= 0.5, probes=probes)
    Path('experiments/results').mkdir(parents=True, exist_ok=True)
    with open('experiments/results/afa_search.jsonl', 'a') as f: f.write(json.dumps(row) + '\n')
    print(f'Stage II {placement}: {time.time() - t1:.0f}s, engaged: {row["engaged"]}', flush=True)
