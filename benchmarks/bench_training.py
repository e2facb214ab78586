"""PGD-10 PGD-AT training throughput: the workbench learner against a plain reference loop.

    python benchmarks/bench_training.py --arch small_cnn --batches 20
    python benchmarks/bench_training.py --arch preact_resnet18 --batches 3

The reference loop is what most papers' code does: PGD with the model in eval mode, `loss.backward()`
through the whole model during the attack (parameter gradients included), fp32, NCHW. The learner runs
PGD-AT through `Standard(PGDAT())` with its defaults (input-gradient-only attacks, channels-last).
Both train the same architecture on the same CIFAR-10 batches (batch 128). One JSON line per run.
"""
import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from bench_attacks import reference_pgd  # the same plain PGD loop as the attack benchmark
from robustbench_lab.core import seed_everything
from robustbench_lab.data import Loader, default_augment, load_arrays
from robustbench_lab.learner import Learner
from robustbench_lab.methods import Standard
from robustbench_lab.models import create_model
from robustbench_lab.objectives import PGDAT

EPS, ALPHA, STEPS = 8/255, 2/255, 10


def reference_epoch(model, loader, n_batches, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    n, t0 = 0, time.perf_counter()
    for b, (x, y) in enumerate(loader.batches(0)):
        if b == n_batches: break
        model.eval()
        x_adv = reference_pgd(model, x, y, EPS, ALPHA, STEPS)
        model.train()
        opt.zero_grad()
        F.cross_entropy(model(x_adv), y).backward()
        opt.step()
        n += len(x)
    return n/(time.perf_counter() - t0)


def learner_epoch(model, loader, n_batches, channels_last):
    class Stop(Exception): pass
    from robustbench_lab.learner import Callback
    class Limit(Callback):
        def after_batch(self, learn):
            if learn.batch == n_batches: raise Stop
    learn = Learner(model, Standard(PGDAT(eps=EPS, alpha=ALPHA, steps=STEPS)), loader, epochs=1, lr=0.1,
                    schedule='constant', cbs=[Limit()], channels_last=channels_last)
    try: learn.fit()
    except Stop: pass
    a = learn.accum
    return a['images']/a['seconds_train']


if __name__ == '__main__':
    p = argparse.ArgumentParser()
    p.add_argument('--arch', default='small_cnn')
    p.add_argument('--batches', type=int, default=10)
    p.add_argument('--batch-size', type=int, default=128)
    a = p.parse_args()
    x, y = load_arrays('cifar10', 'train')
    out = {}
    for name in ('reference', 'learner', 'learner_nchw'):
        seed_everything(0)
        model = create_model(a.arch, 'cifar10')
        loader = Loader(x, y, batch_size=a.batch_size, shuffle=True, augment=default_augment('cifar10'), seed=0,
                        channels_last=(name == 'learner'))
        if name == 'reference': out[name] = reference_epoch(model, loader, a.batches)
        else: out[name] = learner_epoch(model, loader, a.batches, channels_last=(name == 'learner'))
    print(json.dumps(dict(bench='pgd10_at_training', arch=a.arch, batch=a.batch_size, batches=a.batches, img_per_s=out,
                          speedup=out['learner']/out['reference'], machine=f'{platform.machine()} {torch.get_num_threads()} threads',
                          torch=torch.__version__)))
