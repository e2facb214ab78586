"""The CUDA path in one prepared script (issues 13 and 14): the throughput of PGD-AT under each setting, the distributed
path's overhead, AutoAttack's overhead through the workbench, every method training, and the papers' recipes' wall times
estimated from what was measured. Planned for one H200-class GPU within one 10-minute device call (`--budget-s`);
`--tiny` runs the same code on CPU in CI, so that it cannot rot.

    python benchmarks/prepare_device.py                                    # here: .devdata/ (data subset, pyautoattack)
    bash benchmarks/device_run.sh                                          # there: this script, results under $OUT
    python benchmarks/device_check.py --tiny --out /tmp/device_check.json  # CPU, tiny sizes

Sections, in this order (the most informative per second first; each row is skipped once `--budget-s` is spent, and
the JSON is rewritten after every row, so a run stopped at its time limit keeps what it measured):
1. **throughput**: PGD-10 PGD-AT (ε = 8/255, step 2/255, batch 128) on `preact_resnet18` and `wrn-34-10`: a plain
   reference loop (input-gradient PGD in eval mode, fp32, NCHW) and the learner with fp32 / bf16 × NCHW / channels-last
   × eager / compiled (eager rows first), and once with cuDNN autotuning instead of the deterministic kernels every
   training run requests; the other architectures of the papers' recipes in the estimates' setting (bf16,
   channels-last, eager); img/s and a 50,000-image epoch extrapolated.
2. **distributed** (issue 13): the same training through `train()` in this process and through the elastic launcher
   with one process (the path `torchrun` and `train(nproc=N)` take), alternately; the training throughput of the
   epochs after the first and the wall time of each call.
3. **autoattack**: the standard version on the first 1,000 CIFAR-10 test points against the `pyautoattack` ResNet-18,
   through `evaluate(..., ['AA'])` and through `pyautoattack` called directly: seconds, accuracies, overhead (≤ 5%).
4. **methods**: PGD-AT and each `-code` preset's method (and AFA Stage I/II, F²AT, IAT from their `-paper` presets)
   train two epochs of `--steps` steps on CIFAR-10 with bf16 autocast, channels-last and `compile=True` (CPU: the `eager`
   compile backend, which still captures every graph); an error, a non-finite loss or a loss that does not
   fall (mean of the last quarter of the steps not below the first quarter's) fails the check. The second epoch's
   median step time (compiled graphs cached; a variant first met there is one slow step, not part of it) is the
   method's per-image cost.
5. **estimates** (computed, not measured): each recipe's training time on 1 and 8 GPUs = epochs × 50,000 images × the
   method's per-image cost on `preact_resnet18` × the recipe architecture's PGD-AT cost over `preact_resnet18`'s; the
   8-GPU figure assumes perfect scaling. Per-epoch evaluation and helper/estimator pre-training are not included.
One JSON file (`--out`) and a table on stdout. Exit status 1 when a check failed.
"""
import time

STARTED = time.perf_counter()  # the time budget counts from here, before torch's (slow, on a fresh machine) import

import argparse
import contextlib
import json
import logging
import math
import platform
import signal
import statistics
import sys
import tempfile
import traceback
from pathlib import Path

import torch
import torch._dynamo
import torch.nn.functional as F

from robustbench_lab import distributed
from robustbench_lab.core import atomic_write, keep_freed_memory, seed_everything
from robustbench_lab.data import Loader, default_augment, load_arrays
from robustbench_lab.evaluate import AA, evaluate
from robustbench_lab.learner import Callback, CancelFitException, Learner
from robustbench_lab.methods import Standard
from robustbench_lab.models import create_model, reference_resnet18
from robustbench_lab.objectives import PGDAT
from robustbench_lab.runs import preset_values
from robustbench_lab.train import PRESETS, Run, resolve_config, train, worker_train

EPS, ALPHA, STEPS = 8/255, 2/255, 10
# every method, through the preset that names it (afa: Stage I, then Stage II on it); 'pgd-at' is the baseline the
# estimates measure every method's cost against
METHOD_PRESETS = ['hfat-code', 'dynat-code', 'trades-code', 'mart-code', 'awp-code', 'trades-awp-code', 'lbgat-code',
                  'gairat-code', 'mail-code', 'seat-code', 'help-code', 'oat-code', 'iat-paper', 'afa-paper', 'f2at-paper']
