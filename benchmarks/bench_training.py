"""PGD-10 PGD-AT training throughput: the workbench learner against plain loops, interleaved in one process.

    python benchmarks/bench_training.py --arch small_cnn --batches 8 --pairs 5
    python benchmarks/bench_training.py --arch preact_resnet18 --batches 2 --pairs 3
    python benchmarks/bench_training.py --arch small_cnn --profile      # one step of each, op by op

Rows (all on the same CIFAR-10 batches of 128 from the same `Loader`, crop/flip augmentation, SGD lr 0.1):
- *competent*: the plain loop a careful researcher writes — PGD-10 from a uniform start with the model in eval mode and
  only the input gradient (`torch.autograd.grad` on the input), then one train-mode step; NCHW, fp32, no callbacks.
- *naive*: the loop most papers' code has — the same, but `loss.backward()` inside the attack (parameter gradients too).
- *competent + channels-last*: the competent loop with model and batches in channels-last memory format (`--cl`), to
  show how much of the learner's lead is the memory format and whether the learner loses anything around it.
- *learner*: `Learner(model, Standard(PGDAT()))` with the workbench's training defaults (what `train()` sets).
The rows run alternately (A B A B ...), a fresh model each time; the speed-up is the median of the per-pair ratios, so
that the slow drifts of a shared machine cancel. The process keeps freed memory for reuse (`keep_freed_memory`, which
the learner turns on anyway) for every row; `--allocator` measures instead what that setting is worth to the competent
loop: fresh processes with glibc's defaults and with freed memory kept, alternating. `--fill`: the learner with and
without torch's filling of every new tensor, which `use_deterministic_algorithms(True)` turns on by default and
`seed_everything` turns off. One JSON line per invocation.

    python benchmarks/bench_training.py --arch small_cnn --allocator --pairs 3
    python benchmarks/bench_training.py --arch small_cnn --fill --pairs 3

Each pair of the main comparison also times the step's convolutions and linear layers alone (*kernels only*: every
forward, input-gradient and weight-gradient kernel a PGD-10 AT step runs, on the model's shapes, with nothing between
them: no BatchNorm, ReLU, loss, attack update, data or optimiser; the faster of channels-last and NCHW): no loop that
does this arithmetic with these kernels can be faster, so `kernels_only_vs_competent_median` bounds any loop's lead.

`--compare hfat`: AT_HF (`HFAT(PGDAT())`, 5 standard-branch steps, PGD-10 auxiliary branch, the paper's weighting) against
AT (PGD-10), both through the learner; `--compare afa`: AFA Stage I (K = 5, PGD-7 per branch) against AT with PGD-7 at
ξ = 8/255 (the strongest branch's budget). Both report the per-image time ratio, median of interleaved pairs.
"""
import argparse
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from robustbench_lab.core import keep_freed_memory, seed_everything
from robustbench_lab.data import Loader, default_augment, load_arrays
from robustbench_lab.learner import Callback, CancelFitException, Learner
from robustbench_lab.methods import Standard
from robustbench_lab.models import create_model
from robustbench_lab.objectives import PGDAT
from robustbench_lab.runs import RUN_SETTINGS

EPS, ALPHA, STEPS = 8/255, 2/255, 10


def plain_pgd(model, x, y, params_too):
    "PGD-10 from a uniform start; `params_too`: `loss.backward()` (parameter gradients as well), else the input gradient only."
    x_adv = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
    for _ in range(STEPS):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        if params_too:
            model.zero_grad(); loss.backward(); g = x_adv.grad
        else: g, = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + ALPHA*g.sign()
        x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0, 1)
    return x_adv


def plain_loop(model, loader, n_batches, params_too=False):
    "img/s of the plain loop over the first `n_batches` batches (training time only)."
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    n, t0 = 0, time.perf_counter()
    for b, (x, y) in enumerate(loader.batches(0)):
        if b == n_batches: break
        model.eval()
        x_adv = plain_pgd(model, x, y, params_too)
        model.train()
        opt.zero_grad()
        F.cross_entropy(model(x_adv), y).backward()
        opt.step()
        n += len(x)
    return n/(time.perf_counter() - t0)


class _Limit(Callback):
    def __init__(self, n): self.n = n
    def after_batch(self, learn):
        if learn.batch == self.n: raise CancelFitException('benchmark batches done')


