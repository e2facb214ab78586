"""AFA small-scale comparison (issues 7 and 15): PGD-AT vs PGD-AT + AFA (K = 5) at the budget of `afa_search.py` (its runs
are reused when they exist), the `afa` suite (PGD at 0..8/255, FGSM, CW, and PGD+Ada for the AFA model), AutoAttack, and
the mechanism probe of every Stage II epoch.

    python experiments/afa_cifar.py [--placement stem|per_layer] [--label w32-n10k --stage1-epochs 10 --stage2-epochs 20]

The budget, `afa-paper`'s recipe at CPU scale: small_cnn (width 32), the first 10,000 CIFAR-10 training images, batch 128,
seed 0, ε = 8/255. Stage I: 10 epochs by default, SGD lr 0.1 (decays ×0.1 after 75% and 90% of the epochs: epochs 9 and 10),
weight decay 5e-4, K = 5 branches at ξ = 0, 1, 2, 4, 8 /255, PGD-7 per branch with OAT's steps. Stage II: the
`afa-paper` Stage II recipe — 20 epochs by default, lr 0.01 with one ×0.1 decay halfway, backbone frozen. PGD-AT baseline:
the same network, data and Stage I schedule, PGD-7 (step 2/255)."""
import argparse
import sys; sys.path.insert(0, 'experiments')
from common import *
from robustbench_lab.probes import feature_statistics

p = argparse.ArgumentParser()
p.add_argument('--placement', default='stem', choices=['stem', 'per_layer'])
p.add_argument('--label', default='w32-n10k', help="afa_search.py's --label: its runs are reused")
p.add_argument('--stage1-epochs', type=int, default=10)
p.add_argument('--stage2-epochs', type=int, default=20)
a = p.parse_args()

AFA_BUDGET = dict(preset='afa-paper', dataset='cifar10', arch='small_cnn', width=32, n_train=10000, afa_K=5, seed=0, n_eval=500,
                  n_report=500, progress=False, resume='auto')
at = finished_or_train(f'afa-c10-pgdat-{a.label}', method='standard', objective='pgdat', alpha=2/255, steps=7, epochs=a.stage1_epochs, lr=0.1,
           weight_decay=5e-4, schedule='multistep', milestones=[0.75, 0.9], **{k: v for k, v in AFA_BUDGET.items() if k not in ('preset', 'afa_K')})
s1 = finished_or_train(f'afa-search-{a.label}-stage1', afa_stage=1, epochs=a.stage1_epochs, suite='monitor', **AFA_BUDGET)
s2 = finished_or_train(f'afa-search-{a.label}-{a.placement}', afa_stage=2, afa_from=str(s1.dir), afa_placement=a.placement, epochs=a.stage2_epochs,
           lr=0.01, suite='afa', probe_n=256, probe_every=4, **AFA_BUDGET)
rows = []
for label, r in (('PGD-AT', at), (f'PGD-AT + AFA (K=5, {a.placement})', s2)):
    rows.append(summary_row(label, r, evaluate_run(r, 'afa', tag='afa')))
    saved = r.dir/f'report_aa{N_AA}.json'
    rep_aa = Report.load(saved) if saved.exists() else evaluate(r.model(), *load_arrays('cifar10', 'test'), ['AA'], n=N_AA, meta=dict(run=r.name))
    rep_aa.save(saved)
    rows[-1][f'AA (n={N_AA})'] = 100*rep_aa.robust_accuracy['AA']; rows[-1][f'clean (n={N_AA})'] = 100*rep_aa.clean_accuracy
x, y = load_arrays('cifar10', 'test'); x = x[:256].float()/255; y = y[:256]
fs = s1.cached('bn-input-stats-branch4-n256', lambda: feature_statistics(s1.model(raw=True), x, y, [k/255 for k in range(9)], branch=4))
probes = [m for m in s2.metrics if 'probe_rho' in m]
for m in probes:
    rows.append(dict(method=f"probe, Stage II epoch {m['epoch'] + 1}", run=s2.name, rho=m['probe_rho'], w1_range=m['probe_w1_range'],
                     w1_at_0=m['probe_w1_mean'][0], w1_at_8=m['probe_w1_mean'][-1], fused_at_least_best=m['probe_fused_at_least_best'],
                     ce_gap_clean=m['probe_ce_clean_b1'] - m['probe_ce_clean_b0'], ce_gap_adv=m['probe_ce_adv_b1'] - m['probe_ce_adv_b0'],
                     flat=m['probe_flat']))
rows.append(dict(method='Stage I BN input statistics', run=s1.name, monotonicity=fs['monotonicity']))
steps1, steps2 = a.stage1_epochs*len(range(0, 10000, 128)), a.stage2_epochs*len(range(0, 10000, 128))
write('afa_cifar', rows,
      f'AFA comparison (issue 15 budget): small_cnn (width 32), first 10,000 CIFAR-10 training images, batch 128, seed 0. '
      f'Stage I: {a.stage1_epochs} epochs = {steps1} SGD steps, lr 0.1 (x0.1 after 75% and 90% of them), weight decay 5e-4, K = 5, xi = 0,1,2,4,8 /255, PGD-7 '
      f'per branch (OAT step). Stage II ({a.placement}): {a.stage2_epochs} epochs = {steps2} steps, lr 0.01, x0.1 halfway (the afa-paper '
      f'Stage II recipe). PGD-AT baseline: same network, data and schedule, PGD-7 step 2/255. Evaluation: afa suite on the first '
      f'{N_EVAL} test images, AutoAttack on the first {N_AA}; probe rows: the mechanism probe on 256 test images every 4 Stage II epochs.')
