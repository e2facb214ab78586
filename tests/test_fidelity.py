"""Every `-code` recipe is the authors' released training step: each test writes that step by hand, from the released
scripts' equations and order of operations, in float64 on a tiny model, with the same random draws, and compares weights,
gradients and BN running statistics after a few optimiser steps with the workbench's method."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from robustbench_lab.afa import FiLMBN, oat_model
from robustbench_lab.attacks import PGD
from robustbench_lab.core import random_scope, sample_rand, sample_randn, shared_generator
from robustbench_lab.data import CropFlip, default_augment
from robustbench_lab.dynat import DYNAT
from robustbench_lab.evaluate import evaluate
from robustbench_lab.hfat import HFAT
from robustbench_lab.learner import CheckpointCB, Schedule
from robustbench_lab.methods import AWP, LBGAT, Standard
from robustbench_lab.models import create_model
from robustbench_lab.objectives import GAIRAT, MAIL, PGDAT, TRADES, gair_weights
from robustbench_lab.train import PRESETS, build_method, build_objective, resolve_config

B, EPS = 6, 8/255


def net(seed=0, classes=3):
    "A tiny conv net with BatchNorm, in float64."
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                         nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, classes)).double()


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 3, 6, 6, generator=g, dtype=torch.float64)
    x[0, 0, 0, :] = 0.0; x[1, 1, 2, :] = 1.0  # pixels on the box boundary: clipping the start matters there
    return x, torch.randint(0, 3, (B,), generator=g)


def assert_same_state(a:nn.Module, b:nn.Module, atol=1e-12):
    for (k, v), (k2, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2
        if v.is_floating_point(): assert torch.allclose(v, w, rtol=0, atol=atol), (k, (v - w).abs().max().item())
        else: assert torch.equal(v, w), k


def sgd(models, lr=0.1, wd=5e-4):
    return torch.optim.SGD([p for m in models for p in m.parameters()], lr=lr, momentum=0.9, weight_decay=wd)


def workbench_steps(method, model, x, y, opt, steps, extra=(), epochs_batches=None):
    "Run `steps` optimiser steps of a workbench method, each inside its own random scope (the learner's keying)."
    method.setup(model)
    for t in range(steps):
        e, b = epochs_batches[t] if epochs_batches else (0, t)
        method.start_epoch(e, 10); method.batch = b
        opt.zero_grad(set_to_none=True)
        with random_scope(7, t, total=len(x)): method.compute_grads(model, x, y, lambda l: l.backward())
        opt.step(); method.after_step(model)


# ---------------------------------------------------------------------------------------------------------------- TRADES
def trades_inner(model, x, eps, alpha, steps):
    "trades.py: eval mode, x + 0.001·N(0, I) NOT clipped, ascend the summed KL(p(x) ‖ p(x')), project and clip each step."
    model.eval()
    x_adv = x + 0.001*sample_randn(x.shape, dtype=x.dtype)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        loss = F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(model(x), 1), reduction='sum')
        g, = torch.autograd.grad(loss, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha*g.sign(), x - eps), x + eps).clamp(0, 1)
    model.train()
    return x_adv


def test_trades_code_step_is_the_released_step():
    x, y = batch()
    wb, ref = net(), net()
    cfg = resolve_config(preset='trades-code', dataset='digits', arch='small_cnn', steps=3)
    obj = build_objective(dict(cfg, eps=EPS))
    assert obj.forwards == ('clean', 'adv', 'clean') and obj.attack.clip_start is False
    opt_w, opt_r = sgd([wb], wd=2e-4), sgd([ref], wd=2e-4)
    workbench_steps(Standard(obj), wb, x, y, opt_w, 3)
    for t in range(3):
        with random_scope(7, t, total=B): x_adv = trades_inner(ref, x, EPS, 0.007, 3)
        logits = ref(x)  # the three train-mode forwards of trades_loss: x, x_adv, x (the KL target)
        kl = F.kl_div(F.log_softmax(ref(x_adv), 1), F.softmax(ref(x), 1), reduction='sum')/B
        loss = F.cross_entropy(logits, y) + 6.0*kl
        opt_r.zero_grad(); loss.backward(); opt_r.step()
    assert_same_state(wb, ref)


# ---------------------------------------------------------------------------------------------------------------- DYNAT
@pytest.mark.parametrize('beta', [0.0, 1.0])
def test_dynat_code_step_is_the_released_step(beta):
    "dynat.py: CE inner against the guide's labels from an unclipped start; the target's clean forward (BN) always; the guide's per-step forwards."
    x, y = batch()
    steps, alpha, eps = 3, 0.007, 0.031
    tg, gd, tg_r, gd_r = net(0), net(1), net(0), net(1)
    cfg = resolve_config(preset='dynat-code', dataset='digits', arch='small_cnn', steps=steps, beta=beta)
    method = build_method(dict(cfg, arch='small_cnn'))  # the recipe's options, with our tiny nets swapped in
    method.guide = gd
    assert method.inner == 'dynamic' and method.guide_bn_updates == steps + 1 and method.objective.attack.clip_start is False
    opt_w, opt_r = sgd([tg, gd], wd=2e-4), sgd([tg_r, gd_r], wd=2e-4)
    workbench_steps(method, tg, x, y, opt_w, 3)
    for t in range(3):
        tg_r.eval()
        with random_scope(7, t, total=B): x_adv = x + 0.001*sample_randn(x.shape, dtype=x.dtype)
        for _ in range(steps):  # the guide is forwarded (train mode) at every attack step for the labels
            x_adv = x_adv.detach().requires_grad_(True)
            labels = gd_r(x).argmax(1)
            g, = torch.autograd.grad(F.cross_entropy(tg_r(x_adv), labels), x_adv)
            x_adv = torch.min(torch.max(x_adv.detach() + alpha*g.sign(), x - eps), x + eps).clamp(0, 1)
        tg_r.train()
        out_adv, out_nat, out = tg_r(x_adv), tg_r(x), gd_r(x)
        loss = F.cross_entropy(out, y) + F.cross_entropy(out_adv, out.argmax(1))
        if beta: loss = loss + beta*F.kl_div(F.log_softmax(out_adv, 1), F.softmax(out_nat, 1), reduction='sum')/B
        opt_r.zero_grad(); loss.backward(); opt_r.step()
    assert_same_state(tg, tg_r)
    assert_same_state(gd, gd_r, atol=1e-12)  # the guide's BN statistics: steps + 1 updates per batch, as the code's forwards


def test_lbgat_beta0_still_forwards_the_clean_batch_through_the_robust_model():
    x, y = batch()
    rob, nat, rob_r, nat_r = net(0), net(1), net(0), net(1)
    lb = LBGAT(nat, beta=0.0, eps=0.031, alpha=0.007, steps=2, clip_start=False)
    opt_w, opt_r = sgd([rob, nat]), sgd([rob_r, nat_r])
    workbench_steps(lb, rob, x, y, opt_w, 2)
    for t in range(2):
        with random_scope(7, t, total=B): x_adv = trades_inner(rob_r, x, 0.031, 0.007, 2)
        out_adv, out_natural, out = rob_r(x_adv), rob_r(x), nat_r(x)  # lbgat.py's order; out_natural feeds only the β term
        loss = F.mse_loss(out_adv, out) + F.cross_entropy(out, y)
        opt_r.zero_grad(); loss.backward(); opt_r.step()
    assert_same_state(rob, rob_r)
    assert_same_state(nat, nat_r)


# ---------------------------------------------------------------------------------------------------------------- HFAT
def attack_pgd(model, X, y, eps, alpha, iters):
    "The Rice et al. `attack_pgd` (one restart): uniform start clamped to the box, CE steps, and the final selection forward."
    delta = ((2*sample_rand(X.shape, dtype=X.dtype) - 1)*eps)
    delta = torch.max(torch.min(delta, 1 - X), -X)
    for _ in range(iters):
        delta = delta.detach().requires_grad_(True)
        g, = torch.autograd.grad(F.cross_entropy(model(X + delta), y), delta)
        d = torch.clamp(delta.detach() + alpha*g.sign(), -eps, eps)
        delta = torch.max(torch.min(d, 1 - X), -X)
    with torch.no_grad(): F.cross_entropy(model(X + delta), y, reduction='none')  # its restart-selection forward
    return delta.detach()


def test_hfat_code_step_is_the_released_step():
    "main.py's AT_HF step: train-mode attacks with attack_pgd (the first batch of a later epoch in eval mode), proxy, θ̂, weights."
    x, y = batch()
    m, m_r = net(), net()
    cfg = resolve_config(preset='hfat-code', dataset='digits', arch='small_cnn', steps=2, hfat_steps_s=2)
    method = build_method(cfg)
    assert method.eval_first_batch and method.objective.attack.select_forward and method.std_attack.select_forward
    schedule = [(0, 0), (1, 0), (1, 1)]  # (epoch, batch): the middle step is a first batch after an epoch's test
    opt_w, opt_r = sgd([m]), sgd([m_r])
    workbench_steps(method, m, x, y, opt_w, 3, epochs_batches=schedule)
    proxy = copy.deepcopy(m_r)
    for t, (e, b) in enumerate(schedule):
        m_r.train(not (e > 0 and b == 0))
        with random_scope(7, t, total=B):
            delta = attack_pgd(m_r, x, y, 7/255, 7/255, 2)
            r = 0.4 + 0.001*float(torch.randn((), generator=shared_generator()))
            x_adv = (x + delta).clamp(0, 1)
            x_h = (x_adv + r*(x - x_adv) + 0.01/255*sample_randn(x.shape, dtype=x.dtype)).clamp(0, 1)
            m_r.train()
            proxy.load_state_dict(m_r.state_dict()); proxy.train()
            ce = F.cross_entropy(proxy(x_h), y, reduction='none')
            proxy_loss = -(ce*(ce < 1.5).double()).mean()
            popt = torch.optim.SGD(proxy.parameters(), lr=0.05)
            popt.zero_grad(); proxy_loss.backward(); popt.step()
            old, new = m_r.state_dict(), proxy.state_dict()
            diff = {k: old[k].norm()/((new[k] - old[k]).norm() + 1e-20)*(new[k] - old[k]) for k in old if old[k].dim() > 1 and 'weight' in k}
            params = dict(m_r.named_parameters())
            with torch.no_grad():
                for k, d in diff.items(): params[k].add_(0.01*d)
            u_n = m_r(x)
            u_delta = attack_pgd(m_r, x, y, EPS, 2/255, 2)
        u_out = m_r((x + u_delta).clamp(0, 1))
        opt_r.zero_grad(); F.cross_entropy(u_out, y).backward()
        with torch.no_grad():
            for k, d in diff.items(): params[k].add_(-0.01*d)
        g_u = {k: p.grad.clone() for k, p in m_r.named_parameters()}
        out = m_r(x_adv)
        opt_r.zero_grad(); F.cross_entropy(out, y).backward()
        with torch.no_grad():
            n_out = m_r(x)
            kl_r = F.kl_div(F.log_softmax(out, 1), F.softmax(n_out, 1), reduction='sum')
            kl_u = F.kl_div(F.log_softmax(u_out, 1), F.softmax(u_n, 1), reduction='sum')
            w = F.softmax(torch.stack([0.0*kl_r, 1.0*kl_u]), 0)
            for k, p in m_r.named_parameters(): p.grad = w[0]*p.grad + w[1]*g_u[k]
        opt_r.step()
    assert_same_state(m, m_r, atol=1e-10)


def test_hfat_code_data_and_checkpoint_selection():
    cfg = resolve_config(preset='hfat-code', arch='small_cnn')  # CIFAR-10 (RBLAB_DATA)
    assert default_augment('cifar10', cfg['pad_mode']).mode == 'reflect' and cfg['normalize'] and cfg['n_eval'] == 10000
    # main.py saves "best" when `epoch > 80` (0-based): epochs numbered 82 and up in the learner's 1-based count
    cb = CheckpointCB('/nonexistent', best_after=cfg['best_after'])

    class Rec:  # the learner's view at the end of epoch e (0-based): learn.epoch = e + 1
        def __init__(self, e, v): self.epoch, self.record = e + 1, dict(robust_acc=v)
    improved = []
    for e, v in [(79, 0.9), (80, 0.95), (81, 0.5), (82, 0.6)]:
        before = cb.best_epoch
        cb._save = lambda learn, imp: None
        cb.after_record(Rec(e, v))
        improved.append(cb.best_epoch != before)
    assert improved == [False, False, True, True] and cb.best_epoch == 82


# ---------------------------------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize('preset,changes', [
    ('trades-code', {73: 0.1, 74: 0.01}),  # train_trades_cifar10.py: `if epoch >= 75` with 1-based epochs
    ('mart-code', {73: 0.01, 74: 0.001, 88: 0.001, 89: 1e-4, 98: 1e-4, 99: 1e-5}),
    ('mail-code', {74: 0.01, 75: 0.001, 89: 0.001, 90: 1e-4, 99: 1e-4, 100: 1e-5}),  # MAIL's loop is 0-based
    ('gairat-code', {58: 0.1, 59: 0.01, 88: 0.01, 89: 0.001, 108: 0.001, 109: 0.0005}),  # lr_schedule(epoch + 1)
    ('trades-awp-code', {98: 0.1, 99: 0.01, 148: 0.01, 149: 0.001}),
])
def test_code_presets_change_the_rate_at_the_released_epochs(preset, changes):
    c = resolve_config(preset=preset, dataset='digits', arch='small_cnn')
    s = Schedule(c['schedule'], c['lr'], c['epochs'], c['milestones'], c['lr_factors'])
    for epoch, lr in changes.items(): assert math.isclose(s(epoch, 0, 10), lr, rel_tol=1e-12), (preset, epoch, s(epoch, 0, 10))


def test_reweighting_and_warmup_start_where_the_code_starts_them():
    mail = MAIL('at'); mail.start_epoch(75, 120); assert mail.epoch < mail.burn  # `epoch <= 75`: unweighted
    mail.start_epoch(76, 120); assert mail.epoch >= mail.burn
    g = GAIRAT(begin_epoch=60)  # the code: `(epoch + 1) >= begin_epoch` with 0-based epochs
    g.start_epoch(58, 120); assert g.current_lambda() is None
    g.start_epoch(59, 120); assert g.current_lambda() == -1.0
    awp = AWP(TRADES()); awp.start_epoch(0, 200)
    assert awp.warmup == 9  # trades_AWP: `if epoch >= args.awp_warmup` (10) with 1-based epochs
    d = DYNAT(net(), awp_gamma=0.005); d.start_epoch(0, 100)
    assert d.warmup == 9  # AWP_dynat.py: `if epoch >= 10`, 1-based


@pytest.mark.parametrize('K', [5, 7, 10])
def test_gairat_weights_use_the_codes_integer_half(K):
    kappa = torch.arange(K + 1)
    h = int(K/2)
    hand = torch.tensor([(math.tanh(-1.0 + (h - k)*5/h) + 1)/2 for k in kappa.tolist()], dtype=torch.float32)
    assert torch.allclose(gair_weights(kappa, K, -1.0), len(hand)*hand/hand.sum(), atol=1e-6)


def test_help_code_onecycle_sets_lr_and_momentum_per_batch_as_torch_does():
    c = resolve_config(preset='help-code', dataset='digits', arch='small_cnn', epochs=2)
    s = Schedule(c['schedule'], c['lr'], c['epochs'], steps_per_epoch=12)
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=c['lr'], momentum=0.9, nesterov=True)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=c['lr'], pct_start=0.25, steps_per_epoch=12, epochs=2)
    for e in range(2):
        for b in range(11):  # HAT counts floor(N/B) + 1 steps per epoch: one more than there are batches when B divides N
            g = opt.param_groups[0]
            assert math.isclose(g['lr'], s(e, b, 11), rel_tol=1e-12) and math.isclose(g['momentum'], s.momentum(e, b, 11), rel_tol=1e-12)
            opt.step(); ref.step()
        opt.step(); ref.step()


# ---------------------------------------------------------------------------------------------------------------- models, OAT, compile
def test_oat_has_no_film_after_the_shortcut_bn():
    m = oat_model('resnet18', 'cifar10')
    films = {n: f.film is not None for n, f in m.named_modules() if isinstance(f, FiLMBN)}
    assert not any(v for n, v in films.items() if '.shortcut.' in n) and sum(films.values()) == len(films) - 3


@pytest.mark.parametrize('which', ['awp', 'hfat'])
def test_weight_perturbing_methods_train_with_compile(which):
    from robustbench_lab.data import Loader, load_arrays
    from robustbench_lab.learner import Learner
    x, y = load_arrays('digits', 'train')
    method = AWP(PGDAT(eps=0.1, alpha=0.05, steps=1)) if which == 'awp' else HFAT(PGDAT(eps=0.1, alpha=0.05, steps=1), steps_s=1)
    torch.manual_seed(0)
    m = create_model('small_cnn', 'digits', width=4)
    learn = Learner(m, method, Loader(x[:64], y[:64], batch_size=32), epochs=1, lr=0.05, schedule='constant', compile='aot_eager')
    learn.fit()
    assert learn.step == 2 and all(torch.isfinite(p).all() for p in m.parameters())


# ---------------------------------------------------------------------------------------------------------------- RobustBench export
def test_reduced_autoattack_is_exported_as_unreliable(digits_model, digits_test):
    from robustbench_lab.evaluate import AA
    x, y = digits_test
    rb = evaluate(digits_model, x, y, [AA(0.1, n_iter=2, n_queries=10, name='AA')], n=20, checks=False).to_robustbench(name='tiny')
    assert rb['unreliable'] and 'first 20 test points' in rb['footnote'] and 'reduced budget (n_iter=2, n_queries=10)' in rb['footnote']
    custom = evaluate(digits_model, x, y, [AA(0.1, 'custom', ['apgd-ce'], n_iter=2, name='AA')], n=20, checks=False).to_robustbench()
    assert custom['unreliable'] and "version 'custom'" in custom['footnote']


# ---------------------------------------------------------------------------------------------------------------- AWP
def awp_direction(model, proxy, loss_fn, lr):
    "utils_awp.py: one plain SGD step of the proxy ascending `loss_fn`, then the relative per-layer difference."
    proxy.load_state_dict(model.state_dict()); proxy.train()
    popt = torch.optim.SGD(proxy.parameters(), lr=lr)
    popt.zero_grad(); (-loss_fn(proxy)).backward(); popt.step()
    old, new = model.state_dict(), proxy.state_dict()
    return {k: old[k].norm()/((new[k] - old[k]).norm() + 1e-20)*(new[k] - old[k]) for k in old if old[k].dim() > 1 and 'weight' in k}


def add_into(model, diff, coeff):
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, d in diff.items(): params[k].add_(coeff*d)


def test_at_awp_code_step_is_the_released_step():
    "AT_AWP/train_cifar10.py: Rice attack_pgd, AWP at γ 0.01 from the proxy's CE ascent, step, restore, then the logging forward on x."
    x, y = batch()
    m, m_r = net(), net()
    method = build_method(resolve_config(preset='awp-code', dataset='digits', arch='small_cnn', steps=2))
    assert method.clean_forward_after_step and method.eval_first_batch and method.objective.attack.select_forward
    schedule = [(0, 0), (1, 0), (1, 1)]
    opt_w, opt_r = sgd([m]), sgd([m_r])
    workbench_steps(method, m, x, y, opt_w, 3, epochs_batches=schedule)
    proxy = copy.deepcopy(m_r)
    for t, (e, b) in enumerate(schedule):
        m_r.train(not (e > 0 and b == 0))
        with random_scope(7, t, total=B): x_adv = (x + attack_pgd(m_r, x, y, EPS, 2/255, 2)).clamp(0, 1)
        m_r.train()
        diff = awp_direction(m_r, proxy, lambda p: F.cross_entropy(p(x_adv), y), lr=0.01)
        add_into(m_r, diff, 0.01)
        opt_r.zero_grad(); F.cross_entropy(m_r(x_adv), y).backward(); opt_r.step()
        add_into(m_r, diff, -0.01)
        m_r(x)  # the code's `output = model(normalize(X))` for its training accuracy: one more BN update
    assert_same_state(m, m_r, atol=1e-10)


def test_trades_awp_code_step_is_the_released_step():
    "trades_AWP/train_trades_cifar.py: TRADES attack, AWP (γ 0.005) from the proxy's TRADES loss, forwards adv → clean → clean."
    x, y = batch()
    m, m_r = net(), net()
    method = build_method(resolve_config(preset='trades-awp-code', dataset='digits', arch='small_cnn', steps=2, awp_warmup=0))
    opt_w, opt_r = sgd([m]), sgd([m_r])
    workbench_steps(method, m, x, y, opt_w, 2)
    proxy = copy.deepcopy(m_r)
    for t in range(2):
        with random_scope(7, t, total=B): x_adv = trades_inner(m_r, x, EPS, 2/255, 2)
        def proxy_loss(p):
            nat = F.cross_entropy(p(x), y)
            return nat + 6.0*F.kl_div(F.log_softmax(p(x_adv), 1), F.softmax(p(x), 1), reduction='batchmean')
        diff = awp_direction(m_r, proxy, proxy_loss, lr=0.1)
        add_into(m_r, diff, 0.005)
        logits_adv = m_r(x_adv)
        robust = F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(m_r(x), 1), reduction='batchmean')
        logits = m_r(x)
        loss = F.cross_entropy(logits, y) + 6.0*robust
        opt_r.zero_grad(); loss.backward(); opt_r.step()
        add_into(m_r, diff, -0.005)
    assert_same_state(m, m_r, atol=1e-10)
