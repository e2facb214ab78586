"""Can AFA's weight generator see an attack's strength at all? Train a fresh weight generator (the WG architecture,
on the same stem features) directly as a detector — BCE, clean vs PGD-10 examples — on a finished Stage II run's
frozen backbone, and measure its ROC AUC per strength on held-out test images. If it cannot separate 8/255 examples
from clean ones, no Stage II recipe can make W(eps) follow eps at this scale; if it can, Stage II's CE objective is
what fails to teach it. Given a run without dual BN (e.g. a standard-trained model), the same detector on that model's
features and its own PGD examples: the control that says whether the detector can detect anything at this scale.
With --source, every example (training and test) is crafted against that separately trained model instead and only
transferred to the run's model: this separates "the features cannot show an attack" from "a robust model's own attacks
leave no trace" (issue 29). One JSON line per call to experiments/results/afa_detect.jsonl.

    python experiments/afa_detect.py afa-search-w32-n10k-e6-stem --n-train 4096 --n-test 1024 --epochs 15 [--layer last]
    python experiments/afa_detect.py f2at-c10-standard --layer last   # the control
    python experiments/afa_detect.py afa-search-w32-n10k-e6-src-stem --source hfat-c10-standard-s0   # a standard model's examples
    python experiments/afa_detect.py hfat-c10-standard-s0 --source afa-search-w32-n10k-e6-src-stem   # the AFA model's examples"""
import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
from scipy.stats import rankdata
import torch.nn.functional as F

from robustbench_lab.afa import WeightGenerator, _first_conv
from robustbench_lab.models import multibn_layers
from robustbench_lab.attacks import PGD
from robustbench_lab.core import random_scope
from robustbench_lab.data import load_arrays
from robustbench_lab.train import Run

p = argparse.ArgumentParser()
p.add_argument('run')
p.add_argument('--n-train', type=int, default=4096)
p.add_argument('--n-test', type=int, default=1024)
p.add_argument('--epochs', type=int, default=15)
p.add_argument('--lr', type=float, default=1e-3)
p.add_argument('--seed', type=int, default=0)
p.add_argument('--layer', default='stem', choices=['stem', 'middle', 'last'],
               help="the features the detector sees: the stem's output (the stem WG's input) or the input of the middle / last dual BN (a per-layer WG's)")
p.add_argument('--source', default=None, help='craft every example against this separately trained run (name or folder) instead of the run itself')
a = p.parse_args()


def auc(neg, pos):
    "P(score of a positive > score of a negative), ties counted half (the ROC AUC, from the Mann-Whitney U)."
    ranks = rankdata(torch.cat([neg, pos]).double().numpy())
    return float((ranks[len(neg):].sum() - len(pos)*(len(pos) + 1)/2)/(len(pos)*len(neg)))


t0 = time.time()
run = Run.load(a.run)
model = run.model().eval()
source_run = Run.load(a.source) if a.source else None  # before any compute: a missing source is an error now
if source_run and source_run.config['dataset'] != run.config['dataset']:
    raise SystemExit(f"--source {a.source}: trained on {source_run.config['dataset']!r}, the run on {run.config['dataset']!r}")
source_model = source_run.model().eval() if source_run else None
dual_bn = hasattr(model, 'fixed_branch')  # an AFA model; otherwise a plain classifier, attacked white-box
net = model.backbone if dual_bn else model
feats = []
if a.layer == 'stem':
    site = _first_conv(net); channels = site.out_channels
    site.register_forward_hook(lambda m, i, o: feats.append(o.detach()))
