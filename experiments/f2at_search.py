"""F²AT: the estimator protocol, the natural-pattern BN choice and an α warm-up, each measured with the mechanism probe at one
CPU budget (issue 15). Every configuration trains small_cnn on the first n_train CIFAR-10 images and records, every
`probe_every` epochs on 256 test points: Î_nat and Î_pert against their shuffled-pairs baselines, and the gradient ratio
‖∇α·L_pd‖/‖∇L_ce‖ with its cosine.

    python experiments/f2at_search.py --configs frozen online target frozen-update frozen-warmup

One JSON line per configuration goes to experiments/results/f2at_search.jsonl; runs land in runs/f2at-search-*. The
estimators are pre-trained once on the source run; later configurations with the same estimator input reuse that
`estimators.pt` (the same seeded computation), and finished runs are reopened, not re-evaluated."""
import argparse
import json
import time
from pathlib import Path

import sys; sys.path.insert(0, 'experiments')
from common import finished_or_train
from robustbench_lab.core import settings


CONFIGS = {
    'frozen': dict(f2at_mode='frozen'),                    # MIAT: pre-trained on a PGD-AT source network, then frozen
    'online': dict(f2at_mode='online'),                    # + one ascent step per batch on the network being trained
    'target': dict(f2at_mode='target'),                    # pre-trained on this network's own epoch-`source_epochs` state
    'frozen-update': dict(f2at_mode='frozen', f2at_nat_bn='update'),  # h(X_nat) updates the running BN statistics
    'frozen-warmup': dict(f2at_mode='frozen', f2at_alpha_warmup=3),
    'online-warmup': dict(f2at_mode='online', f2at_alpha_warmup=3),
    'logits': dict(f2at_mode='frozen', f2at_source='logits'),
    'sat': dict(f2at_alpha=0.0, f2at_gamma=0.0),           # α = γ = 0: standard AT through the same code path
}
p = argparse.ArgumentParser()
p.add_argument('--configs', nargs='+', default=['frozen', 'online', 'target', 'frozen-update', 'frozen-warmup'])
p.add_argument('--n-train', type=int, default=5000)
p.add_argument('--epochs', type=int, default=8)
p.add_argument('--est-epochs', type=int, default=10)
p.add_argument('--units', type=int, default=512)
p.add_argument('--probe-every', type=int, default=2)
a = p.parse_args()

base = dict(preset='f2at-paper', dataset='cifar10', arch='small_cnn', n_train=a.n_train, epochs=a.epochs, seed=0, n_eval=500,
            n_report=500, suite='monitor', progress=False, resume='auto', f2at_est_epochs=a.est_epochs, f2at_units=a.units,
            f2at_est_batch=400, probe_every=a.probe_every)
def pretrained_estimators(extra):
    "estimators.pt of an earlier configuration pre-trained on the same source with the same input (the same seeded computation), or None."
    for other, kw in CONFIGS.items():
        path = settings().runs_dir/f'f2at-search-{other}-n{a.n_train}-e{a.epochs}'/'estimators.pt'
        if kw.get('f2at_mode', 'frozen') != 'target' and kw.get('f2at_source') == extra.get('f2at_source') and path.exists(): return path
    return None


source = finished_or_train(f'f2at-search-source-n{a.n_train}-e{a.epochs}', method='standard', objective='pgdat',
               **{k: v for k, v in base.items() if not k.startswith('f2at_') and k != 'probe_every' and k != 'preset'},
               lr=0.1, weight_decay=2e-4, schedule='multistep', milestones=[0.5, 0.75], eps=8/255, alpha=2/255, steps=10)
for name in a.configs:
    t0 = time.time()
    extra = dict(CONFIGS[name])
    if extra.get('f2at_mode') == 'target': extra['f2at_source_epochs'] = 2  # pre-train on the state after 2 epochs
    elif (given := pretrained_estimators(extra)) is not None: extra['f2at_estimators'] = str(given)  # pre-trained once, reused
    else: extra['f2at_source_run'] = str(source.dir)
    run = finished_or_train(f'f2at-search-{name}-n{a.n_train}-e{a.epochs}', **{**base, **extra})
    probes = [dict(epoch=m['epoch'] + 1, **{k[6:]: m[k] for k in m if k.startswith('probe_')}) for m in run.metrics if 'probe_i_nat' in m]
    for pr in probes:
        print(f"  {name} epoch {pr['epoch']}: I_nat {pr['i_nat']:.3f} vs shuffled {pr['i_nat_shuffled']:.3f}, I_pert {pr['i_pert']:.3f} vs "
              f"{pr['i_pert_shuffled']:.3f}, grad ratio {pr['grad_ratio']:.2f} (cos {pr['grad_cosine']:.2f}), no signal: {pr['no_signal']}", flush=True)
    row = dict(config=name, settings=extra, n_train=a.n_train, epochs=a.epochs, est_epochs=a.est_epochs, units=a.units,
               seconds=time.time() - t0, clean=run.report.clean_accuracy, pgd20=run.report.robust_accuracy['PGD-20'],
               ce=[m.get('ce') for m in run.metrics], l_pd=[m.get('l_pd') for m in run.metrics], probes=probes,
               signal_throughout=bool(probes) and all(not pr['no_signal'] for pr in probes))
    Path('experiments/results').mkdir(parents=True, exist_ok=True)
    with open('experiments/results/f2at_search.jsonl', 'a') as f: f.write(json.dumps(row) + '\n')
    print(f"{name}: {row['seconds']:.0f}s, clean {row['clean']:.3f}, PGD-20 {row['pgd20']:.3f}, signal throughout: {row['signal_throughout']}", flush=True)
