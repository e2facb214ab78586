"""Evaluation on real weights: attack ordering, AutoAttack equality and resume, sanity flags, reports."""
import json

import pytest
import torch
import torch.nn as nn

from robustbench_lab.attacks import FGSM, PGD
from robustbench_lab.core import ConfigError
from robustbench_lab.evaluate import (AA, Quantize, Report, Square, TransferAttack, autoattack, evaluate, leaderboard,
                                      make_suite, sanity_checks, transfer_matrix)
from robustbench_lab.models import create_model

EPS = 1/255


@pytest.fixture(scope='module')
def first100(cifar_test):
    x, y = cifar_test
    return x[:100].float()/255, y[:100]


def test_pgd_below_fgsm_below_clean_on_reference_model(reference_model, first100):
    x, y = first100
    rep = evaluate(reference_model, x, y, [FGSM(eps=EPS), PGD(eps=EPS, steps=10)], checks=False)
    ra = rep.robust_accuracy
    assert ra['PGD-10'] <= ra['FGSM'] <= rep.clean_accuracy
    assert rep.clean_accuracy >= 0.93 and ra['PGD-10'] < ra['FGSM'] - 0.1  # a standard model is visibly weaker under PGD
    assert rep.worst_case == pytest.approx(min(ra.values()))  # FGSM-robust ⊇ PGD-robust here, point by point
    assert set(ra) == {'FGSM', 'PGD-10'} and all(0 <= v <= 1 for v in ra.values())


def _direct(model, x, y, **over):
    from pyautoattack import AutoAttack
    adv = AutoAttack(model, attacks=['apgd-ce', 'apgd-t'], device='cpu', eps=EPS, norm='Linf', seed=0, version='custom')
    for sub in (adv.apgd, adv.apgd_targeted, adv.fab):
        sub.n_iter = over['n_iter']
        if 'n_restarts' in over: sub.n_restarts = over['n_restarts']
    adv.apgd_targeted.n_target_classes = over['n_target_classes']
    return adv.run_standard_evaluation(x.contiguous(), y.contiguous(), batch_size=50)


def _check_autoattack_equals_direct(model, x, y, **over):
    model.eval()
    x_adv, robust = autoattack(model, x, y, eps=EPS, version='custom', attacks=['apgd-ce', 'apgd-t'], seed=0, batch_size=50, **over)
    xd, yd = _direct(model, x, y, **over)
    assert torch.equal(x_adv, xd) and torch.equal(robust, yd == y)
    assert 0 < robust.sum() < (model(x).argmax(1) == y).sum()  # the attack did something, and not everything


def test_autoattack_matches_pyautoattack_exactly(reference_model, first100):
    x, y = first100
    _check_autoattack_equals_direct(reference_model, x, y, n_iter=3, n_restarts=1, n_target_classes=2)


@pytest.mark.slow
def test_autoattack_matches_pyautoattack_exactly_default_iterations(reference_model, first100):
    x, y = first100
    _check_autoattack_equals_direct(reference_model, x, y, n_iter=100, n_target_classes=9)


class _Crash(nn.Module):
    """Raises after `budget` forward passes: a process killed in the middle of an AutoAttack run."""
    def __init__(self, model, budget): super().__init__(); self.model, self.budget = model, budget
    def forward(self, x):
        self.budget -= 1
        if self.budget < 0: raise KeyboardInterrupt('killed')
        return self.model(x)


def test_autoattack_resumes_from_its_state_file(reference_model, first100, tmp_path):
    x, y = first100[0][:24], first100[1][:24]
    kw = dict(eps=EPS, version='custom', attacks=['apgd-ce', 'apgd-t'], seed=0, batch_size=24, n_iter=3, n_restarts=1, n_target_classes=2)
    ref_adv, ref_robust = autoattack(reference_model, x, y, **kw)
    state = tmp_path/'aa.pt'
    crashing = _Crash(reference_model, budget=30)  # enough for the clean pass and APGD-CE, not for APGD-T
    with pytest.raises(KeyboardInterrupt): autoattack(crashing, x, y, state_path=state, **kw)
    st = torch.load(state, weights_only=True)
    assert st['done'] == ['apgd-ce']
    x_adv, robust = autoattack(reference_model, x, y, state_path=state, **kw)
    assert torch.equal(robust, ref_robust) and torch.equal(x_adv, ref_adv)
    with pytest.raises(ConfigError, match='different evaluation'): autoattack(reference_model, x, y, state_path=state, **{**kw, 'seed': 1})


def test_masked_gradients_are_flagged(reference_model, first100):
    x, y = first100[0][:12], first100[1][:12]
    rep = evaluate(Quantize(reference_model), x, y, [PGD(eps=EPS, steps=5)])
    codes = {f['code'] for f in rep.flags}
    assert {'zero_grad', 'large_eps'} <= codes
    honest = evaluate(reference_model, x, y, [PGD(eps=EPS, steps=5)])
    assert not ({'zero_grad', 'large_eps'} & {f['code'] for f in honest.flags})


def test_randomized_model_is_flagged():
    class NoisyLinear(nn.Module):  # dropout that stays on at test time: a randomised forward pass
        def __init__(self): super().__init__(); self.lin = nn.Linear(48, 10)
        def forward(self, x): return nn.functional.dropout(self.lin(x.flatten(1)), 0.5, training=True)
    torch.manual_seed(0)
    rep = evaluate(NoisyLinear(), torch.rand(20, 3, 4, 4), torch.randint(0, 10, (20,)), [PGD(eps=EPS, steps=2)])
    assert 'randomized' in {f['code'] for f in rep.flags}


