"""F2AT small-scale comparison (issue 8): SAT (PGD-AT) vs F2AT vs TRADES under one budget with the `f2at` suite,
plus Fig. 8's natural-pattern accuracy of a standard model. Reuses the HFAT comparison's AT and TRADES runs as
SAT and TRADES (same budget). `python experiments/f2at_cifar.py` (after hfat_cifar.py)."""
import sys; sys.path.insert(0, 'experiments')
from common import *
import torch
from robustbench_lab.attacks import PGD, CWInf
from robustbench_lab.evaluate import craft, model_correct
from robustbench_lab.f2at import split_patterns

sat, trades = Run.load('hfat-c10-at'), Run.load('hfat-c10-trades')
f2 = run('f2at-c10-f2at', method='f2at', f2at_source_run=str(sat.dir), f2at_units=512, f2at_est_epochs=5, f2at_est_batch=250)
rows = [summary_row(label, r, evaluate_run(r, 'f2at')) for label, r in (('SAT (PGD-AT)', sat), ('F2AT', f2), ('TRADES', trades))]
std = Run.load('sanity-clean-c10k-e10')  # the standard small_cnn of the issue-4 sanity result
x, y = load_arrays('cifar10', 'test'); x = x[:500].float()/255; y = y[:500]
m = std.model()
for atk in (PGD(eps=8/255, steps=20), CWInf(eps=8/255, steps=30)):
    xa = craft(atk, m, x, y, 250)
    rows.append(dict(method=f'standard model, {atk.name}', run=std.name, adversarial=100*model_correct(m, xa, y).float().mean().item(),
                     natural_pattern_K2=100*model_correct(m, split_patterns(xa, 2)[0], y).float().mean().item(),
                     clean=100*model_correct(m, x, y).float().mean().item(),
                     clean_natural_pattern_K2=100*model_correct(m, split_patterns(x, 2)[0], y).float().mean().item()))
write('f2at_cifar', rows, 'F2AT comparison: small_cnn, first 5,000 CIFAR-10 training images, 8 epochs, seed 0 (the HFAT comparison\'s '
      'AT and TRADES runs serve as SAT and TRADES); F2AT with K = 2, alpha 0.1, gamma 1, tau 0.07, v 0.995, estimators U = 512 '
      'pre-trained 5 epochs on the SAT run. Fig. 8 rows: the standard small_cnn of the issue-4 sanity run (10k images, 10 epochs).')
