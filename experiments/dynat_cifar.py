"""DYNAT small-scale comparison (issue 6): PGD-AT, LBGAT, DYNAT and DYNAT-AWP under one budget, `dynat` suite,
guide-agreement curves. Target and guide are both small_cnn. `python experiments/dynat_cifar.py`."""
import sys; sys.path.insert(0, 'experiments')
from common import *

# the DYNAT code base trains with the TRADES family's attack settings: eps 0.031, step 0.007, LBGAT schedule, wd 2e-4
D = dict(epochs=5, eps=0.031, alpha=0.007, steps=10, schedule='lbgat', weight_decay=2e-4)
runs = {
    'PGD-AT': run('dynat-c10-pgdat', method='standard', objective='pgdat', **D),
    'LBGAT': run('dynat-c10-lbgat', method='lbgat', **D),
    'DYNAT': run('dynat-c10-dynat', method='dynat', objective='pgdat', **D),
    'DYNAT-AWP': run('dynat-c10-dynat-awp', method='dynat', objective='pgdat', dynat_awp=True, beta=1.0, **D),
}
rows = []
for label, r in runs.items():
    reps = evaluate_run(r, 'dynat', eps=0.031)
    m = r.metrics
    extra = dict(agree_first=m[0].get('label_agree'), agree_last=m[-1].get('label_agree'),
                 guide_test_last=m[-1].get('guide_test_acc'), target_train_last=m[-1].get('train_acc'))
    rows.append(summary_row(label, r, reps, extra))
write('dynat_cifar', rows, 'DYNAT comparison: target small_cnn (guide small_cnn for DYNAT, natural small_cnn for LBGAT), first 5,000 '
      'CIFAR-10 training images, 5 epochs, LBGAT schedule, eps 0.031, step 0.007, seed 0. DYNAT-AWP = the beta = 1 variant.')