SECTIONS = ('throughput', 'distributed', 'autoattack', 'methods', 'compiled')
TRAIN_IMAGES = 50000  # CIFAR-10 / CIFAR-100 training set, for epoch times


class Results:
    "The rows measured so far, by section, and what they add up to, rewritten to `path` after every row; rows past the time budget are recorded as skipped."
    def __init__(self, path, budget_s, head, summarise, resume=None):
        self.path, self.budget_s, self.summarise = Path(path), budget_s, summarise
        self.out = dict(head, budget_s=budget_s)
        if resume:  # keep the rows an earlier call measured; what it skipped runs now
            old = json.loads(Path(resume).read_text())
            if old.get('tiny') != head['tiny']:
                raise ValueError(f"--resume: {resume} was written {'with' if old.get('tiny') else 'without'} --tiny, this call is the other kind")
            for section in ('throughput', 'distributed', 'resume', 'methods', 'autoattack'):
                rows = old.get(section) or []
                rows = [rows] if isinstance(rows, dict) else rows
                kept = [r for r in rows if 'skipped' not in r and 'error' not in r and r.get('ok', True)]  # failures run again
                if kept: self.out[section] = kept if section != 'autoattack' else kept[0]
            self.out['resumed_from'] = dict(path=str(resume), seconds=old.get('seconds'), machine=old.get('machine'))
        self.write()

    def done(self, section, **key) -> bool:
        "Was this row measured already (by an earlier call that this one resumes)?"
        rows = self.out.get(section) or []
        rows = [rows] if isinstance(rows, dict) else rows
        return any(all(r.get(k) == v for k, v in key.items()) for r in rows)

    def spent(self) -> bool: return bool(self.budget_s) and time.perf_counter() - STARTED > self.budget_s

    def add(self, section, row, key=()):
        "Record `row`, in place of an earlier row with the same values of the fields in `key`."
        if section == 'autoattack': self.out[section] = row
        else:
            rows = [r for r in self.out.get(section, []) if not key or any(r.get(k) != row.get(k) for k in key)]
            self.out[section] = rows + [row]
        self.write()
        return row

    def skip(self, section, **key):
        row = self.add(section, dict(key, skipped=f'time budget of {self.budget_s:g} s spent'), key=tuple(key))
        print(f"  skipped (time budget): {' '.join(str(v) for v in key.values())}", flush=True)
        return row

    def write(self):
        "The rows and their summaries (estimates, overheads, failures), so that a call killed at its limit loses only its last row."
        self.out.update(self.summarise(self.out), seconds=time.perf_counter() - STARTED)
        with atomic_write(self.path, 'w') as f: json.dump(self.out, f, indent=1)


def _steps(run_dir):
    return [json.loads(l) for l in (Path(run_dir)/'steps.jsonl').read_text().splitlines() if l]


class RecompileLimitWatch(logging.Handler):
    "Counts dynamo's 'hit config.recompile_limit' warnings: past the limit it runs the remaining variants eagerly, silently."
    def __init__(self):
        super().__init__(logging.WARNING); self.hits = 0
        logging.getLogger('torch._dynamo.convert_frame').addHandler(self)
    def emit(self, record):
        if 'recompile_limit' in record.getMessage(): self.hits += 1


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters
    return counters['stats']['unique_graphs']


def steady_img_per_s(steps, batch):
    "Training img/s from the median step time of the epochs after the first: a graph first compiled there (the Rice-based recipes attack each later epoch's first batch in eval mode, a variant the first epoch never ran) is one slow step, not part of the figure."
    later = [s['seconds'] for s in steps if s['epoch'] > 0] or [s['seconds'] for s in steps]
    return batch/statistics.median(later)


def later_epochs_img_per_s(metrics):
    "Training img/s of the epochs after the first (compilation, autotuning and caches warm in the first)."
    later = metrics[1:] or metrics
    return sum(m['train_img_per_s']*m['train_seconds'] for m in later)/sum(m['train_seconds'] for m in later)


