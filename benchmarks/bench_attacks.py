"""PGD-20 throughput of the workbench engine against a plain reference loop, and the cost of `evaluate`.

    python benchmarks/bench_attacks.py pgd --arch small_cnn --n 512
    python benchmarks/bench_attacks.py evaluate --suite monitor --n 1000

Results go to stdout as one JSON line per measurement; BENCHMARKS.md records them with the machine.
"""
import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from robustbench_lab.attacks import PGD
from robustbench_lab.data import Loader, load_arrays
from robustbench_lab.evaluate import evaluate
from robustbench_lab.models import create_model


def reference_pgd(model, x, y, eps=8/255, alpha=2/255, steps=20):
    """The loop most papers' code uses: backward() through the whole model (parameter gradients included)."""
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        model.zero_grad()
        loss.backward()
        x_adv = x_adv.detach() + alpha*x_adv.grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv


def bench_pgd(arch, n, batch, repeats):
    torch.manual_seed(0)
    model = create_model(arch, 'cifar10').eval()
    x, y = torch.rand(n, 3, 32, 32), torch.randint(0, 10, (n,))
    out = {}
    for name, fn in [('reference', lambda xb, yb: reference_pgd(model, xb, yb)),
                     ('workbench', lambda xb, yb: PGD(steps=20)(model, xb, yb))]:
        best = 0
        for _ in range(repeats):
            t = time.perf_counter()
            for i in range(0, n, batch): fn(x[i:i + batch], y[i:i + batch])
            best = max(best, n/(time.perf_counter() - t))
        out[name] = best
    cl = model.to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)
    best = 0
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(0, n, batch): PGD(steps=20)(cl, xc[i:i + batch], y[i:i + batch])
        best = max(best, n/(time.perf_counter() - t))
    out['workbench_channels_last'] = best
    return dict(bench='pgd20', arch=arch, n=n, batch=batch, img_per_s=out, speedup=out['workbench']/out['reference'])


def bench_evaluate(suite, n, arch, train_epochs):
    torch.manual_seed(0)
    model = create_model(arch, 'cifar10')
    x, y = load_arrays('cifar10', 'train')
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    t = time.perf_counter()
    for epoch in range(train_epochs):  # a quick clean-trained model so that the suite has real work to do
        for xb, yb in Loader(x, y, batch_size=128, shuffle=True, seed=epoch, n=10000):
            opt.zero_grad(); F.cross_entropy(model(xb), yb).backward(); opt.step()
    train_s = time.perf_counter() - t
    xt, yt = load_arrays('cifar10', 'test')
    t = time.perf_counter()
    rep = evaluate(model.eval(), xt, yt, suite, n=n)
    return dict(bench='evaluate', suite=suite, arch=arch, n=n, seconds=time.perf_counter() - t, per_attack_s=rep.seconds,
                clean=rep.clean_accuracy, robust=rep.robust_accuracy, flags=[f['code'] for f in rep.flags],
                model=f'{arch} clean-trained {train_epochs} epochs on 10k CIFAR-10 train images ({train_s:.0f}s)')


if __name__ == '__main__':
    p = argparse.ArgumentParser()
    p.add_argument('what', choices=['pgd', 'evaluate'])
    p.add_argument('--arch', default='small_cnn')
    p.add_argument('--n', type=int, default=512)
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--repeats', type=int, default=2)
    p.add_argument('--suite', default='monitor')
    p.add_argument('--train-epochs', type=int, default=3)
    a = p.parse_args()
    res = bench_pgd(a.arch, a.n, a.batch, a.repeats) if a.what == 'pgd' else bench_evaluate(a.suite, a.n, a.arch, a.train_epochs)
    res.update(machine=f'{platform.machine()} {torch.get_num_threads()} threads', torch=torch.__version__)
    print(json.dumps(res))