else:
    bns = multibn_layers(net) if dual_bn else [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    site = bns[len(bns)//2] if a.layer == 'middle' else bns[-1]; channels = site.num_features
    site.register_forward_hook(lambda m, i, o: feats.append(i[0].detach()))
xtr, ytr = load_arrays('cifar10', 'train'); xte, yte = load_arrays('cifar10', 'test')
xtr, ytr = xtr[:a.n_train].float()/255, ytr[:a.n_train]
xte, yte = xte[:a.n_test].float()/255, yte[:a.n_test]


def features(x, y=None):
    "The hooked features of `x`; with labels `y` also the model's accuracy on `x` (from the same forward passes)."
    feats.clear()
    with torch.no_grad():
        pred = torch.cat([model(x[s:s + 256]).argmax(1) for s in range(0, len(x), 256)])
    return torch.cat(feats) if y is None else (torch.cat(feats), float((pred == y).float().mean()))


def attacked(x, y, eps, source, key):
    "PGD-10 (step eps/4) examples at `eps`, against the fused model, the strongest branch alone, or the source model."
    out = []
    for s in range(0, len(x), 256):
        with random_scope(a.seed, key, s):
            if source == 'source': out.append(PGD(eps=eps, steps=10)(source_model, x[s:s + 256], y[s:s + 256]))
            elif source == 'strong_branch' and dual_bn:
                with model.fixed_branch(1): out.append(PGD(eps=eps, steps=10)(model, x[s:s + 256], y[s:s + 256]))
            else: out.append(PGD(eps=eps, steps=10)(model, x[s:s + 256], y[s:s + 256]))
    return torch.cat(out)


# training set: each image once clean, once at 8/255 (crafted on the strongest branch, or the source: not aimed at any detector)
f_clean = features(xtr)
f_adv = features(attacked(xtr, ytr, 8/255, 'source' if source_model else 'strong_branch', 0))
fx = torch.cat([f_clean, f_adv]); fy = torch.cat([torch.zeros(len(f_clean)), torch.ones(len(f_adv))])
print(f'features ready in {time.time() - t0:.0f}s', flush=True)
torch.manual_seed(a.seed)
det = WeightGenerator(channels, 64)
opt = torch.optim.Adam(det.parameters(), lr=a.lr)
g = torch.Generator().manual_seed(a.seed)
for epoch in range(a.epochs):
    det.train(); perm = torch.randperm(len(fx), generator=g); tot = 0.0
    for s in range(0, len(fx), 128):
        i = perm[s:s + 128]
        loss = F.binary_cross_entropy(det(fx[i]).clamp(1e-6, 1 - 1e-6), fy[i])
        opt.zero_grad(); loss.backward(); opt.step(); tot += loss.item()*len(i)
    print(f'epoch {epoch + 1}: BCE {tot/len(fx):.4f}', flush=True)
det.eval()
sources = ('source',) if source_model else ('strong_branch', 'fused') if dual_bn else ('model',)
tests = {f'{source}@{k}/255': attacked(xte, yte, k/255, source, 100 + k) for source in sources for k in (1, 2, 4, 8)}


def highpass_energy(x):
    "Mean |x - its 3x3 box blur| per image: a fixed statistic of the high-frequency energy PGD's sign steps add."
    c = x.shape[1]
    blur = F.conv2d(F.pad(x, (1, 1, 1, 1), mode='replicate'), torch.full((c, 1, 3, 3), 1/9), groups=c)
    return (x - blur).abs().flatten(1).mean(1)


with torch.no_grad():
    read = {k: features(v, yte) for k, v in {'clean': xte, **tests}.items()}  # (features, the run's accuracy: does a transferred attack reach it?)
    clean = det(read['clean'][0])
    res = {k: auc(clean, det(read[k][0])) for k in tests}
    res_hp = {k: auc(highpass_energy(xte), highpass_energy(v)) for k, v in tests.items()}
    train_auc = auc(det(f_clean[:1024]), det(f_adv[:1024]))
    acc = {k: v[1] for k, v in read.items()}
print(f'held-out AUC (clean vs attacked, {a.n_test} test images): ' + ', '.join(f'{k} {v:.3f}' for k, v in res.items())
      + f'; training AUC {train_auc:.3f}; {time.time() - t0:.0f}s', flush=True)
print('the same pairs separated by the high-pass energy alone: ' + ', '.join(f'{k} {v:.3f}' for k, v in res_hp.items()), flush=True)
print(f"{a.run}'s accuracy on them: " + ', '.join(f'{k} {v:.3f}' for k, v in acc.items()), flush=True)
Path('experiments/results').mkdir(parents=True, exist_ok=True)
with open('experiments/results/afa_detect.jsonl', 'a') as f:
    f.write(json.dumps(dict(run=a.run, source=a.source, dual_bn=dual_bn, layer=a.layer, n_train=a.n_train, n_test=a.n_test, epochs=a.epochs, lr=a.lr, seed=a.seed, auc=res, auc_highpass=res_hp, accuracy=acc,
                            train_auc=train_auc, seconds=time.time() - t0)) + '\n')
