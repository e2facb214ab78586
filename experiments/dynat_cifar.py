"""DYNAT small-scale comparison (issue 6): PGD-AT, LBGAT, DYNAT and DYNAT-AWP under one budget, `dynat` suite,
guide-agreement curves. Target and guide are both small_cnn. `python experiments/dynat_cifar.py`."""
import sys; sys.path.insert(0, 'experiments')
from common import *

# the DYNAT code base trains with the TRADES family's attack settings: eps 0.031, step 0.007, LBGAT schedule, wd 2e-4
D = dict(epochs=5, eps=0.031, alpha=0.007, steps=10, schedule='lbgat', weight_decay=2e-4)
SPECS = {
    'PGD-AT': ('dynat-c10-pgdat', dict(method='standard', objective='pgdat')),
    'LBGAT': ('dynat-c10-lbgat', dict(method='lbgat')),
    'DYNAT': ('dynat-c10-dynat', dict(method='dynat', objective='pgdat')),
    'DYNAT-AWP': ('dynat-c10-dynat-awp', dict(method='dynat', objective='pgdat', dynat_awp=True, beta=1.0)),
}
# `dynat_cifar.py LABEL ...` trains and evaluates only those runs (two invocations can share the work, one per
# core); without arguments every run is trained or reopened, evaluated or its saved reports reused, and the table written
only = sys.argv[1:] or list(SPECS)
if set(only) - set(SPECS): sys.exit(f'unknown run label(s) {sorted(set(only) - set(SPECS))}; known: {list(SPECS)}')
runs, reps = {}, {}
for label in only:
    name, kind = SPECS[label]
    runs[label] = run(name, **kind, **D)
    reps[label] = evaluate_run(runs[label], 'dynat', eps=0.031)
if len(only) < len(SPECS): sys.exit(0)
rows = []
for label, r in runs.items():
    reps_r = reps[label]
    m = r.metrics
    extra = dict(agree_first=m[0].get('label_agree'), agree_last=m[-1].get('label_agree'),
                 guide_test_last=m[-1].get('guide_test_acc'), target_train_last=m[-1].get('train_acc'))
    rows.append(summary_row(label, r, reps_r, extra))
write('dynat_cifar', rows, 'DYNAT comparison: target small_cnn (guide small_cnn for DYNAT, natural small_cnn for LBGAT), first 5,000 '
      'CIFAR-10 training images, 5 epochs, LBGAT schedule, eps 0.031, step 0.007, seed 0. DYNAT-AWP = the beta = 1 variant.')
