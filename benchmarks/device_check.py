"""The CUDA path in one prepared script (issue 14): every method trains, the throughput of PGD-AT under each setting, and
AutoAttack's overhead through the workbench. About 8 minutes on one H200-class GPU; `--tiny` runs the same code on CPU in
under two minutes (CI), so that it cannot rot.

    python benchmarks/device_check.py --out device_check.json            # a CUDA machine, CIFAR-10 under RBLAB_DATA
    python benchmarks/device_check.py --tiny --out /tmp/device_check.json  # CPU, tiny sizes

1. **methods**: each `-code` preset's method (and AFA Stage I/II, F²AT, IAT from their `-paper` presets) trains
   `--steps` steps on CIFAR-10 with bf16 autocast, channels-last and `compile=True` (CPU: fp32, and the `eager`
   compile backend, which still captures every graph); an error, a non-finite loss or a loss that does not fall (mean
   of the last quarter of the steps not below the first quarter's) fails the check.
2. **throughput**: PGD-10 PGD-AT (ε = 8/255, step 2/255, batch 128) on `preact_resnet18` and `wrn-34-10`: a plain
   reference loop (input-gradient PGD in eval mode, fp32, NCHW) and the learner with fp32 / bf16 × NCHW / channels-last
   × eager / compiled; img/s and a 50,000-image epoch extrapolated.
3. **AutoAttack**: the standard version on the first 1,000 CIFAR-10 test points against the `pyautoattack` ResNet-18,
   through `evaluate(..., ['AA'])` and through `pyautoattack` called directly: seconds, accuracies, overhead (≤ 5%).
4. One JSON file (`--out`) and a table on stdout. Exit status 1 when a check failed.
"""
import argparse
import json
import math
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from robustbench_lab.core import keep_freed_memory, seed_everything
from robustbench_lab.data import Loader, default_augment, load_arrays
from robustbench_lab.evaluate import AA, evaluate
from robustbench_lab.learner import Callback, CancelFitException, Learner
from robustbench_lab.methods import Standard
from robustbench_lab.models import create_model, reference_resnet18
from robustbench_lab.objectives import PGDAT
from robustbench_lab.train import train

EPS, ALPHA, STEPS = 8/255, 2/255, 10
# every method, through the preset that names it (afa: Stage I, then Stage II on it)
METHOD_PRESETS = ['hfat-code', 'dynat-code', 'trades-code', 'mart-code', 'awp-code', 'trades-awp-code', 'lbgat-code',
                  'gairat-code', 'mail-code', 'seat-code', 'help-code', 'oat-code', 'iat-paper', 'afa-paper', 'f2at-paper']


def _losses(run_dir):
    return [json.loads(l)['loss'] for l in (Path(run_dir)/'steps.jsonl').read_text().splitlines() if l]