def test_fgsm_and_blackbox_flags_from_results():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 10)).eval()
    x, y = torch.rand(10, 3, 2, 2), torch.zeros(10, dtype=torch.long)
    clean = torch.ones(10, dtype=torch.bool)
    bits = lambda k: torch.tensor([True]*k + [False]*(10 - k))
    attacks = {'FGSM': dict(kind='white-box', eps=EPS), 'PGD-20': dict(kind='white-box', eps=EPS),
               'Square': dict(kind='black-box', eps=EPS)}
    flags = sanity_checks(model, x, y, clean, {'FGSM': bits(3), 'PGD-20': bits(6), 'Square': bits(2)}, attacks, n_grad=0, n_large=0)
    codes = [f['code'] for f in flags]
    assert 'fgsm_beats_pgd' in codes and 'blackbox_beats_whitebox' in codes
    flags = sanity_checks(model, x, y, clean, {'FGSM': bits(7), 'PGD-20': bits(6), 'Square': bits(8)}, attacks, n_grad=0, n_large=0)
    assert not {'fgsm_beats_pgd', 'blackbox_beats_whitebox'} & {f['code'] for f in flags}


def test_report_json_robustbench_and_leaderboard(tmp_path):
    torch.manual_seed(0)
    m = create_model('small_cnn', 'cifar10', width=8).eval()
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    with torch.no_grad(): y = m(x).argmax(1)
    y[12:] = (y[12:] + 1) % 10  # four clean mistakes
    rep = evaluate(m, x, y, ['FGSM', 'PGD-5'], eps=EPS, meta=dict(arch='small_cnn', dataset='cifar10'))
    back = Report.load(rep.save(tmp_path/'a'/'report.json'))
    assert back.robust_accuracy == rep.robust_accuracy and back.clean_accuracy == rep.clean_accuracy == 12/16
    rb = rep.to_robustbench(name='x')
    assert rb['clean_acc'] == '75.00' and rb['eps'] == '1/255' and rb['dataset'] == 'cifar10' and rb['autoattack_acc'] == ''
    rep2 = evaluate(m, x, y, ['FGSM'], eps=EPS)
    rep2.save(tmp_path/'b'/'report.json')
    lb = leaderboard(tmp_path)
    assert list(lb['report']) == sorted(['a', 'b'], key=lambda r: -float(lb.set_index('report').loc[r, 'worst case']))
    assert lb['worst case'].is_monotonic_decreasing and 'PGD-5' in lb


def test_transfer_matrix_diagonal_is_white_box():
    torch.manual_seed(0)
    a, b = (create_model('small_cnn', 'cifar10', width=8).eval() for _ in range(2))
    x, y = torch.rand(12, 3, 32, 32), torch.randint(0, 10, (12,))
    with torch.no_grad(): y = a(x).argmax(1)
    atk = PGD(eps=4/255, steps=5)
    tm = transfer_matrix({'a': a, 'b': b}, x, y, atk, batch_size=64)
    torch.manual_seed(0)
    xa = atk(a, x, y)
    with torch.no_grad(): white = ((a(xa).argmax(1) == y) & (a(x).argmax(1) == y)).float().mean().item()*100
    assert tm.loc['a', 'a'] == pytest.approx(white) and tm.shape == (2, 2)
    rep = evaluate(b, x, y, [TransferAttack(a, atk, name='from a')], checks=False)
    assert rep.attacks['from a']['kind'] == 'transfer'


def test_suites_and_bad_input():
    assert [a.name for a in make_suite('hfat')] == ['FGSM', 'PGD-20', 'PGD-100', 'CW-30', 'MIM-20', 'AA-rand', 'AA']
    assert [a.name for a in make_suite('dynat')] == ['PGD-10', 'PGD-20', 'PGD-50', 'CW-30', 'AA']
    assert [a.name for a in make_suite('f2at')] == ['PGD-20', 'PGD-100', 'MIM-20', 'CW-30', 'AA']
    assert make_suite('f2at')[0].alpha == pytest.approx(0.007) and make_suite('monitor')[0].steps == 20
    m = nn.Sequential(nn.Flatten(), nn.Linear(12, 10))
    x, y = torch.rand(4, 3, 2, 2), torch.randint(0, 10, (4,))
    with pytest.raises(ConfigError, match='suite'): evaluate(m, x, y, 'trades')
    with pytest.raises(ConfigError, match='attack'): evaluate(m, x, y, ['PGD', 'BIM'])
    with pytest.raises(ConfigError, match='unique'): evaluate(m, x, y, ['FGSM', 'FGSM'])
    with pytest.raises(ConfigError, match='n = 9'): evaluate(m, x, y, ['FGSM'], n=9)
    with pytest.raises(ConfigError, match="version='custom'"): autoattack(m, x, y, eps=EPS, version='custom')
    with pytest.raises(ConfigError, match='only version'): autoattack(m, x, y, eps=EPS, attacks=['apgd-ce'])
    with pytest.raises(ConfigError, match='attacks'): autoattack(m, x, y, eps=EPS, version='custom', attacks=['pgd'])
    assert Square().kind == 'black-box' and AA(version='rand').name == 'AA-rand'
