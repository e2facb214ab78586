"""The AFA mechanism probe's W1(eps) curves of a Stage II run at its last probed epoch, as the paper's Fig. 6 draws them
(mean ± std over the probe set): on PGD examples against the fused model (white-box), against its strongest branch,
and against a separately trained source model (the paper's reading; with afa_source). Left at the paper's scale (0..1),
right as W1(eps) - W1(0), where a curve that moves by 1e-4 can be seen. Writes experiments/results/<run>-w1.png.

    python experiments/afa_curves.py afa-search-w32-n10k-e6-src-stem"""
import sys
from pathlib import Path

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np

from robustbench_lab.train import Run, scale_note

run = Run.load(sys.argv[1])
rec = [m for m in run.metrics if 'probe_w1_mean' in m][-1]
eps = np.array(rec['probe_eps'])*255
curves = {'white-box: PGD-10 against the AFA model': ('probe_w1_mean', 'probe_w1_std', 'probe_rho', 'o-'),
          "strongest branch's PGD-10 examples": ('probe_w1_transfer_mean', None, 'probe_rho_transfer', 's--'),
          f"transfer: PGD-10 against {Path(run.config.get('afa_source') or '-').name} (the paper's reading)":
              ('probe_w1_source_mean', 'probe_w1_source_std', 'probe_rho_source', 'd:')}
fig, ax = plt.subplots(1, 2, figsize=(11, 3.4))
for label, (m, s, r, style) in curves.items():
    if m not in rec: continue
    mean = np.array(rec[m])
    line, = ax[0].plot(eps, mean, style, ms=3, label=f'{label} (ρ = {rec[r]:.3f})')
    if s: ax[0].fill_between(eps, mean - np.array(rec[s]), mean + np.array(rec[s]), alpha=0.15, color=line.get_color())
    ax[1].plot(eps, mean - mean[0], style, ms=3, color=line.get_color())
    print(f'{label}: W1 {mean[0]:.4f} -> {mean[-1]:.4f}, range {mean.max() - mean.min():.5f}, rho {rec[r]:.4f}')
ax[0].set(xlabel='ε (×1/255)', ylabel='W₁ (adversarial branch)', ylim=(0, 1)); ax[0].legend(fontsize=7, loc='lower right')
ax[1].set(xlabel='ε (×1/255)', ylabel='W₁(ε) − W₁(0)', title='the same, zoomed'); ax[1].axhline(0, color='gray', lw=0.5)
fig.suptitle(f"Fig. 6 — {run.name}, Stage II epoch {rec['epoch'] + 1}, {len(eps)} strengths on the probe's first test images "
             f"({scale_note(run)})", fontsize=8)
fig.tight_layout()
out = Path('experiments/results')/f'{run.name}-w1.png'
fig.savefig(out, dpi=120)
print('wrote', out)
