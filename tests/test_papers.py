"""HFAT, DYNAT, AFA and F²AT: the properties each issue names, on tiny models."""
import copy
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from robustbench_lab.afa import AFA, AFAModel, AFAStage2, BranchView, PGDAda, default_xi
from robustbench_lab.attacks import PGD
from robustbench_lab.core import ConfigError
from robustbench_lab.dynat import DYNAT, VARIANTS, dynamic_labels, dynat_variant
from robustbench_lab.f2at import (F2AT, MIEstimator, bitplanes, hard_margin_loss, pattern_dependent_loss, soft_margin_loss,
                                  split_patterns)
from robustbench_lab.hfat import HFAT, branch_weights, hider_candidates
from robustbench_lab.hiders import HiderTracker, hider_ratios, scale_intervals
from robustbench_lab.learner import Learner
from robustbench_lab.methods import WeightPerturbation, relative_direction
from robustbench_lab.models import MultiBN, bn_branch, create_model, multibn_layers
from robustbench_lab.objectives import HELP, MART, PGDAT, TRADES, Clean, batch_kl

ATK = dict(eps=0.1, alpha=0.05, steps=2)


def _net(c_in=1, k=3):
    return nn.Sequential(nn.Conv2d(c_in, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4*6*6, k))


def _data(n=8, c=1, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, 8, 8, generator=g), torch.randint(0, k, (n,), generator=g)


