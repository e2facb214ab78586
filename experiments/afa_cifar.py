"""AFA small-scale comparison (issue 7): PGD-AT vs PGD-AT + AFA (K = 5) under one budget: `afa` suite (PGD at
0..8/255, FGSM, CW, and PGD+Ada for the AFA model), AutoAttack, and the probes' curves. `python experiments/afa_cifar.py`."""
import sys; sys.path.insert(0, 'experiments')
from common import *
from robustbench_lab.probes import feature_statistics, fusing_weight_curve

at = run('afa-c10-pgdat', method='standard', objective='pgdat', alpha=2/255, steps=7)  # the same 7-step attack budget as AFA's branches
s1 = run('afa-c10-pgdat-K5-stage1', method='afa', afa_stage=1, afa_K=5, objective='pgdat', n_report=200)
s2 = run('afa-c10-pgdat-K5', method='afa', afa_stage=2, afa_K=5, afa_from=str(s1.dir), epochs=2, lr=0.01, schedule='multistep')
rows = []
for label, r in (('PGD-AT', at), ('PGD-AT + AFA (K=5)', s2)):
    rows.append(summary_row(label, r, evaluate_run(r, 'afa', tag='afa')))
    rep_aa = evaluate(r.model(), *load_arrays('cifar10', 'test'), ['AA'], n=N_AA, meta=dict(run=r.name))
    rep_aa.save(r.dir/f'report_aa{N_AA}.json')
    rows[-1][f'AA (n={N_AA})'] = 100*rep_aa.robust_accuracy['AA']; rows[-1][f'clean (n={N_AA})'] = 100*rep_aa.clean_accuracy
x, y = load_arrays('cifar10', 'test'); x = x[:256].float()/255; y = y[:256]
fs = feature_statistics(s1.model(raw=True), x, y, [k/255 for k in range(9)], branch=4)
fw = fusing_weight_curve(s2.model(), x, y, [k/2/255 for k in range(17)])
rows.append(dict(method='probes', run=s2.name, monotonicity=fs['monotonicity'],
                 w1_by_eps={f'{k/2:g}': round(v, 4) for k, v in enumerate(fw['mean'])}))
write('afa_cifar', rows, 'AFA comparison: small_cnn, first 5,000 CIFAR-10 training images, 8 epochs (Stage I, K = 5, '
      'xi = 0,1,2,4,8 /255, PGD-7 per branch) + 2 epochs Stage II (lr 0.01); PGD-AT baseline with PGD-7 (2/255), 8 epochs; seed 0.')
