"""F²AT small-scale comparison (issues 8 and 15): SAT vs F²AT (the estimator protocol chosen by `f2at_search.py`, and the
paper's frozen protocol) vs TRADES, all at the search's budget, with the `f2at` suite and the mechanism probe of every
other epoch; plus Fig. 8's natural-pattern accuracy of a standard model.

    python experiments/f2at_cifar.py --best online        # after f2at_search.py (its runs are reused)
    python experiments/f2at_cifar.py --baselines-only     # only train the TRADES and standard runs (any time)

The budget (`f2at-paper`'s recipe at CPU scale): small_cnn (width 32), the first 5,000 CIFAR-10 training images, 8 epochs of
batch 128 (40 SGD steps each), lr 0.1 with ×0.1 decays after epochs 4 and 6, weight decay 2e-4, momentum 0.9, PGD-10
(ε = 8/255, step 2/255), seed 0. F²AT: K = 2, α = 0.1, γ = 1, τ = 0.07, v = 0.995, estimators with U = 512 units
pre-trained 10 epochs (batch 400). SAT is the same code path with α = γ = 0."""
import argparse
import sys; sys.path.insert(0, 'experiments')
from common import *
from robustbench_lab.attacks import PGD, CWInf
from robustbench_lab.evaluate import craft, model_correct
from robustbench_lab.f2at import split_patterns

p = argparse.ArgumentParser()
p.add_argument('--best', help='the f2at_search.py configuration to report as F2AT (e.g. online)')
p.add_argument('--baselines-only', action='store_true', help='train the TRADES and standard runs and stop')
a = p.parse_args()
if not (a.best or a.baselines_only): p.error('--best CONFIG is required (unless --baselines-only)')

F2 = dict(dataset='cifar10', arch='small_cnn', n_train=5000, epochs=8, batch_size=128, lr=0.1, weight_decay=2e-4, schedule='multistep',
          milestones=[0.5, 0.75], eps=8/255, alpha=2/255, steps=10, seed=0, n_eval=500, n_report=500, suite='monitor', progress=False,
          resume='auto')
trades = finished_or_train('f2at-c10-trades', method='standard', objective='trades', **F2)
std = finished_or_train('f2at-c10-standard', method='standard', objective='clean', **{**F2, 'n_train': 10000, 'epochs': 10})
if a.baselines_only: sys.exit(0)
name = lambda config: f'f2at-search-{config}-n5000-e8'
sat, best, frozen = Run.load(name('sat')), Run.load(name(a.best)), Run.load(name('frozen'))
runs = {'SAT (alpha = gamma = 0)': sat, f'F2AT ({a.best})': best, **({'F2AT (frozen, the paper)': frozen} if a.best != 'frozen' else {}),
        'TRADES': trades}
rows = []
for label, r in runs.items():
    probes = [m for m in r.metrics if 'probe_i_nat' in m]
    extra = dict(i_nat_minus_shuffled=probes[-1]['probe_nat_margin'], grad_ratio=probes[-1]['probe_grad_ratio'],
                 signal_every_probe=all(not m['probe_no_signal'] for m in probes)) if probes and 'alpha = gamma = 0' not in label else {}
    rows.append(summary_row(label, r, evaluate_run(r, 'f2at'), extra))
x, y = load_arrays('cifar10', 'test'); x = x[:500].float()/255; y = y[:500]
m = std.model()
for atk in (PGD(eps=8/255, steps=20), CWInf(eps=8/255, steps=30)):
    xa = craft(atk, m, x, y, 250)
    rows.append(dict(method=f'standard model, {atk.name}', run=std.name, adversarial=100*model_correct(m, xa, y).float().mean().item(),
                     natural_pattern_K2=100*model_correct(m, split_patterns(xa, 2)[0], y).float().mean().item(),
                     clean=100*model_correct(m, x, y).float().mean().item(),
                     clean_natural_pattern_K2=100*model_correct(m, split_patterns(x, 2)[0], y).float().mean().item()))
write('f2at_cifar', rows, f'F2AT comparison (issue 15 budget): small_cnn, first 5,000 CIFAR-10 training images, 8 epochs x 40 steps of '
      f'batch 128, SGD lr 0.1 (x0.1 after epochs 4 and 6), weight decay 2e-4, PGD-10 (8/255, step 2/255), seed 0; F2AT K = 2, alpha 0.1, '
      f'gamma 1, tau 0.07, v 0.995, estimators U = 512 pre-trained 10 epochs; SAT: the same code with alpha = gamma = 0. Evaluation: '
      f'f2at suite on the first {N_EVAL} test images, AutoAttack on the first {N_AA}. i_nat_minus_shuffled / grad_ratio: the last '
      f'mechanism probe (256 test images). Fig. 8 rows: a standard small_cnn (10,000 images, 10 epochs, same optimiser).')