def check_methods(a, runs_dir, device):
    "Train each method `a.steps` steps; per method: seconds, first/last losses, verdict."
    rows = []
    fast = dict(amp='bf16', compile=True) if device == 'cuda' else dict(amp=None, compile='eager')
    common = dict(dataset='cifar10', arch=a.arch, n_train=a.steps*a.batch, batch_size=a.batch, epochs=1, device=device,
                  channels_last=True, n_eval=a.eval_n, n_report=a.eval_n, suite='monitor', runs_dir=str(runs_dir),
                  progress=False, resume=False, seed=0, helper_epochs=1, f2at_source_epochs=1, f2at_est_epochs=2,
                  guide_arch=a.arch, natural_arch=a.arch, **fast)
    if a.tiny: common.update(width=8, f2at_units=64, probe_n=16)
    for preset in METHOD_PRESETS:
        stages = [dict(afa_stage=1), dict(afa_stage=2)] if preset == 'afa-paper' else [{}]
        for stage in stages:
            label = preset + (f' stage {stage["afa_stage"]}' if stage else '')
            t = time.perf_counter()
            try:
                extra = dict(stage)
                if stage.get('afa_stage') == 2: extra['afa_from'] = str(runs_dir/'dc-afa-paper-1')
                name = f"dc-{preset}" + (f"-{stage['afa_stage']}" if stage else '')
                train(preset=preset, run_name=name, **{**common, **extra})
                losses = _losses(runs_dir/name)
                q = max(1, len(losses)//4)
                first, last = sum(losses[:q])/q, sum(losses[-q:])/q
                finite = all(math.isfinite(v) for v in losses)
                fell = last < first
                ok = finite and (fell or a.tiny)
                why = 'non-finite loss' if not finite else '' if fell else 'loss did not fall' + (' (not enforced under --tiny)' if a.tiny else '')
                rows.append(dict(method=label, ok=ok, why=why, seconds=time.perf_counter() - t, steps=len(losses),
                                 loss_first=first, loss_last=last))
            except Exception as e:
                rows.append(dict(method=label, ok=False, why=f'{type(e).__name__}: {e}'[:300], seconds=time.perf_counter() - t,
                                 traceback=traceback.format_exc()[-2000:]))
            r = rows[-1]
            print(f"  {label:24s} {'ok  ' if r['ok'] else 'FAIL'} {r['seconds']:7.1f}s  "
                  + (f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}" if 'loss_first' in r else '') + f"  {r['why']}", flush=True)
    return rows


class _Limit(Callback):
    def __init__(self, n): self.n = n
    def after_batch(self, learn):
        if learn.batch == self.n: raise CancelFitException('done')


def plain_at(model, loader, n_batches, sync):
    "The reference loop: PGD-10 with the input gradient in eval mode, one SGD step; fp32, as given (NCHW)."
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    it = loader.batches(0)
    x, y = next(it)  # warm-up batch
    n, t0 = 0, None
    for b, (x, y) in enumerate(it):
        if b == 1: sync(); t0 = time.perf_counter(); n = 0
        if b == n_batches + 1: break
        model.eval()
        xa = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
        for _ in range(STEPS):
            xa.requires_grad_(True)
            g, = torch.autograd.grad(F.cross_entropy(model(xa), y), xa)
            xa = torch.min(torch.max(xa.detach() + ALPHA*g.sign(), x - EPS), x + EPS).clamp(0, 1)
        model.train(); opt.zero_grad(); F.cross_entropy(model(xa), y).backward(); opt.step()
        n += len(x)
    sync()
    return n/(time.perf_counter() - t0)


def learner_at(model, loader, n_batches, **kw):
    "The learner's PGD-10 PGD-AT; the first two batches (compilation, autotuning) are not timed."
    learn = Learner(model, Standard(PGDAT(eps=EPS, alpha=ALPHA, steps=STEPS)), loader, epochs=1, lr=0.1, schedule='constant',
                    cbs=[_Limit(n_batches + 2)], **kw)
    class Skip(Callback):
        order = 100
        def after_batch(self, learn):
            if learn.batch == 2: learn.accum.update(seconds_train=0.0, images=0)
    learn.cbs.append(Skip())
    learn.fit()
    return learn.accum['images']/learn.accum['seconds_train']


def check_throughput(a, device, x, y):
    "img/s of the reference loop and of the learner under each setting, per architecture."
    sync = (lambda: torch.cuda.synchronize()) if device == 'cuda' else (lambda: None)
    settings = [dict(amp=None, channels_last=False, compile=False), dict(amp=None, channels_last=True, compile=False)]
    if device == 'cuda':
        settings += [dict(amp='bf16', channels_last=False, compile=False), dict(amp='bf16', channels_last=True, compile=False),
                     dict(amp='bf16', channels_last=True, compile=True), dict(amp=None, channels_last=True, compile=True)]
    else: settings += [dict(amp=None, channels_last=True, compile='eager')]
    rows = []
    for arch in a.throughput_archs:
        kw = dict(width=8) if a.tiny and arch == 'small_cnn' else {}
        def fresh(cl):
            seed_everything(0)
            m = create_model(arch, 'cifar10', **kw).to(device)
            return m, Loader(x, y, batch_size=128, shuffle=True, augment=default_augment('cifar10'), seed=0, device=device, channels_last=cl)
        try:
            ref = plain_at(*fresh(False), a.batches, sync)
            rows.append(dict(arch=arch, setting='reference loop (fp32, NCHW, eager)', img_per_s=ref, epoch_s=50000/ref))
        except Exception as e:
            rows.append(dict(arch=arch, setting='reference loop', error=f'{type(e).__name__}: {e}'[:300])); continue
        for s in settings:
            label = f"learner {s['amp'] or 'fp32'}, {'channels-last' if s['channels_last'] else 'NCHW'}, " + \
                    ('compiled' if s['compile'] is True else f"compile={s['compile']!r}" if s['compile'] else 'eager')
            try:
                v = learner_at(*fresh(s['channels_last']), a.batches, device=device, **s)
                rows.append(dict(arch=arch, setting=label, img_per_s=v, epoch_s=50000/v, vs_reference=v/ref))
            except Exception as e:
                rows.append(dict(arch=arch, setting=label, error=f'{type(e).__name__}: {e}'[:300]))
        for r in rows:
            if r['arch'] == arch:
                print(f"  {arch:16s} {r['setting']:44s} " + (f"{r['img_per_s']:9.1f} img/s  epoch {r['epoch_s']:8.1f}s"
                      + (f"  {r['vs_reference']:.2f}x" if 'vs_reference' in r else '') if 'error' not in r else 'ERROR ' + r['error']), flush=True)
    return rows


def check_autoattack(a, device):
    "Standard AutoAttack through the workbench and through pyautoattack directly, same points, same seed."
    from pyautoattack import AutoAttack
    x, y = load_arrays('cifar10', 'test')
    x, y = x[:a.aa_n].float().div(255), y[:a.aa_n].long()
    model = reference_resnet18().to(device)
    over = dict(n_iter=2, n_restarts=1, n_target_classes=1, n_queries=20) if a.tiny else {}
    version = 'standard' if not a.tiny else 'custom'
    attacks = None if not a.tiny else ['apgd-ce', 'apgd-t']
    # the tiny budget at 8/255 breaks every point on both sides, which would make their agreement say nothing
    eps = 8/255 if not a.tiny else 0.5/255
    sync = (lambda: torch.cuda.synchronize()) if device == 'cuda' else (lambda: None)
    # one untimed forward-backward first, so neither side pays the first call's kernel selection and allocations
    xw = x[:a.aa_batch].to(device).requires_grad_()
    torch.nn.functional.cross_entropy(model(xw), y[:a.aa_batch].to(device)).backward()
    model.zero_grad(set_to_none=True)
    sync(); t = time.perf_counter()
    aa = AA(eps=eps, version=version, attacks=attacks, batch_size=a.aa_batch, **over)
    rep = evaluate(model, x, y, [aa], n=a.aa_n)
    sync(); t_wb = time.perf_counter() - t
    t_wb_attack = rep.seconds[aa.name]
    adversary = AutoAttack(model, norm='Linf', eps=eps, version=version, attacks=attacks, seed=0, device=device)
    for sub in (adversary.apgd, adversary.apgd_targeted, adversary.fab):
        if 'n_iter' in over: sub.n_iter, sub.n_restarts = over['n_iter'], over['n_restarts']
    if 'n_target_classes' in over: adversary.apgd_targeted.n_target_classes = adversary.fab.n_target_classes = over['n_target_classes']
    sync(); t = time.perf_counter()
    x_adv, _ = adversary.run_standard_evaluation(x.to(device), y.to(device), batch_size=a.aa_batch)
    sync(); t_ref = time.perf_counter() - t
    with torch.no_grad():
        ref_ok = torch.cat([(model(x_adv[i:i + 500]).argmax(1) == y[i:i + 500].to(device)).cpu() for i in range(0, len(x), 500)])
    ref_acc = ref_ok.float().mean().item()
    wb_ok = rep.robust[aa.name].cpu()
    # `overhead` is the whole evaluate() call against pyautoattack's; evaluate() also runs its clean pass and sanity checks
    # (two forwards on 100 points, input gradients on up to 500, PGD-20 at eps 0.5 on up to 100), a fixed cost that
    # dominates the reduced --tiny budget but not the standard one, hence the attack-only figure beside it
    row = dict(n=a.aa_n, eps=eps, version=version, overrides=over, workbench_s=t_wb, workbench_attack_s=t_wb_attack,
               workbench_clean_s=rep.seconds['clean'], workbench_checks_s=rep.seconds.get('checks', 0.0), pyautoattack_s=t_ref,
               overhead=t_wb/t_ref - 1, overhead_attack=t_wb_attack/t_ref - 1,
               workbench_robust=rep.robust_accuracy[aa.name], pyautoattack_robust=ref_acc,
               per_sample_equal=bool(torch.equal(wb_ok, ref_ok)), clean=rep.clean_accuracy)
    print(f"  AutoAttack {version} at eps {255*eps:g}/255 on {a.aa_n} points: workbench {t_wb:.1f}s (AutoAttack {t_wb_attack:.1f}s, clean pass "
          f"{row['workbench_clean_s']:.1f}s, sanity checks {row['workbench_checks_s']:.1f}s), pyautoattack {t_ref:.1f}s, overhead "
          f"{100*row['overhead']:+.1f}% ({100*row['overhead_attack']:+.1f}% for the attack alone); robust accuracy "
          f"{100*row['workbench_robust']:.1f}% vs {100*ref_acc:.1f}%, per sample {'equal' if row['per_sample_equal'] else 'DIFFERENT'}", flush=True)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--tiny', action='store_true', help='CPU, tiny sizes: the CI run of the same code')
    p.add_argument('--out', default='device_check.json')
    a = p.parse_args(argv)
    device = 'cpu' if a.tiny else 'cuda'
    if device == 'cuda' and not torch.cuda.is_available():
        print('device_check: no CUDA device here; use --tiny for the CPU run', file=sys.stderr); return 2
    keep_freed_memory()
    if a.tiny:
        a.arch, a.steps, a.batch, a.eval_n, a.batches, a.aa_n, a.aa_batch = 'small_cnn', 8, 16, 32, 2, 16, 16
        a.throughput_archs = ['small_cnn']
    else:
        a.arch, a.steps, a.batch, a.eval_n, a.batches, a.aa_n, a.aa_batch = 'preact_resnet18', 20, 128, 500, 8, 1000, 500
        a.throughput_archs = ['preact_resnet18', 'wrn-34-10']
    x, y = load_arrays('cifar10', 'train')
    x, y = x[:(a.batches + 2)*128], y[:(a.batches + 2)*128]
    gpu = torch.cuda.get_device_name() if device == 'cuda' else None
    out = dict(machine=dict(gpu=gpu, cpu=platform.processor() or platform.machine(), torch=torch.__version__, threads=torch.get_num_threads()),
               tiny=a.tiny)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        print(f'1. methods ({a.arch}, {a.steps} steps of {a.batch}):', flush=True)
        out['methods'] = check_methods(a, Path(tmp), device)
    print('2. PGD-10 PGD-AT throughput:', flush=True)
    out['throughput'] = check_throughput(a, device, x, y)
    print('3. AutoAttack:', flush=True)
    try: out['autoattack'] = check_autoattack(a, device)
    except Exception as e: out['autoattack'] = dict(error=f'{type(e).__name__}: {e}'[:300], traceback=traceback.format_exc()[-2000:])
    out['seconds'] = time.perf_counter() - t0
    failed = [r['method'] for r in out['methods'] if not r['ok']] + [r['setting'] for r in out['throughput'] if 'error' in r]
    if 'error' in out['autoattack']: failed.append('autoattack')
    out['failed'] = failed
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"{len(failed)} failed{': ' + ', '.join(failed) if failed else ''}; {out['seconds']:.0f}s; results in {a.out}", flush=True)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