def learner_loop(model, loader, n_batches, **learner_kw):
    "img/s of the learner over the first `n_batches` batches (its own training-time accounting)."
    learn = Learner(model, Standard(PGDAT(eps=EPS, alpha=ALPHA, steps=STEPS)), loader, epochs=1, lr=0.1,
                    schedule='constant', cbs=[_Limit(n_batches)], **learner_kw)
    learn.fit()
    return learn.accum['images']/learn.accum['seconds_train']


def method_loop(arch, method, n_batches, K=None):
    "img/s of the learner training `method` (a fresh model, MultiBN with K branches for AFA)."
    from functools import partial
    from robustbench_lab.models import MultiBN
    seed_everything(0)
    model = create_model(arch, 'cifar10', **(dict(norm_layer=partial(MultiBN, K=K)) if K else {}))
    loader = Loader(X, Y, batch_size=128, shuffle=True, augment=default_augment('cifar10'), seed=0,
                    channels_last=learner_defaults()['channels_last'])
    learn = Learner(model, method, loader, epochs=1, lr=0.1, schedule='constant', cbs=[_Limit(n_batches)], **learner_defaults())
    learn.fit()
    return learn.accum['images']/learn.accum['seconds_train']


def compare_rows(arch, what, n_batches, pairs):
    "Per-image time of a method over AT, interleaved pairs."
    from robustbench_lab.afa import AFA, oat_step
    from robustbench_lab.hfat import HFAT
    if what == 'hfat':
        base = lambda: Standard(PGDAT(eps=EPS, alpha=ALPHA, steps=STEPS))
        other, K = (lambda: HFAT(PGDAT(eps=EPS, alpha=ALPHA, steps=STEPS), steps_s=5, weighting='paper')), None
        passes = dict(at='11 forward-backward (10 attack steps with the input gradient, 1 training step)',
                      hfat='18 forward-backward (5 standard-branch attack steps, 1 proxy ascent, 10 auxiliary attack steps, '
                           'the auxiliary and the standard training steps) + 2 forward-only (clean logits at the auxiliary '
                           'and at the standard weights)')
    else:
        base = lambda: Standard(PGDAT(eps=EPS, alpha=oat_step(EPS, 7), steps=7))
        other, K = (lambda: AFA(PGDAT(eps=EPS, alpha=ALPHA, steps=7), K=5, attack_steps=7)), 5
        passes = dict(at='8 forward-backward (7 attack steps, 1 training step)',
                      afa='28 forward-backward attack steps (4 branches x 7) + 5 forwards (clean on branch 0, one per '
                          'adversarial branch) and one backward through all of them')
    at, meth = [], []
    for i in range(pairs):
        at.append(method_loop(arch, base(), n_batches))
        meth.append(method_loop(arch, other(), n_batches, K))
        print(f'pair {i + 1}: AT {at[-1]:.1f} {what} {meth[-1]:.1f} img/s', flush=True)
    ratios = [a/m for a, m in zip(at, meth)]
    return dict(bench=f'{what}_over_at', arch=arch, batches=n_batches, pairs=pairs, img_per_s=dict(at=at, **{what: meth}),
                time_ratio_per_pair=ratios, time_ratio_median=statistics.median(ratios), passes=passes)


