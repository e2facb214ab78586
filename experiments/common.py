"""Shared settings of the small-scale CIFAR-10 comparisons (CPU budget): one training budget for every method,
evaluation on the first test images in official order, AutoAttack on a smaller prefix because of its cost."""
import json
import sys
import time
from pathlib import Path

from robustbench_lab.data import load_arrays
from robustbench_lab.evaluate import AA, Report, evaluate, make_suite
from robustbench_lab.study import markdown
from robustbench_lab.train import Run, train

# the one training budget: small_cnn (width 32), first 5,000 CIFAR-10 training images, 8 epochs, batch 128,
# SGD lr 0.1 with the piecewise schedule, weight decay 5e-4, seed 0, eps 8/255
BUDGET = dict(dataset='cifar10', arch='small_cnn', n_train=5000, epochs=8, batch_size=128, lr=0.1, schedule='piecewise',
              weight_decay=5e-4, eps=8/255, seed=0, n_eval=500, n_report=500, suite='monitor', progress=False, resume='auto')
N_EVAL, N_AA = 500, 100


def run(name, **params):
    "Train (or reopen a finished) run of the comparison."
    t = time.time()
    r = train(run_name=name, **{**BUDGET, **params})
    print(f'{name}: trained in {time.time() - t:.0f}s', flush=True)
    return r


def finished_or_train(run_name, **params):
    "The finished run of that name (its report written) when its stored settings agree with `params`, else train (or continue) it."
    from robustbench_lab.core import settings
    if not (settings().runs_dir/run_name/'report.json').exists(): return train(run_name=run_name, **params)
    r = Run.load(run_name)
    differ = sorted(k for k, v in params.items() if k not in ('resume', 'progress') and k in r.config and r.config[k] != v)
    if differ: raise ValueError(f'{run_name}: finished with other settings ({", ".join(differ)}); choose another name')
    return r


def evaluate_run(r, suite, eps=8/255, n=N_EVAL, n_aa=N_AA, tag=None):
    "The suite without AutoAttack on the first `n` test points, AutoAttack entries on the first `n_aa`; both reports saved in the run."
    x, y = load_arrays('cifar10', 'test')
    model = r.model()
    attacks = make_suite(suite, eps, model)
    main = [a for a in attacks if not isinstance(a, AA)]
    # AA-rand (APGD-CE/DLR with 20-sample EOT) is for randomised defences; these models are deterministic (the sanity
    # check 'randomized' would flag them otherwise), so it only repeats AA at 20x the cost and is left out here
    aas = [a for a in attacks if isinstance(a, AA) and a.version != 'rand']
    tag = tag or suite
    out = {}
    saved, saved_aa = r.dir/f'report_{tag}.json', r.dir/f'report_{tag}_aa{n_aa}.json'
    if saved.exists() and (saved_aa.exists() or not aas):  # evaluated by an earlier (or a parallel) invocation
        out['main'] = Report.load(saved)
        if aas: out['aa'] = Report.load(saved_aa)
        return out
    t = time.time()
    rep = evaluate(model, x, y, main, n=n, meta=dict(run=r.name, arch=r.config['arch'], dataset='cifar10', suite=suite))
    rep.save(r.dir/f'report_{tag}.json'); out['main'] = rep
    print(f'{r.name}: {tag} suite on {n} points in {time.time() - t:.0f}s', flush=True)
    if aas:
        t = time.time()
        rep_aa = evaluate(model, x, y, aas, n=n_aa, meta=dict(run=r.name, arch=r.config['arch'], dataset='cifar10', suite=f'{suite} (AutoAttack)'))
        rep_aa.save(r.dir/f'report_{tag}_aa{n_aa}.json'); out['aa'] = rep_aa
        print(f'{r.name}: AutoAttack {[a.name for a in aas]} on {n_aa} points in {time.time() - t:.0f}s', flush=True)
    return out


def summary_row(label, r, reps, extra=None):
    "One table row: clean and robust accuracies (%), worst case, hider ratio, seconds per epoch."
    row = dict(method=label, run=r.name, clean=100*reps['main'].clean_accuracy)
    row.update({k: 100*v for k, v in reps['main'].robust_accuracy.items()})
    if 'aa' in reps:
        row.update({f'{k} (n={reps["aa"].n})': 100*v for k, v in reps['aa'].robust_accuracy.items()})
        row[f'clean (n={reps["aa"].n})'] = 100*reps['aa'].clean_accuracy
    row['worst case (main)'] = 100*reps['main'].worst_case
    row['s/epoch'] = sum(m['train_seconds'] for m in r.metrics)/len(r.metrics)
    row['flags'] = [f['code'] for rp in reps.values() for f in rp.flags]
    row.update(extra or {})
    return row


def write(name, rows, notes=''):
    import pandas as pd
    df = pd.DataFrame(rows)
    Path('experiments/results').mkdir(parents=True, exist_ok=True)
    Path(f'experiments/results/{name}.json').write_text(json.dumps(rows, indent=1, default=str))
    md = markdown(df.drop(columns=['run']), index=False)
    Path(f'experiments/results/{name}.md').write_text(f'{notes}\n\n{md}\n')
    print(md, flush=True)
