"""HFAT small-scale comparison (issue 5): AT vs AT_HF and TRADES vs TRADES_HF under one budget, `hfat` suite,
hider ratios every epoch, seconds per epoch. Run from the repository root: `python experiments/hfat_cifar.py`."""
import sys; sys.path.insert(0, 'experiments')
from common import *

TRACK = dict(hiders=True, hider_n=500, hider_positions=True, keep_epochs=1)  # Fig. 2-4 are recorded during training
HF = dict(method='hfat', hfat_steps_s=5, **TRACK)
runs = {
    'AT': run('hfat-c10-at', method='standard', objective='pgdat', **TRACK),
    'AT_HF': run('hfat-c10-at_hf', objective='pgdat', **HF),
    'TRADES': run('hfat-c10-trades', method='standard', objective='trades', **TRACK),
    'TRADES_HF': run('hfat-c10-trades_hf', objective='trades', **HF),
    'standard': run('hfat-c10-standard', method='standard', objective='clean', keep_epochs=1),
}
rows = []
for label in ('AT', 'AT_HF', 'TRADES', 'TRADES_HF'):
    r = runs[label]
    reps = evaluate_run(r, 'hfat')
    last = r.metrics[-1]
    hid = {k.replace('hider_', 'hider ').replace('_d', ' Δ='): round(v, 4) for k, v in last.items()
           if k.startswith('hider_adv_d') or k.startswith('hider_nat_d')}
    hid = {k: v for k, v in hid.items() if 'uncond' not in k}
    rows.append(summary_row(label, r, reps, hid))
write('hfat_cifar', rows, 'HFAT comparison: small_cnn, first 5,000 CIFAR-10 training images, 8 epochs, seed 0; HFAT with 5 '
      'standard-branch steps and the code weighting; hider ratios of the last epoch (500 test points). `s/epoch` is '
      'the mean training time per epoch under whatever ran beside each job: HFAT\'s overhead over AT is measured in '
      'BENCHMARKS.md (interleaved, one process), not here.')