def kernel_only(arch, channels_last, reps=1):
    "img/s of a PGD-10 AT step's convolutions and linear layers alone: the model's shapes, nothing between the kernels."
    model, calls = create_model(arch, 'cifar10').eval(), []
    hooks = [m.register_forward_hook(lambda mod, inp, out: calls.append((mod, inp[0].shape)))
             for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad(): model(torch.zeros(128, 3, 32, 32))
    for h in hooks: h.remove()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    layers = []  # (forward, data gradient, weight gradient) of each layer, in forward order
    for mod, shape in calls:
        w, x = mod.weight.detach(), torch.randn(shape)
        if isinstance(mod, torch.nn.Linear):
            gy = torch.randn(shape[0], w.shape[0])
            layers.append((lambda x=x, w=w: x @ w.T, lambda gy=gy, w=w: gy @ w, lambda gy=gy, x=x: gy.T @ x))
            continue
        x, w = x.to(memory_format=fmt), w.to(memory_format=fmt)
        conv = dict(stride=mod.stride, padding=mod.padding, dilation=mod.dilation, groups=mod.groups)
        gy = torch.randn_like(F.conv2d(x, w, **conv))
        back = lambda mask, gy=gy, x=x, w=w, c=conv: torch.ops.aten.convolution_backward(
            gy, x, w, None, c['stride'], c['padding'], c['dilation'], False, [0, 0], c['groups'], mask)
        layers.append((lambda x=x, w=w, c=conv: F.conv2d(x, w, **c), lambda b=back: b([True, False, False]),
                       lambda b=back: b([False, True, False])))
    def step():
        for _ in range(STEPS):  # the attack: forward and the input gradient through every layer
            for fwd, data, _ in layers: fwd(); data()
        for i, (fwd, data, weight) in enumerate(layers):  # the training step: no data gradient into the input
            fwd(); weight()
            if i: data()
    step()
    t0 = time.perf_counter()
    for _ in range(reps): step()
    return 128*reps/(time.perf_counter() - t0)


def fill_rows(arch, n_batches, pairs):
    "The learner with torch's filling of new tensors (what `use_deterministic_algorithms` does by default) and without."
    import torch.utils.deterministic as det
    on, off = [], []
    for i in range(pairs):
        for fill, row in ((True, on), (False, off)):
            model, loader = fresh(arch, learner_defaults()['channels_last'])
            det.fill_uninitialized_memory = fill  # after fresh(): seed_everything sets it
            row.append(learner_loop(model, loader, n_batches, **learner_defaults()))
        print(f'pair {i + 1}: filling {on[-1]:.1f} not filling {off[-1]:.1f} img/s', flush=True)
    return dict(bench='fill_uninitialized_memory', arch=arch, batches=n_batches, img_per_s=dict(filling=on, not_filling=off),
                speedup_median=statistics.median([b/a for a, b in zip(on, off)]))


def fresh(arch, channels_last):
    seed_everything(0)
    model = create_model(arch, 'cifar10')
    loader = Loader(X, Y, batch_size=128, shuffle=True, augment=default_augment('cifar10'), seed=0, channels_last=channels_last)
    return model, loader


def learner_defaults():
    "The learner settings `train()` uses by default on CPU."
    return dict(channels_last=RUN_SETTINGS['channels_last'], compile=RUN_SETTINGS['compile'])


def allocator_rows(arch, n_batches, pairs):
    "The competent loop in fresh processes with glibc's default (adaptive) thresholds and with freed memory kept, alternating."
    import subprocess
    def child(keep):
        out = subprocess.run([sys.executable, __file__, '--arch', arch, '--batches', str(n_batches), '--plain-child']
                             + (['--keep'] if keep else []), capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])
    default, kept = [], []
    for i in range(pairs):
        default.append(child(False)); kept.append(child(True))
        print(f'pair {i + 1}: glibc defaults {default[-1]:.1f} kept {kept[-1]:.1f} img/s', flush=True)
    return dict(bench='allocator', arch=arch, batches=n_batches, img_per_s=dict(glibc_default=default, kept=kept),
                speedup_median=statistics.median([k/d for k, d in zip(kept, default)]))


def profile_rows(arch):
    "Self-CPU time per op of one training step of the competent loop and of the learner, side by side."
    from torch.profiler import ProfilerActivity, profile
    tables = {}
    for name in ('competent', 'learner'):
        model, loader = fresh(arch, name == 'learner' and learner_defaults()['channels_last'])
        run = (lambda: plain_loop(model, loader, 2)) if name == 'competent' else \
              (lambda: learner_loop(model, loader, 2, **learner_defaults()))
        run()  # warm-up: allocator, oneDNN primitive caches
        with profile(activities=[ProfilerActivity.CPU]) as prof: run()
        tables[name] = {e.key: e.self_cpu_time_total/1e3/2 for e in prof.key_averages()}  # ms per step
    keys = sorted(set(tables['competent']) | set(tables['learner']),
                  key=lambda k: -max(tables['competent'].get(k, 0), tables['learner'].get(k, 0)))[:16]
    return dict(ms_per_step={k: [round(tables['competent'].get(k, 0), 1), round(tables['learner'].get(k, 0), 1)] for k in keys},
                total_ms_per_step=[round(sum(t.values()), 1) for t in (tables['competent'], tables['learner'])])


