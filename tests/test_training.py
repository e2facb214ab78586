"""Objectives and methods train without NaNs and reduce their loss; losses match hand computations;
kill-and-resume ends bit-identical; the pipeline rejects bad parameters before doing anything."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from robustbench_lab.core import ConfigError
from robustbench_lab.data import Loader
from robustbench_lab.learner import Callback, Learner, load_checkpoint, save_checkpoint
from robustbench_lab.methods import AWP, LBGAT, SEAT, Standard
from robustbench_lab.models import create_model
from robustbench_lab.objectives import (GAIRAT, HELP, IAT, MAIL, MART, PGDAT, TRADES, Clean, batch_kl, gair_weights,
                                        probabilistic_margin)
from robustbench_lab.train import PRESETS, resolve_config, train

REPO = Path(__file__).resolve().parent.parent
ATK = dict(eps=8/255, alpha=2/255, steps=3)


class LossLog(Callback):
    def __init__(self): self.losses = []
    def after_batch(self, learn): self.losses.append(learn.logs['loss'])


@pytest.fixture(scope='module')
def cifar_subset(cifar_train):
    x, y = cifar_train
    return x[:3200], y[:3200]


@pytest.fixture(scope='module')
def helper(cifar_subset):
    torch.manual_seed(0)
    m = create_model('small_cnn', 'cifar10', width=8)
    learn = Learner(m, Standard(Clean()), Loader(*cifar_subset, batch_size=64, shuffle=True), epochs=2, lr=0.05, schedule='constant')
    return learn.fit().model.eval()


def _method(name, helper):
    torch.manual_seed(0)
    objectives = dict(pgdat=lambda: PGDAT(**ATK), trades=lambda: TRADES(**ATK), mart=lambda: MART(**ATK),
                      help=lambda: HELP(helper=helper, **ATK), gairat=lambda: GAIRAT(begin_epoch=0, **ATK),
                      mail=lambda: MAIL('at', burn_in=0, **ATK), mail_trades=lambda: MAIL('trades', burn_in=0, **ATK),
                      iat=lambda: IAT(**ATK), clean=lambda: Clean())
    if name in objectives: return Standard(objectives[name]())
    if name == 'awp': return AWP(PGDAT(**ATK))
    if name == 'awp_trades': return AWP(TRADES(**ATK), warmup=0)
    if name == 'seat': return SEAT(PGDAT(**ATK))
    if name == 'lbgat': return LBGAT(create_model('small_cnn', 'cifar10', width=8), **ATK)
    raise KeyError(name)


@pytest.mark.parametrize('name', ['pgdat', 'trades', 'mart', 'help', 'gairat', 'mail', 'mail_trades', 'iat', 'clean',
                                  'awp', 'awp_trades', 'seat', 'lbgat'])
def test_each_objective_and_method_trains_for_200_steps(name, cifar_subset, helper):
    method = _method(name, helper)
    torch.manual_seed(0)
    model = create_model('small_cnn', 'cifar10', width=8)
    log = LossLog()
    learn = Learner(model, method, Loader(*cifar_subset, batch_size=32, shuffle=True, seed=1), epochs=2, lr=0.05,
                    schedule='constant', cbs=[log], channels_last=True)
    learn.fit()
    losses = torch.tensor(log.losses)
    assert len(losses) == 200 and torch.isfinite(losses).all()
    assert all(torch.isfinite(p).all() for p in learn.eval_model().parameters())
    assert losses[-40:].mean() < losses[:40].mean(), (losses[:40].mean(), losses[-40:].mean())


def test_losses_against_hand_computation():
    torch.manual_seed(0)
    z, za = torch.randn(6, 4), torch.randn(6, 4)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    lin = nn.Identity()
    # TRADES: CE(clean) + beta * mean KL(p || q)
    p, q = F.softmax(z, 1), F.softmax(za, 1)
    kl = (p*(p.log() - q.log())).sum(1)
    loss, _ = TRADES(beta=6.0).loss(lin, z, za, y)
    assert torch.isclose(loss, F.cross_entropy(z, y) + 6.0*kl.mean(), atol=1e-6)
    assert torch.allclose(batch_kl(z, za), kl, atol=1e-6)
    # MART: boosted CE + beta * KL weighted by (1 - p_y(clean))
    hand = []
    for i in range(6):
        others = [k for k in range(4) if k != y[i]]
        kstar = max(others, key=lambda k: q[i, k])
        bce = -q[i, y[i]].log() - torch.log(1.0001 - q[i, kstar] + 1e-12)
        kl_i = (p[i]*(torch.log(p[i] + 1e-12) - torch.log(q[i] + 1e-12))).sum()
        hand.append(bce + 6.0*kl_i*(1.0000001 - p[i, y[i]]))
    assert torch.isclose(MART(beta=6.0).loss(lin, z, za, y)[0], torch.stack(hand).mean(), atol=1e-5)
    # GAIRAT weights: (1 + tanh(lam + 5(1 - 2k/K)))/2, normalised to sum B
    kappa = torch.tensor([0, 2, 4, 6, 8, 10])
    raw = torch.tensor([(1 + torch.tanh(torch.tensor(-1.0 + 5*(1 - 2*k/10))))/2 for k in kappa.tolist()])
    assert torch.allclose(gair_weights(kappa, 10, -1.0), 6*raw/raw.sum())
    # MAIL: PM = max_{k!=y} p_k - p_y on the adversarial prediction; AT weights 3*sigmoid(10*(PM - 0.5))
    pm = torch.stack([q[i, [k for k in range(4) if k != y[i]]].max() - q[i, y[i]] for i in range(6)])
    assert torch.allclose(probabilistic_margin(za, y), pm)
    m = MAIL('at'); m.start_epoch(119, 120)
    ce = F.cross_entropy(za, y, reduction='none')
    assert torch.isclose(m.loss(lin, z, za, y)[0], (3*torch.sigmoid(10*(pm - 0.5))*ce).mean(), atol=1e-6)


def _common(tmp_path):
    return dict(method='standard', objective='pgdat', dataset='digits', arch='small_cnn', width=16, epochs=3, batch_size=64,
                n_train=640, n_eval=64, n_report=64, checkpoint_every=3, runs_dir=str(tmp_path), seed=0, progress=False,
                eps=0.1, alpha=0.025, steps=4)


def _weights(run_dir):
    return load_checkpoint(Path(run_dir)/'checkpoints'/'last.pt')['model']


@pytest.mark.parametrize('kill_at_step', [3, 15])
def test_sigkill_and_resume_ends_with_identical_weights(tmp_path, kill_at_step):
    common = _common(tmp_path)
    ref = train(run_name='ref', **common)
    code = f'from robustbench_lab.train import train; train(run_name="killed", **{common!r})'
    proc = subprocess.Popen([sys.executable, '-c', code], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt, steps, deadline = tmp_path/'killed'/'checkpoints'/'last.pt', tmp_path/'killed'/'steps.jsonl', time.time() + 300
    # kill once the run has logged `kill_at_step` steps and holds a checkpoint: a step count, not a wall-clock delay,
    # so a faster machine cannot let the run finish first
    while not (ckpt.exists() and steps.exists() and len(steps.read_text().splitlines()) >= kill_at_step):
        assert proc.poll() is None and time.time() < deadline, 'training subprocess ended before the step to kill at'
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at = load_checkpoint(ckpt)
    assert at['step'] < 30, 'killed too late to test a resume'  # 3 epochs x 10 batches
    resumed = train(run_name='killed', resume=True, **common)
    a, b = _weights(ref.dir), _weights(resumed.dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m['epoch'] for m in resumed.metrics] == [0, 1, 2]
    lines = (resumed.dir/'metrics.jsonl').read_text().splitlines()
    assert [json.loads(l)['epoch'] for l in lines] == [0, 1, 2]
    steps = [json.loads(l)['step'] for l in (resumed.dir/'steps.jsonl').read_text().splitlines()]
    assert steps == list(range(30))  # every step logged once, none twice across the kill


def test_run_folder_and_metrics(tmp_path):
    run = train(run_name='r', report_best=True, **{**_common(tmp_path), 'checkpoint_every': None})
    assert sorted(p.name for p in run.dir.iterdir()) == ['checkpoints', 'config.json', 'hiders.pt', 'metrics.jsonl', 'report.json', 'report_best.json', 'steps.jsonl']
    assert sorted(p.name for p in (run.dir/'checkpoints').iterdir()) == ['best.pt', 'last.pt', 'prev.pt']  # two deep
    for m in run.metrics:
        assert {'epoch', 'lr', 'loss', 'clean_acc', 'robust_acc', 'seconds', 'train_img_per_s'} <= set(m)
        assert m['train_img_per_s'] > 0 and 0 <= m['robust_acc'] <= m['clean_acc'] <= 1
    cfg = json.loads((run.dir/'config.json').read_text())
    assert cfg['run']['eps'] == 0.1 and cfg['objective']['name'] == 'pgdat' and 'resume' not in cfg['run']
    with pytest.raises(ConfigError, match='exists'): train(run_name='r', **_common(tmp_path))
    with pytest.raises(ConfigError, match='different settings'): train(run_name='r', resume=True, **{**_common(tmp_path), 'lr': 0.05})
    # a run made before a setting existed resumes when the setting is at its default, and only then: neither its
    # config.json nor its checkpoint knows the setting (a run setting, and a setting of its objective)
    ck = load_checkpoint(run.dir/'checkpoints'/'last.pt')
    for c in (cfg, ck['config']):
        c['objective']['settings'].pop('pgdat_init'); c['run'].pop('hider_positions')
    (run.dir/'config.json').write_text(json.dumps(cfg))
    save_checkpoint(ck, run.dir/'checkpoints'/'last.pt')
    same = {**_common(tmp_path), 'report_best': True, 'checkpoint_every': None}
    with pytest.raises(ConfigError, match=r'different settings \(pgdat_init\)'):
        train(run_name='r', resume=True, **same, pgdat_init='normal')
    assert train(run_name='r', resume=True, **same).config['epochs'] == 3


def test_a_checkpoint_that_predates_a_setting_loads_and_one_that_differs_does_not():
    torch.manual_seed(0)
    x, y = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8), torch.randint(0, 10, (32,))
    make = lambda config: Learner(create_model('small_cnn', 'digits', width=8), Standard(Clean()), Loader(x, y, batch_size=16),
                                  epochs=1, lr=0.05, schedule='constant', config=config)
    state = make(dict(lr=0.05, new_setting='default', nproc=1)).state_dict()
    state['config'] = dict(lr=0.05, nproc=2)  # written before `new_setting` existed, by a run of another size
    make(dict(lr=0.05, new_setting='default', nproc=1)).load_state_dict(state)
    with pytest.raises(ConfigError, match=r'different settings \(lr\)'):
        make(dict(lr=0.1, new_setting='default')).load_state_dict(state)
    state['config'] = dict(lr=0.05, removed_setting=True)  # a setting this version does not have
    with pytest.raises(ConfigError, match=r'different settings \(removed_setting\)'):
        make(dict(lr=0.05, new_setting='default')).load_state_dict(state)


def test_presets_fill_defaults_and_yield_to_explicit_values():
    c = resolve_config(preset='hfat-paper', epochs=20, n_train=500)
    assert c['arch'] == 'preact_resnet18' and c['epochs'] == 20 and c['milestones'] == [0.5, 0.75] and c['weight_decay'] == 5e-4
    assert resolve_config(preset='lbgat-code', dataset='cifar10', arch='small_cnn', natural_arch='small_cnn')['schedule'] == 'lbgat'
    for name in PRESETS: resolve_config(preset=name, dataset='cifar10')  # (lbgat-code trains CIFAR-100, not on this machine)


BAD = [('epochs', 'abc', 'epochs'), ('epochs', 0, 'epochs'), ('method', 'fgsm', 'method'), ('objective', 'fat', 'objective'),
       ('lr', -1.0, 'lr'), ('eps', 1.5, 'eps'), ('arch', 'resnet9', 'arch'), ('dataset', 'imagenet', 'dataset'),
       ('schedule', 'step', 'schedule'), ('batch_size', 0, 'batch_size'), ('n_train', 10**6, 'n_train'),
       ('device', 'cuda:3', 'device'), ('run_name', '../../etc', 'run_name'), ('preset', 'madry', 'preset'),
       ('amp', 'fp16', 'amp'), ('bn_mode', 'frozen', 'bn_mode')]


@pytest.fixture(scope='module')
def papermill_env(tmp_path_factory):
    return tmp_path_factory.mktemp('pm')


@pytest.mark.parametrize('name,value,match', BAD)
def test_bad_parameters_fail_before_compute_through_papermill(name, value, match, papermill_env):
    import papermill as pm
    runs = papermill_env/f'runs-{name}'
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(REPO/'nbs'/'train.ipynb'), str(papermill_env/f'{name}.ipynb'),
                            parameters={name: value, 'runs_dir': str(runs)}, cwd=str(REPO/'nbs'), progress_bar=False)
    assert e.value.ename == 'ConfigError' and match in e.value.evalue
    assert not runs.exists() or not any(runs.iterdir())


def test_papermill_cli_exits_non_zero(tmp_path):
    out = subprocess.run([str(Path(sys.executable).parent/'papermill'), str(REPO/'nbs'/'train.ipynb'), str(tmp_path/'o.ipynb'),
                          '-p', 'epochs', 'abc', '-p', 'runs_dir', str(tmp_path/'runs')], capture_output=True, text=True)
    assert out.returncode != 0 and "epochs = 'abc'" in out.stderr + out.stdout
    assert not (tmp_path/'runs').exists()
    out = subprocess.run([str(Path(sys.executable).parent/'rblab-run'), str(REPO/'nbs'/'train.ipynb'), '-p', 'objective', 'fat',
                          '-p', 'runs_dir', str(tmp_path/'runs')], capture_output=True, text=True)
    assert out.returncode == 1 and "objective = 'fat'" in out.stderr and not (tmp_path/'runs').exists()
    assert 'without encryption' not in out.stderr  # rblab-run's kernel talks over IPC sockets, not plain TCP