def _step(method, model, x, y, lr=0.05):
    extra = method.setup(model)
    params = list(model.parameters()) + [p for m in extra.values() for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    method.start_epoch(5, 10)
    opt.zero_grad(); logs = method.compute_grads(model, x, y, lambda l: l.backward()); opt.step(); method.after_step(model)
    return logs


# ---------------------------------------------------------------- HFAT
@pytest.mark.parametrize('make', [lambda h: HFAT(PGDAT(**ATK), eps_s=0.1, alpha_s=0.05, steps_s=2),
                                  lambda h: HFAT(TRADES(**ATK), eps_s=0.1, alpha_s=0.05, steps_s=2),
                                  lambda h: HFAT(MART(**ATK), eps_s=0.1, alpha_s=0.05, steps_s=2),
                                  lambda h: HFAT(HELP(helper=h, **ATK), eps_s=0.1, alpha_s=0.05, steps_s=2),
                                  lambda h: HFAT(PGDAT(**ATK), eps_s=0.1, alpha_s=0.05, steps_s=2, awp=True, awp_gamma=0.01)],
                         ids=['AT_HF', 'TRADES_HF', 'MART_HF', 'HELP_HF', 'AWP_HF'])
def test_each_hf_composition_trains(make):
    torch.manual_seed(0)
    model, helper = _net(), _net().eval()
    x, y = _data()
    method = make(helper)
    for _ in range(3): logs = _step(method, model, x, y)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert 0 <= logs['w_a'] <= 1 and abs(logs['w_s'] + logs['w_a'] - 1) < 1e-6 and 0.39 < logs['r'] < 0.41


def test_hfat_gradient_is_the_weighted_sum_and_weights_are_restored():
    torch.manual_seed(0)
    model = _net()
    x, y = _data()
    h = HFAT(PGDAT(**ATK), eps_s=0.1, alpha_s=0.05, steps_s=2, weighting='code', beta_r=0.5, beta_u=2.0)
    h.setup(model)
    w0 = {k: v.clone() for k, v in model.state_dict().items() if 'running' not in k and 'num_batches' not in k}
    torch.manual_seed(1)
    logs = h.compute_grads(model, x, y, lambda l: l.backward())
    got = [p.grad.clone() for p in model.parameters()]
    assert all(torch.allclose(w0[k], v, atol=1e-6) for k, v in model.state_dict().items() if k in w0)  # θ back (γ·d subtracted, as the code)
    # by hand, replaying the random draws
    ref = copy.deepcopy(model)
    ref.load_state_dict({**model.state_dict(), **w0})
    torch.manual_seed(1)
    xa = PGD(**ATK, bn_mode='train')(ref, x, y)
    r = 0.4 + 0.001*torch.randn(()).item()
    xh = hider_candidates(x, xa, r, 0.01/255)
    ref.train()
    pairs = relative_direction(ref, copy.deepcopy(ref), lambda p: (lambda ce: ((ce.detach() < 1.5).float()*ce).mean())(
        F.cross_entropy(p(xh), y, reduction='none')))
    wp = WeightPerturbation(pairs, 0.01).apply()
    with torch.no_grad(): za_c = ref(x)
    xA = PGD(**ATK, bn_mode='train')(ref, x, y)
    za = ref(xA)
    g_a = torch.autograd.grad(F.cross_entropy(za, y), list(ref.parameters()))
    wp.restore()
    zs = ref(xa)
    g_s = torch.autograd.grad(F.cross_entropy(zs, y), list(ref.parameters()))
    with torch.no_grad(): zs_c = ref(x)
    w_s, w_a = branch_weights(batch_kl(zs_c, zs), batch_kl(za_c, za), 'code', 0.5, 2.0)
    assert abs(w_a - logs['w_a']) < 1e-5
    for g, gs, ga in zip(got, g_s, g_a): assert torch.allclose(g, w_s*gs + w_a*ga, atol=1e-5)
    # after an optimiser step the weights equal the unperturbed ones minus the optimiser's update
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(torch.allclose(p, b - 0.1*g) for p, b, g in zip(model.parameters(), before, got))


def test_hfat_weighting_modes_and_bad_input():
    ks, ka = torch.tensor([0.2, 0.2]), torch.tensor([1.0, 1.0])
    assert branch_weights(ks, ka, 'static', static=(0.25, 0.75)) == (0.25, 0.75)
    ws, wa = branch_weights(ks, ka, 'code', 0.0, 1.0)
    assert abs(wa - torch.sigmoid(torch.tensor(2.0)).item()) < 1e-6  # β_r = 0: w_A = sigmoid(Σ KL_A)
    ws, wa = branch_weights(ks, ka, 'paper')
    assert abs(wa - 1/(1 + torch.exp(torch.tensor(-0.8)).item())) < 1e-6  # eq. 6 with batch means
    with pytest.raises(ConfigError, match='weighting'): HFAT(PGDAT(), weighting='softmax')
    with pytest.raises(ConfigError, match='steps_s'): HFAT(PGDAT(), steps_s=0)


def test_hider_ratios_match_a_hand_count_over_a_sequence():
    # correctness of 6 stored points at epochs 0..3 (as the tracker records them), and a hand count
    seq = torch.tensor([[1, 1, 1, 0, 1, 1], [1, 0, 1, 1, 0, 1], [0, 0, 1, 1, 1, 1], [1, 1, 0, 1, 1, 0]], dtype=torch.bool)
    # interval 1 from epoch 0: defended {0,1,2,4,5}; wrong at 1: {1, 4} -> 2/5
    assert hider_ratios(seq[0], seq[1])['ratio'] == 2/5
    # interval 2 from epoch 1: defended {0,2,3,5}; wrong at 3: {2, 5} -> 2/4, unconditional 2/6
    r = hider_ratios(seq[1], seq[3])
    assert (r['ratio'], r['uncond'], r['defended'], r['hiders']) == (0.5, 2/6, 4, 2)
    assert scale_intervals((1, 5, 20, 50), 200) == [1, 5, 20, 50] and scale_intervals((1, 5, 20, 50), 40) == [1, 4, 10]


def test_hider_tracker_reevaluates_the_stored_points():
    class Scripted(nn.Module):  # predicts from a script: epoch e classifies sample i correctly iff script[e][i]
        def __init__(self, y): super().__init__(); self.y, self.e, self.w = y, 0, nn.Parameter(torch.zeros(1))
        def forward(self, x):
            idx = (x[:, 0, 0, 0]*100).round().long()  # the sample index is written into the first pixel
            ok = SCRIPT[self.e][idx]
            return F.one_hot(torch.where(ok, self.y[idx], (self.y[idx] + 1) % 3), 3).float()*5 + 0*self.w + 0*x.sum((1, 2, 3))[:, None]
    global SCRIPT
    SCRIPT = torch.tensor([[1, 1, 1, 0, 1, 1], [1, 0, 1, 1, 0, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    x = torch.zeros(6, 1, 4, 4); x[:, 0, 0, 0] = torch.arange(6)/100
    model = Scripted(y)
    tr = HiderTracker(x, y, n=6, eps=0.0, steps=1, intervals=(1, 2), scale=False)

    class FakeLearn:
        def __init__(self): self.epochs, self.record = 3, {}
        def eval_model(self): return model
    learn = FakeLearn()
    records = []
    for e in range(3):
        model.e, learn.epoch, learn.record = e, e + 1, {}
        tr.after_epoch(learn); records.append(learn.record)
    assert records[1]['hider_adv_d1'] == 2/5 and records[1]['hider_nat_d1'] == 2/5
    assert records[2]['hider_adv_d2'] == 2/5 and records[2]['hider_from_d2'] == 0  # epoch 0 defended {0,1,2,4,5}, epoch 2 wrong {0,1}


# ---------------------------------------------------------------- DYNAT
def test_dynamic_label_is_the_guides_clean_argmax_and_carries_no_gradient():
    torch.manual_seed(0)
    guide, target = _net(), _net()
    x, y = _data()
    with torch.no_grad(): expected = guide.train()(x).argmax(1)
    yd = dynamic_labels(guide, x)
    assert torch.equal(yd, expected) and not yd.requires_grad and yd.dtype == torch.long
    d = DYNAT(guide, **dict(eps=0.1, alpha=0.05, steps=2))
    d.setup(target)
    state = copy.deepcopy(guide.state_dict())
    for m in (guide, target): m.zero_grad()
    d.compute_grads(target, x, y, lambda l: l.backward())
    ref = _net(); ref.load_state_dict(state); ref.train()
    g = torch.autograd.grad(F.cross_entropy(ref(x), y), list(ref.parameters()))
    assert all(torch.allclose(p.grad, gg, atol=1e-6) for p, gg in zip(guide.parameters(), g))


def test_dynat_inner_attack_ascends_ce_against_the_dynamic_label():
    torch.manual_seed(0)
    guide, target = _net(), _net()
    x, y = _data()
    yd = dynamic_labels(guide, x)
    m = dynat_variant('DYNAT-Inner', guide, eps=0.1, steps=1)
    m.objective.attack.alpha = 0.03
    torch.manual_seed(7)
    xa = m.objective.perturb(target, x, yd, bn_mode='eval')
    torch.manual_seed(7)
    x0 = (x + 0.001*torch.randn_like(x)).clamp(x - 0.1, x + 0.1).clamp(0, 1).requires_grad_(True)
    target.eval()
    g, = torch.autograd.grad(F.cross_entropy(target(x0), yd, reduction='sum'), x0)
    assert torch.allclose(xa, (x0.detach() + 0.03*g.sign()).clamp(x - 0.1, x + 0.1).clamp(0, 1), atol=1e-6)


@pytest.mark.parametrize('name', list(VARIANTS))
def test_each_dynat_variant_trains_without_nans(name):
    torch.manual_seed(0)
    guide, target = _net(), _net()
    x, y = _data()
    m = dynat_variant(name, guide, eps=0.1, steps=2, begin_epoch=0, burn_in=0)
    for _ in range(3): logs = _step(m, target, x, y)
    assert all(torch.isfinite(p).all() for p in list(target.parameters()) + list(guide.parameters()))
    assert 0 <= logs['label_agree'] <= 1


# ---------------------------------------------------------------- AFA
def test_branch_selection_routes_statistics_in_stage1():
    torch.manual_seed(0)
    m = create_model('small_cnn', 'digits', width=8, norm_layer=partial(MultiBN, K=5))
    x, y = _data(16, 1, 10)
    m.train()
    for k in range(5):
        before = [[b.running_mean.clone() for b in l.bns] for l in multibn_layers(m)]
        with bn_branch(m, k), torch.no_grad(): m(x)
        for l, bs in zip(multibn_layers(m), before):
            for j, b0 in enumerate(bs): assert torch.equal(b0, l.bns[j].running_mean) == (j != k)


def _trained_branches(K=3):
    torch.manual_seed(0)
    s1 = create_model('small_cnn', 'digits', width=8, norm_layer=partial(MultiBN, K=K)).eval()
    with torch.no_grad():
        for l in multibn_layers(s1):
            l.bns[K - 1].weight.uniform_(0.5, 1.5); l.bns[K - 1].running_mean.normal_(0, 0.3); l.bns[K - 1].running_var.uniform_(0.5, 2)
    return s1


def test_stage2_freezes_every_backbone_tensor_and_trains_the_wg():
    for placement in ('stem', 'per_layer'):
        dep = AFAModel(copy.deepcopy(_trained_branches()), placement)
        snap = {k: v.clone() for k, v in dep.state_dict().items() if 'wg' not in k}  # every backbone tensor, buffers included
        method = AFAStage2(eps=0.1, steps=2)
        opt = torch.optim.SGD([p for p in dep.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
        wg_before = [p.clone() for p in dep.parameters() if p.requires_grad]
        x, y = _data(16, 1, 10)
        for _ in range(2):
            dep.train(); opt.zero_grad(); method.compute_grads(dep, x, y, lambda l: l.backward()); opt.step()
        assert snap and all(torch.equal(v, dep.state_dict()[k]) for k, v in snap.items()), placement
        assert any(not torch.equal(a, b) for a, b in zip(wg_before, [p for p in dep.parameters() if p.requires_grad]))


def test_fused_output_is_the_hand_mix_and_gradients_flow_through_the_wg():
    s1 = _trained_branches()
    dep = AFAModel(copy.deepcopy(s1), 'stem').eval()
    x = torch.rand(6, 1, 8, 8, requires_grad=True)
    out = dep(x)
    w0 = dep.last_w0
    # hand mix: run the Stage I network with every BN set to W0·BN_0 + (1 − W0)·BN_2
    ref = copy.deepcopy(s1)
    for l in multibn_layers(ref): l.set_mix(w0.detach(), 0, 2)
    assert torch.allclose(ref(x.detach()), out.detach(), atol=1e-5)
    gx, = torch.autograd.grad(out.sum(), x, retain_graph=True)
    gw = torch.autograd.grad(out.sum(), list(dep.wg.parameters()))
    assert gx.abs().sum() > 0 and all(g.abs().sum() > 0 for g in gw)
    # the deployable model is attacked end to end, the adaptive attack included
    xa = PGDAda(eps=0.1, steps=2)(dep, x.detach(), torch.randint(0, 10, (6,)))
    assert (xa - x.detach()).abs().max() <= 0.1 + 1e-6


def test_afa_validation():
    with pytest.raises(ConfigError, match='K'): default_xi(1)
    with pytest.raises(ConfigError, match='xi'): AFA(PGDAT(), K=3, xi=[0, 1/255])
    with pytest.raises(ConfigError, match='MultiBN'): AFA(PGDAT(), K=5).setup(create_model('small_cnn', 'digits'))


# ---------------------------------------------------------------- F²AT
def test_bitplane_split_is_exact_and_reversible():
    x = torch.cat([torch.arange(256.).view(1, 1, 16, 16)/255, torch.rand(4, 1, 16, 16)])
    for K in range(1, 9):
        nat, pert = split_patterns(x, K)
        assert torch.equal(nat + pert, x)
        assert torch.equal(bitplanes(nat)[:, :8 - K].sum(), torch.tensor(0.))  # no low planes in the natural pattern
    assert torch.equal(split_patterns(x[:1], 8)[0], x[:1])
    v = torch.tensor([[[[0b11001010/255]]]])
    assert bitplanes(v)[0, :, 0, 0, 0].tolist() == [0, 1, 0, 1, 0, 0, 1, 1]


def test_dv_estimate_is_higher_for_dependent_pairs():
    torch.manual_seed(0)
    proj = torch.randn(16, 8)
    def fit(make):
        est = MIEstimator(1, 8, 32)
        opt = torch.optim.Adam(est.parameters(), lr=1e-3)
        for _ in range(150):
            p, r = make(); opt.zero_grad(); (-est(p, r).mean()).backward(); opt.step()
        est.eval()
        with torch.no_grad(): p, r = make(); return est(p, r).mean().item()
    dep = lambda: (lambda p: (p, p.flatten(1) @ proj))(torch.rand(32, 1, 4, 4))
    ind = lambda: (torch.rand(32, 1, 4, 4), torch.rand(32, 1, 4, 4).flatten(1) @ proj)
    assert fit(dep) > fit(ind) + 0.5


def test_soft_margin_approaches_the_hard_one():
    torch.manual_seed(1)
    z, y = torch.randn(32, 10)*2, torch.randint(0, 10, (32,))
    target = (z.masked_fill(F.one_hot(y, 10).bool(), float('-inf')).max(1).values - z.gather(1, y[:, None])[:, 0]).mean()
    gaps = [abs((soft_margin_loss(z, y, v) - target).item()) for v in (1, 10, 100, 1000)]
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 5e-3
    mis = z.argmax(1) != y  # on misclassified points, max_{k≠y} z_k = max_k z_k: the hard margin of eq. 18
    assert torch.isclose(soft_margin_loss(z[mis], y[mis], 1000.0), hard_margin_loss(z[mis], y[mis]), atol=5e-3)


def test_pd_loss_reaches_the_model_not_the_frozen_estimators():
    torch.manual_seed(0)
    net = create_model('small_cnn', 'digits', width=8)
    en, ep = MIEstimator(1, net.feature_dim, 16), MIEstimator(1, net.feature_dim, 16)
    x, y = _data(16, 1, 10)
    grads = {}
    for alpha in (0.5, 0.0):
        m = F2AT(en, ep, alpha=alpha, gamma=0.0, eps=0.1, alpha_attack=0.025, steps=2)
        m.setup(net)
        torch.manual_seed(3); net.zero_grad()
        m.compute_grads(net, x, y, lambda l: l.backward())
        grads[alpha] = [p.grad.clone() for p in net.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in list(en.parameters()) + list(ep.parameters()))
    assert any(not torch.allclose(a, b) for a, b in zip(grads[0.5], grads[0.0]))
    assert torch.isclose(pattern_dependent_loss(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]), tau=1.0),
                         -1.5 + torch.log(torch.tensor(2.0)))


def test_f2at_runs_on_one_source_pretrain_their_estimators_once_and_a_run_reading_them_is_bit_identical(tmp_path):
    "SAT, F²AT frozen and online on one source at one seed share one pre-training (the source's cache/); reading it changes no bit."
    from robustbench_lab.f2at import load_estimators
    from robustbench_lab.learner import load_checkpoint
    from robustbench_lab.train import train
    n = torch.get_num_threads(); torch.set_num_threads(1)
    try:
        base = dict(dataset='digits', arch='small_cnn', width=8, n_train=256, epochs=1, batch_size=64, lr=0.05, n_eval=32, n_report=32,
                    steps=2, runs_dir=str(tmp_path), progress=False)
        src = train(**base, method='standard', objective='pgdat', run_name='src')
        f2 = dict(base, method='f2at', f2at_source_run=str(src.dir), f2at_units=16, f2at_est_epochs=2, f2at_est_batch=128)
        first = train(**f2, run_name='frozen')
        again = train(**f2, run_name='frozen-again')
        sat = train(**f2, f2at_alpha=0.0, f2at_gamma=0.0, run_name='sat')
        other = train(**{**f2, 'f2at_units': 8}, run_name='units8')
    finally: torch.set_num_threads(n)
    kept = sorted((src.dir/'cache').glob('f2at-estimators-*.pt'))
    assert len(kept) == 2  # one per set of pre-training settings (16 and 8 units)
    metas = {r.name: load_estimators(r.dir/'estimators.pt')[2] for r in (first, again, sat, other)}
    assert [metas[k]['reused'] for k in ('frozen', 'frozen-again', 'sat', 'units8')] == [False, True, True, False]
    assert metas['frozen']['cache'] == metas['sat']['cache'] != metas['units8']['cache']
    a, b = (load_checkpoint(r.dir/'checkpoints'/'last.pt')['model'] for r in (first, again))
    assert all(torch.equal(a[k], b[k]) for k in a)  # read or pre-trained: the same run