if __name__ == '__main__':
    p = argparse.ArgumentParser()
    p.add_argument('--arch', default='small_cnn')
    p.add_argument('--batches', type=int, default=8)
    p.add_argument('--pairs', type=int, default=3)
    p.add_argument('--naive', action='store_true', help='also time the naive loop (parameter gradients in the attack)')
    p.add_argument('--cl', action='store_true', help='also time the competent loop in channels-last format')
    p.add_argument('--allocator', action='store_true', help='what keeping freed memory is worth to the competent loop')
    p.add_argument('--plain-child', action='store_true', help=argparse.SUPPRESS)  # one competent-loop measurement (--allocator)
    p.add_argument('--keep', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--fill', action='store_true', help="what torch's filling of new tensors in deterministic mode costs the learner")
    p.add_argument('--compare', choices=['hfat', 'afa'], help="a method's per-image time over AT's")
    p.add_argument('--profile', action='store_true', help='profile one step of each instead of timing')
    a = p.parse_args()
    X, Y = load_arrays('cifar10', 'train')
    machine = f'{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}'
    if a.plain_child:
        if a.keep: keep_freed_memory()
        plain_loop(*fresh(a.arch, False), 1)
        print(plain_loop(*fresh(a.arch, False), a.batches))
        raise SystemExit
    if a.allocator:
        print(json.dumps(dict(**allocator_rows(a.arch, a.batches, a.pairs), machine=machine)))
        raise SystemExit
    keep_freed_memory()
    if a.fill:
        learner_loop(*fresh(a.arch, learner_defaults()['channels_last']), 1, **learner_defaults())  # warm-up
        print(json.dumps(dict(**fill_rows(a.arch, a.batches, a.pairs), machine=machine)))
        raise SystemExit
    if a.compare:
        method_loop(a.arch, Standard(PGDAT(eps=EPS, alpha=ALPHA, steps=STEPS)), 1)  # warm-up
        print(json.dumps(dict(**compare_rows(a.arch, a.compare, a.batches, a.pairs), machine=machine)))
        raise SystemExit
    if a.profile:
        print(json.dumps(dict(bench='pgd10_at_profile', arch=a.arch, **profile_rows(a.arch), machine=machine)))
        raise SystemExit
    plain_loop(*fresh(a.arch, False), 1)  # warm-up outside the timed pairs
    learner_loop(*fresh(a.arch, learner_defaults()['channels_last']), 1, **learner_defaults())
    rows = dict(competent=[], learner=[], **({'competent_cl': []} if a.cl else {}), **({'naive': []} if a.naive else {}))
    floor = []
    for i in range(a.pairs):
        floor.append(max(kernel_only(a.arch, True), kernel_only(a.arch, False)))
        rows['competent'].append(plain_loop(*fresh(a.arch, False), a.batches))
        rows['learner'].append(learner_loop(*fresh(a.arch, learner_defaults()['channels_last']), a.batches, **learner_defaults()))
        if a.cl:
            model, loader = fresh(a.arch, True)
            rows['competent_cl'].append(plain_loop(model.to(memory_format=torch.channels_last), loader, a.batches))
        if a.naive: rows['naive'].append(plain_loop(*fresh(a.arch, False), a.batches, params_too=True))
        print(f'pair {i + 1}: ' + ' '.join(f'{k} {v[-1]:.1f}' for k, v in rows.items()) + f' img/s, kernels only {floor[-1]:.1f} img/s',
              flush=True)
    ratio = lambda k: statistics.median([v/c for v, c in zip(rows[k], rows['competent'])])
    out = dict(bench='pgd10_at_training', arch=a.arch, batch=128, batches=a.batches, pairs=a.pairs, img_per_s=rows,
               speedup_per_pair=[l/c for l, c in zip(rows['learner'], rows['competent'])], speedup_median=ratio('learner'),
               **{f'{k}_vs_competent_median': ratio(k) for k in rows if k not in ('competent', 'learner')},
               kernels_only_img_per_s=floor, kernels_only_vs_competent_median=statistics.median(
                   [f/c for f, c in zip(floor, rows['competent'])]),
               learner_settings=learner_defaults(), machine=machine)
    print(json.dumps(out))
