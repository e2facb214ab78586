"""The attack engine: threat-model guarantees, state restoration, hand-checked steps, early stop and restarts."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from robustbench_lab.attacks import (CWInf, DIFGSM, FGSM, MIFGSM, MIM, PGD, TIFGSM, VMIFGSM, IterativeAttack, TradesKL,
                                     attack_mode, cw_loss, dlr_loss, kl_loss)
from robustbench_lab.core import ConfigError
from robustbench_lab.models import create_model

EPS = 8/255


def _random_models():
    torch.manual_seed(0)
    pooled = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10))
    return [create_model('small_cnn', 'cifar10', width=8), pooled, create_model('preact_resnet18', 'cifar10')]


ATTACKS = [FGSM(), FGSM(random_start=True), PGD(steps=5), PGD(steps=5, early_stop=True), PGD(steps=3, restarts=2),
           MIM(steps=5), CWInf(steps=5), TradesKL(steps=3), MIFGSM(steps=3), TIFGSM(steps=3), DIFGSM(steps=3),
           VMIFGSM(steps=2, n=2), IterativeAttack(steps=4, loss='dlr')]


@pytest.mark.parametrize('model_i', [0, 1, 2])
def test_linf_attacks_stay_in_ball_and_box(model_i):
    model = _random_models()[model_i].eval()
    torch.manual_seed(1)
    x = torch.rand(6, 3, 32, 32)
    x[0] = 0.0; x[1] = 1.0  # corners of the box
    y = torch.randint(0, 10, (6,))
    for atk in ATTACKS:
        xa = atk(model, x, y)
        assert xa.shape == x.shape and torch.isfinite(xa).all(), atk
        assert (xa - x).abs().max() <= atk.eps + 1e-6, atk
        assert xa.min() >= 0 and xa.max() <= 1, atk


def test_l2_attack_stays_in_ball():
    model = _random_models()[0].eval()
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    atk = PGD(eps=0.5, alpha=0.1, steps=10, norm='L2')
    xa = atk(model, x, y)
    assert ((xa - x).flatten(1).norm(dim=1) <= 0.5 + 1e-5).all() and xa.min() >= 0 and xa.max() <= 1
    assert ((xa - x).flatten(1).norm(dim=1) > 0.4).any()  # it does move


def test_modes_and_requires_grad_restored_even_on_error():
    model = _random_models()[0]
    model.train(); model.bn2.eval(); model.conv1.weight.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))

    def boom(logits, y, clean): raise RuntimeError('loss failed')

    with pytest.raises(RuntimeError, match='loss failed'): IterativeAttack(loss=boom, bn_mode='eval')(model, x, y)
    assert [m.training for m in model.modules()] == modes and [p.requires_grad for p in model.parameters()] == flags
    PGD(steps=2, bn_mode='train')(model, x, y)
    assert [m.training for m in model.modules()] == modes and [p.requires_grad for p in model.parameters()] == flags


def test_no_parameter_gradients_are_touched():
    model = _random_models()[0].train()
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    F.cross_entropy(model(x), y).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    for atk in (PGD(steps=3), TradesKL(steps=2), MIM(steps=2)): atk(model, x, y)
    assert all(torch.equal(before[n], p.grad) for n, p in model.named_parameters())


def test_bn_mode_controls_running_statistics():
    model = _random_models()[0]
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    rm = model.bn1.running_mean.clone()
    PGD(steps=2, bn_mode='eval')(model, x, y)
    assert torch.equal(rm, model.bn1.running_mean)
    PGD(steps=2, bn_mode='train')(model, x, y)
    assert not torch.equal(rm, model.bn1.running_mean) and model.training  # train-mode attack updates the statistics


def test_fgsm_matches_hand_computation_on_a_linear_model():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.rand(5, 3, 2, 2)*0.8 + 0.1, torch.tensor([0, 1, 2, 0, 1])
    W, b = lin[1].weight, lin[1].bias
    with torch.no_grad():
        p = F.softmax(x.flatten(1) @ W.T + b, 1)
        grad = (p - F.one_hot(y, 3)) @ W  # d CE / d x for a linear model
        hand = (x + 0.05*grad.view_as(x).sign()).clamp(0, 1)
    assert torch.allclose(FGSM(eps=0.05)(lin, x, y), hand, atol=1e-7)


def test_mim_accumulates_l1_normalised_gradients():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.rand(2, 3, 2, 2)*0.5 + 0.25, torch.tensor([0, 1])

    def grad(z):
        z = z.clone().requires_grad_(True)
        return torch.autograd.grad(F.cross_entropy(lin(z), y, reduction='sum'), z)[0]
    a, g = 0.01, torch.zeros_like(x)
    xa = x.clone()
    for _ in range(3):
        d = grad(xa)
        g = 1.0*g + d/d.abs().flatten(1).sum(1).view(-1, 1, 1, 1)
        xa = (x + (xa + a*g.sign() - x).clamp(-0.05, 0.05)).clamp(0, 1)
    assert torch.allclose(MIM(eps=0.05, alpha=a, steps=3)(lin, x, y), xa, atol=1e-7)


def test_losses_by_hand():
    z = torch.tensor([[3.0, 1.0, 0.5, 0.0]]); y = torch.tensor([1])
    assert torch.allclose(cw_loss(z, y), torch.tensor([2.0]))
    assert torch.allclose(dlr_loss(z, y), torch.tensor([2.0/2.5]))
    p = F.softmax(z, 1); q = F.softmax(z.flip(1), 1)
    assert torch.allclose(kl_loss(z.flip(1), y, z), (p*(p.log() - q.log())).sum(1))


def test_early_stop_and_restarts_never_weaken_the_attack(digits_model, digits_test):
    x, y = digits_test
    for eps in (8/255, 16/255, 24/255):
        _, sp = PGD(eps=eps, steps=10, seed=0).perturb(digits_model, x, y, return_stats=True)
        _, se = PGD(eps=eps, steps=10, seed=0, early_stop=True).perturb(digits_model, x, y, return_stats=True)
        _, sr = PGD(eps=eps, steps=10, seed=0, restarts=3).perturb(digits_model, x, y, return_stats=True)
        assert 0 < sp['fooled'].sum() < len(y)
        assert (se['fooled'] >= sp['fooled']).all()
        assert (sr['fooled'] >= sp['fooled']).all() and ((sr['loss'] >= sp['loss'] - 1e-5) | sr['fooled']).all()


def test_seed_makes_random_starts_reproducible():
    model = _random_models()[1].eval()
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    assert torch.equal(PGD(steps=2, seed=7)(model, x, y), PGD(steps=2, seed=7)(model, x, y))
    torch.manual_seed(1); a = PGD(steps=2)(model, x, y)
    torch.manual_seed(1); b = PGD(steps=2)(model, x, y)
    assert torch.equal(a, b) and not torch.equal(a, PGD(steps=2, seed=8)(model, x, y))


def test_gapgd_kappa_counts_correct_iterations():
    class Oracle(nn.Module):  # always right: kappa must equal the number of steps
        def __init__(self, y): super().__init__(); self.y = y; self.w = nn.Parameter(torch.zeros(1))
        def forward(self, x): return F.one_hot(self.y, 10).float()*10 + x.mean()*self.w
    y = torch.randint(0, 10, (5,))
    _, st = PGD(steps=7).perturb(Oracle(y), torch.rand(5, 3, 4, 4), y, return_stats=True)
    assert st['kappa'].tolist() == [7]*5 and not st['fooled'].any()


def test_targeted_attack_moves_towards_the_target(digits_model, digits_test):
    x, y = digits_test
    target = (y + 1) % 10
    xt = PGD(eps=32/255, steps=20, targeted=True)(digits_model, x, target)
    xu = PGD(eps=32/255, steps=20)(digits_model, x, y)  # untargeted: away from y, towards any class
    with torch.no_grad():
        hit_t = (digits_model(xt).argmax(1) == target).float().mean()
        hit_u = (digits_model(xu).argmax(1) == target).float().mean()
    assert hit_t > 0.2 and hit_t > 2*hit_u


def test_public_contract_and_bad_input():
    model = _random_models()[1].eval()
    x, y = torch.rand(2, 3, 32, 32), torch.randint(0, 10, (2,))
    for atk in (PGD(eps=8/255, alpha=2/255, steps=20), FGSM(eps=8/255), CWInf(eps=8/255, alpha=2/255, steps=30), MIM(eps=8/255), TradesKL()):
        assert atk(model, x, y).shape == x.shape
    for bad, match in [(dict(eps=-0.1), 'eps'), (dict(steps=0), 'steps'), (dict(norm='L1'), 'norm'), (dict(loss='hinge'), 'loss'),
                       (dict(alpha=-1.0), 'alpha'), (dict(restarts=0), 'restarts'), (dict(bn_mode='fixed'), 'bn_mode')]:
        with pytest.raises(ConfigError, match=match): PGD(**bad)
    with pytest.raises(ConfigError, match='uint8'): PGD()(model, (x*255).to(torch.uint8), y)
    with pytest.raises(ConfigError, match='early_stop'): TIFGSM(early_stop=True)


def test_attack_mode_restores_after_exception():
    model = _random_models()[0].train()
    with pytest.raises(KeyError):
        with attack_mode(model, 'eval'):
            assert not model.training and not any(p.requires_grad for p in model.parameters())
            raise KeyError
    assert model.training and all(p.requires_grad for p in model.parameters())