def check_methods(a, runs_dir, device, res):
    "PGD-AT and each method train two epochs of `a.steps` steps; per method: seconds, first/last losses, per-image cost, verdict."
    fast = dict(amp='bf16', compile=True if device == 'cuda' else 'eager')
    common = dict(dataset='cifar10', arch=a.arch, n_train=a.steps*a.batch, batch_size=a.batch, epochs=2, device=device,
                  channels_last=True, n_eval=a.eval_n, n_report=a.eval_n, suite='monitor', runs_dir=str(runs_dir),
                  progress=False, resume=False, seed=0, helper_epochs=1, f2at_source_epochs=1, f2at_est_epochs=2,
                  guide_arch=a.arch, natural_arch=a.arch, **fast)
    if a.tiny: common.update(width=8, f2at_units=64, probe_n=16, hider_n=16)
    plan = [('pgd-at', dict(method='standard', objective='pgdat', eps=EPS, alpha=ALPHA, steps=STEPS))]
    # fp16 autocast's loss scaling (GradScaler: an overflowing step is skipped and the scale lowered, not taken for divergence)
    if device == 'cuda': plan.append(('pgd-at fp16', dict(plan[0][1], amp='fp16')))
    for preset in METHOD_PRESETS:
        if preset == 'afa-paper':
            plan += [('afa-paper stage 1', dict(preset=preset, afa_stage=1)),
                     ('afa-paper stage 2', dict(preset=preset, afa_stage=2, afa_from=str(runs_dir/'dc-afa-paper-stage-1')))]
        else: plan.append((preset, dict(preset=preset)))
    watch = RecompileLimitWatch()
    for label, extra in plan:
        if a.methods and label.split(' stage')[0] not in a.methods and label != 'pgd-at': continue
        # Stage II starts from Stage I's run folder, which only this call's temporary folder holds: the two run together
        pair = ['afa-paper stage 1', 'afa-paper stage 2'] if label.startswith('afa-paper') else [label]
        if all(res.done('methods', method=m) for m in pair): continue
        if res.spent(): res.skip('methods', method=label); continue
        if label == 'afa-paper stage 2' and not any(r.get('ok') for r in res.out.get('methods', []) if r['method'] == 'afa-paper stage 1'):
            res.add('methods', dict(method=label, ok=False, why='not run: Stage I failed'), key=('method',)); continue
        # each method compiles as in a process of its own: dynamo's recompile limit counts the variants of the one
        # forward that all models share, which would otherwise add up over the methods
        torch._dynamo.reset()
        t, hits, graphs = time.perf_counter(), watch.hits, compiled_graphs()
        name = 'dc-' + label.replace(' ', '-')
        try:
            params = {**common, **extra}
            run = train(run_name=name, **params)
            steps = _steps(runs_dir/name)
            losses = [s['loss'] for s in steps]
            q = max(1, len(losses)//4)
            first, last = sum(losses[:q])/q, sum(losses[-q:])/q
            finite = all(math.isfinite(v) for v in losses)
            fell, limit_hit = last < first, watch.hits > hits
            ok = finite and (fell or a.tiny) and not limit_hit
            why = 'non-finite loss' if not finite else 'dynamo hit its recompile limit (the rest ran eagerly)' if limit_hit else \
                  '' if fell else 'loss did not fall' + (' (not enforced under --tiny)' if a.tiny else '')
            row = dict(method=label, ok=ok, why=why, seconds=time.perf_counter() - t, steps=len(losses), loss_first=first,
                       loss_last=last, img_per_s_steady=steady_img_per_s(steps, params['batch_size']), graphs_compiled=compiled_graphs() - graphs,
                       amp=params['amp'], compile=params['compile'], amp_skipped=sum(m.get('amp_skipped_steps', 0) for m in run.metrics))
        except Exception as e:
            row = dict(method=label, ok=False, why=f'{type(e).__name__}: {e}'[:300], seconds=time.perf_counter() - t,
                       traceback=traceback.format_exc()[-2000:])
        res.add('methods', row, key=('method',))
        print(f"  {label:24s} {'ok  ' if row['ok'] else 'FAIL'} {row['seconds']:7.1f}s  "
              + (f"loss {row['loss_first']:.3f} -> {row['loss_last']:.3f}  {row['img_per_s_steady']:8.1f} img/s" if 'loss_first' in row else '')
              + f"  {row['why']}", flush=True)


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


def setting_label(s):
    if s is None: return 'reference loop (fp32, NCHW, eager)'
    return (f"learner {s['amp'] or 'fp32'}, {'channels-last' if s['channels_last'] else 'NCHW'}, "
            + ('compiled' if s['compile'] is True else f"compile={s['compile']!r}" if s['compile'] else 'eager')
            + (', autotuned (not deterministic)' if s.get('deterministic') is False else ''))


@contextlib.contextmanager
def kernel_choice(deterministic:bool):
    "Inside: cuDNN autotuning and any kernels (`deterministic=False`), or the deterministic kernels every run requests."
    if deterministic: yield; return
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, False
    torch.use_deterministic_algorithms(False)
    try: yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[:2]
        torch.use_deterministic_algorithms(before[2], warn_only=before[3])


def throughput_plan(a, device, compiled):
    "(arch, setting) rows of one throughput section: eager rows and the estimates' architectures, or the compiled rows."
    if compiled:
        settings = [dict(amp='bf16', channels_last=True, compile=True), dict(amp=None, channels_last=True, compile=True)] \
                   if device == 'cuda' else [dict(amp=None, channels_last=True, compile='eager')]
        return [(arch, s) for arch in a.throughput_archs for s in settings]
    settings = [dict(amp=None, channels_last=False, compile=False), dict(amp=None, channels_last=True, compile=False)]
    if device == 'cuda': settings += [dict(amp='bf16', channels_last=False, compile=False), dict(amp='bf16', channels_last=True, compile=False)]
    # what the deterministic kernels every training run requests (`seed_everything`) cost: cuDNN autotuned instead
    settings += [dict(settings[-1], deterministic=False)]
    return [(arch, s) for arch in a.throughput_archs for s in [None] + settings] + \
           [(arch, a.estimate_setting) for arch in a.estimate_archs if arch not in a.throughput_archs]


def check_throughput(a, device, x, y, res, compiled=False):
    "img/s of the reference loop and of the learner under each setting, per architecture."
    sync = (lambda: torch.cuda.synchronize()) if device == 'cuda' else (lambda: None)
    for arch, s in throughput_plan(a, device, compiled):
        label = setting_label(s)
        if res.done('throughput', arch=arch, setting=label): continue
        if res.spent(): res.skip('throughput', arch=arch, setting=label); continue
        kw = dict(width=8) if a.tiny and arch == 'small_cnn' else {}
        def fresh(cl):
            seed_everything(0)
            m = create_model(arch, 'cifar10', **kw).to(device)
            return m, Loader(x, y, batch_size=128, shuffle=True, augment=default_augment('cifar10'), seed=0, device=device, channels_last=cl)
        try:
            if s is None: v = plain_at(*fresh(False), a.batches, sync)
            else:
                model, loader = fresh(s['channels_last'])
                with kernel_choice(s.get('deterministic', True)):
                    v = learner_at(model, loader, a.batches, device=device, **{k: w for k, w in s.items() if k != 'deterministic'})
            ref = [r['img_per_s'] for r in res.out.get('throughput', []) if r['arch'] == arch and r.get('reference') and 'img_per_s' in r]
            row = dict(arch=arch, setting=label, reference=s is None, **(s or {}), img_per_s=v, epoch_s=TRAIN_IMAGES/v,
                       **(dict(vs_reference=v/ref[0]) if ref and s is not None else {}))
        except Exception as e:
            row = dict(arch=arch, setting=label, reference=s is None, error=f'{type(e).__name__}: {e}'[:300],
                       traceback=traceback.format_exc()[-2000:])
        res.add('throughput', row)
        print(f"  {arch:16s} {label:66s} " + (f"{row['img_per_s']:9.1f} img/s  epoch {row['epoch_s']:8.1f}s"
              + (f"  {row['vs_reference']:.2f}x" if 'vs_reference' in row else '') if 'error' not in row else 'ERROR ' + row['error']), flush=True)


def ddp_params(a, device, runs_dir) -> dict:
    "The training of section 2: PGD-AT, bf16 (CUDA) and channels-last, eager."
    return dict(dataset='cifar10', arch=a.arch, n_train=a.ddp_n_train, epochs=a.ddp_epochs, batch_size=a.batch, device=device,
                channels_last=True, amp='bf16' if device == 'cuda' else None, compile=False, n_eval=a.eval_n, n_report=a.eval_n,
                suite='monitor', runs_dir=str(runs_dir), progress=False, seed=0, **(dict(width=8, hider_n=16) if a.tiny else {}))


def check_distributed(a, device, runs_dir, res):
    "The same training through `train()` in this process and through the elastic launcher with one process, alternately."
    params = ddp_params(a, device, runs_dir)
    for pair in range(a.ddp_pairs):
        for mode in ('in-process', 'launched'):
            if res.done('distributed', pair=pair, mode=mode): continue
            if res.spent(): res.skip('distributed', pair=pair, mode=mode); continue
            name, t = f'dc-ddp-{pair}-{mode}', time.perf_counter()
            try:
                if mode == 'in-process': metrics = train(run_name=name, **params).metrics
                else: metrics = Run.load(distributed.launch(worker_train, (resolve_config(run_name=name, **params),), nproc=1)).metrics
                row = dict(pair=pair, mode=mode, img_per_s=later_epochs_img_per_s(metrics), epochs=len(metrics),
                           images_per_epoch=a.ddp_n_train, wall_s=time.perf_counter() - t)
            except Exception as e:
                row = dict(pair=pair, mode=mode, error=f'{type(e).__name__}: {e}'[:300], traceback=traceback.format_exc()[-2000:])
            res.add('distributed', row)
            print(f"  pair {pair + 1} {mode:11s} " + (f"{row['img_per_s']:9.1f} img/s (epochs 2-{row['epochs']}), call {row['wall_s']:6.1f}s"
                  if 'error' not in row else 'ERROR ' + row['error']), flush=True)
    if o := res.out.get('distributed_overhead'):
        print(f"  the launched path's per-image training time over in-process: {100*o['overhead_median']:+.1f}% (median of {o['pairs']})", flush=True)


def distributed_overhead(out) -> dict|None:
    "The launched path's per-image training time over the in-process one, per pair and their median."
    by = {(r['pair'], r['mode']): r for r in out.get('distributed', []) if 'img_per_s' in r}
    ratios = [by[p, 'in-process']['img_per_s']/by[p, 'launched']['img_per_s'] for p, m in sorted(by) if m == 'in-process' and (p, 'launched') in by]
    return dict(pairs=len(ratios), time_ratio_per_pair=ratios, overhead_median=statistics.median(ratios) - 1) if ratios else None


def check_resume(a, device, runs_dir, res):
    "Resume the finished in-process run of section 2 on the device: its checkpoint is read onto the device, every state restored."
    if res.done('resume', run='dc-ddp-0-in-process'): return
    if res.spent(): res.skip('resume', run='dc-ddp-0-in-process'); return
    run_dir = runs_dir/'dc-ddp-0-in-process'
    params = dict(ddp_params(a, device, runs_dir), run_name=run_dir.name)
    try:
        if not run_dir.exists(): train(**params)  # section 2 was measured by an earlier call
        before = Run.load(run_dir).metrics
        after = train(**params, resume=True).metrics
        # compared as JSON text: an undefined ratio (NaN, e.g. no hiders among a few points) is then equal to itself
        same = json.dumps(after, sort_keys=True) == json.dumps(before, sort_keys=True)
        row = dict(run=run_dir.name, ok=same, why='' if same else 'the resumed run trained again or changed its history')
    except Exception as e:
        row = dict(run=run_dir.name, ok=False, error=f'{type(e).__name__}: {e}'[:300], traceback=traceback.format_exc()[-2000:])
    res.add('resume', row)
    print(f"  resume of a finished run from its checkpoint on {device}: " + ('ok' if row['ok'] else 'FAIL ' + row.get('error', row.get('why', ''))), flush=True)


def check_autoattack(a, device, res):
    "Standard AutoAttack through the workbench and through pyautoattack directly, same points, same seed."
    if res.done('autoattack', n=a.aa_n): return
    if res.spent(): res.skip('autoattack', n=a.aa_n); return
    try: row = _autoattack_row(a, device)
    except Exception as e: row = dict(n=a.aa_n, error=f'{type(e).__name__}: {e}'[:300], traceback=traceback.format_exc()[-2000:])
    res.add('autoattack', row)


def _autoattack_row(a, device):
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
    # (two forwards on 100 points, input gradients on up to 500 clean-correct points, PGD-20 at eps 0.5 on up to 100), a
    # fixed cost that dominates the reduced --tiny budget but not the standard one, hence the attack-only figure beside it
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


def estimate_recipes(a, out) -> list:
    "Each recipe's training hours on 1 and 8 GPUs from the measured per-image costs (the missing measurement named where one is)."
    est = a.estimate_setting
    at = {r['arch']: r['img_per_s'] for r in out.get('throughput', []) if 'img_per_s' in r and not r.get('reference')
          and r.get('deterministic', True) and all(r.get(k) == v for k, v in est.items())}
    method = {r['method']: r['img_per_s_steady'] for r in out.get('methods', []) if r.get('ok') and r.get('img_per_s_steady')}
    rows = []
    for preset in METHOD_PRESETS:
        p = PRESETS[preset]
        stage2 = preset_values(dict(preset=preset, method='afa', afa_stage=2))
        stages = [('afa-paper stage 1', p['epochs']), ('afa-paper stage 2', stage2['epochs'])] if preset == 'afa-paper' \
                 else [(preset, p['epochs'])]
        arch = a.arch_of(p['arch'])
        for label, epochs in stages:
            need = {f'{label} on {a.arch}': method.get(label), f'PGD-AT on {arch} ({setting_label(est)})': at.get(arch),
                    f'PGD-AT on {a.arch} ({setting_label(est)})': at.get(a.arch)}
            row = dict(recipe=label, arch=p['arch'], measured_as=arch, epochs=epochs)
            if any(v is None for v in need.values()):
                rows.append(dict(row, missing=[k for k, v in need.items() if v is None])); continue
            s_per_image = at[a.arch]/(method[label]*at[arch])
            hours = epochs*TRAIN_IMAGES*s_per_image/3600
            rows.append(dict(row, s_per_image=s_per_image, epoch_s=TRAIN_IMAGES*s_per_image, hours_1_gpu=hours, hours_8_gpus_ideal=hours/8))
    return rows


def row_name(section, r) -> str:
    "How the summaries name a row."
    return dict(throughput=lambda: f"{r['arch']} {r['setting']}", distributed=lambda: f"distributed pair {r['pair'] + 1} {r['mode']}",
                resume=lambda: f"resume {r['run']}", methods=lambda: r['method'], autoattack=lambda: 'autoattack')[section]()


def summarise(a, out) -> dict:
    "What the rows so far add up to: the estimates, the distributed path's overhead, the failed and the skipped rows."
    rows = [(s, r) for s in ('throughput', 'distributed', 'resume', 'autoattack', 'methods')
            for r in ([out[s]] if isinstance(out.get(s), dict) else out.get(s) or [])]
    return dict(estimates=estimate_recipes(a, out), distributed_overhead=distributed_overhead(out),
                failed=[row_name(s, r) for s, r in rows if 'error' in r or r.get('ok') is False],
                skipped=[row_name(s, r) for s, r in rows if 'skipped' in r])


def configure(a, device):
    "The sizes of a GPU run or of the tiny CPU run."
    if a.tiny:
        a.arch, a.steps, a.batch, a.eval_n, a.batches, a.aa_n, a.aa_batch = 'small_cnn', 4, 16, 32, 2, 16, 16
        a.throughput_archs, a.estimate_archs, a.arch_of = ['small_cnn'], [], (lambda arch: 'small_cnn')
        a.ddp_n_train, a.ddp_epochs, a.ddp_pairs = 64, 2, 1
        a.estimate_setting = dict(amp=None, channels_last=True, compile=False)
    else:
        a.arch, a.steps, a.batch, a.eval_n, a.batches, a.aa_n, a.aa_batch = 'preact_resnet18', 20, 128, 500, 8, 1000, 500
        a.throughput_archs = ['preact_resnet18', 'wrn-34-10']
        a.estimate_archs, a.arch_of = sorted({PRESETS[p]['arch'] for p in METHOD_PRESETS}), (lambda arch: arch)
        a.ddp_n_train, a.ddp_epochs, a.ddp_pairs = 3072, 4, 2
        a.estimate_setting = dict(amp='bf16', channels_last=True, compile=False)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--tiny', action='store_true', help='CPU, tiny sizes: the CI run of the same code')
    p.add_argument('--out', default='device_check.json')
    p.add_argument('--budget-s', type=float, default=None,
                   help='start no row this many seconds after the start (default: 420 on CUDA, none under --tiny); 0: none')
    p.add_argument('--only', default=','.join(SECTIONS), help=f'comma-separated sections to run, of {",".join(SECTIONS)}')
    p.add_argument('--methods', default=None, help='comma-separated presets for the methods section (default: all)')
    p.add_argument('--resume', default=None, help="an earlier call's JSON: keep its rows, run what it skipped or lacked")
    a = p.parse_args(argv)
    only = [s.strip() for s in a.only.split(',') if s.strip()]
    if bad := [s for s in only if s not in SECTIONS]: p.error(f'--only: unknown section(s) {bad}; choose from {", ".join(SECTIONS)}')
    a.methods = [m.strip() for m in a.methods.split(',')] if a.methods else None
    if a.methods and (bad := [m for m in a.methods if m not in METHOD_PRESETS]):
        p.error(f'--methods: unknown preset(s) {bad}; choose from {", ".join(METHOD_PRESETS)}')
    if a.resume and not Path(a.resume).is_file(): p.error(f'--resume: no file {a.resume}')
    if a.budget_s is not None and a.budget_s < 0: p.error('--budget-s: must be >= 0 (0: no budget)')
    device = 'cpu' if a.tiny else 'cuda'
    if device == 'cuda' and not torch.cuda.is_available():
        print('device_check: no CUDA device here; use --tiny for the CPU run', file=sys.stderr); return 2
    configure(a, device)
    budget = a.budget_s if a.budget_s is not None else (0 if a.tiny else 420)
    keep_freed_memory()
    x, y = load_arrays('cifar10', 'train')
    x, y = x[:(a.batches + 2)*128], y[:(a.batches + 2)*128]
    gpu = torch.cuda.get_device_name() if device == 'cuda' else None
    head = dict(machine=dict(gpu=gpu, cpu=platform.processor() or platform.machine(), torch=torch.__version__,
                             python=platform.python_version(), threads=torch.get_num_threads()), tiny=a.tiny, sections=only)
    try: res = Results(a.out, budget, head, lambda out: summarise(a, out), resume=a.resume)
    except ValueError as e: p.error(str(e))
    # the device tool ends a call at its limit: keep what was measured (every row is written already) and say so
    signal.signal(signal.SIGTERM, lambda *_: (res.out.update(stopped='SIGTERM'), res.write(), sys.exit(143)))
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        if 'throughput' in only:
            print('1. PGD-10 PGD-AT throughput (eager):', flush=True); check_throughput(a, device, x, y, res)
        if 'distributed' in only:
            print(f'2. the distributed path ({a.arch}, {a.ddp_n_train} images x {a.ddp_epochs} epochs):', flush=True)
            check_distributed(a, device, runs, res)
            check_resume(a, device, runs, res)
        if 'autoattack' in only: print('3. AutoAttack:', flush=True); check_autoattack(a, device, res)
        if 'methods' in only:
            print(f'4. methods ({a.arch}, 2 epochs of {a.steps} steps of {a.batch}):', flush=True); check_methods(a, runs, device, res)
        if 'compiled' in only:
            print('5. PGD-10 PGD-AT throughput (compiled):', flush=True); check_throughput(a, device, x, y, res, compiled=True)
    out = res.out
    res.write()
    print(f"6. estimated training time (epochs x {TRAIN_IMAGES} images; {setting_label(a.estimate_setting)} for the architecture "
          f"factor, the methods' own setting on {a.arch}; 8 GPUs assume perfect scaling):", flush=True)
    for r in out['estimates']:
        print(f"  {r['recipe']:20s} {r['arch']:16s} {r['epochs']:4d} epochs  " + (f"{r['epoch_s']:8.1f} s/epoch  {r['hours_1_gpu']:7.2f} h on 1 GPU  "
              f"{r['hours_8_gpus_ideal']:6.2f} h on 8" if 'missing' not in r else 'not estimated, missing: ' + '; '.join(r['missing'])), flush=True)
    failed, skipped = out['failed'], out['skipped']
    print(f"{len(failed)} failed{': ' + ', '.join(failed) if failed else ''}; {len(skipped)} skipped (time budget); "
          f"{out['seconds']:.0f}s; results in {a.out}", flush=True)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
