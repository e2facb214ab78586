"""The newcomer's path: misspelt parameters, empty resumes, non-finite values and diverging runs stop with a clear error and a
non-zero exit; presets name their methods and yield to explicit values; errors speak each pipeline's names; run files get
ordinary permissions; relative data paths resolve against the repository; the lab leaves the notebooks clean."""
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from robustbench_lab.core import ConfigError, settings
from robustbench_lab.learner import Callback, Learner, TrainingDiverged, load_checkpoint
from robustbench_lab.train import PRESETS, preset_table, resolve_config, train

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def papermill(nb, out, params, cwd=REPO/'nbs', yaml=None):
    args = [str(BIN/'papermill'), str(REPO/'nbs'/nb), str(out)]
    for k, v in params.items(): args += ['-p', k, str(v)]
    if yaml: args += ['-y', yaml]
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize('nb,bad,good', [('train.ipynb', 'epoch', 'epochs'), ('train_hfat.ipynb', 'step_s', 'steps_s'),
                                         ('train_dynat.ipynb', 'variantt', 'variant'), ('train_afa.ipynb', 'k', 'K'),
                                         ('train_f2at.ipynb', 'alpha_pdd', 'alpha_pd')])
def test_a_misspelt_parameter_stops_the_pipeline(tmp_path, nb, bad, good):
    out = papermill(nb, tmp_path/'o.ipynb', {bad: 1, 'runs_dir': tmp_path/'runs'})
    assert out.returncode != 0 and f"did you mean {good!r}" in out.stderr + out.stdout, (out.stderr + out.stdout)[-1500:]
    assert not (tmp_path/'runs').exists()


def test_rblab_run_refuses_unknown_parameters_before_starting_a_kernel(tmp_path):
    import time
    t = time.time()
    out = subprocess.run([str(BIN/'rblab-run'), str(REPO/'nbs'/'train.ipynb'), '-p', 'epoch', '1', '-p', 'runs_dir', str(tmp_path/'runs')],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "did you mean 'epochs'" in out.stderr and not (tmp_path/'runs').exists()


def test_explicit_parameters_win_over_the_preset_even_at_their_default():
    from robustbench_lab.runs import RUN_SETTINGS, apply_preset
    pairs = 0
    for preset, recipe in PRESETS.items():
        for key, value in recipe.items():
            if key not in RUN_SETTINGS or value == RUN_SETTINGS[key]: continue
            assert apply_preset(dict(preset=preset, **{key: RUN_SETTINGS[key]}))[key] == RUN_SETTINGS[key], (preset, key)
            pairs += 1
    assert pairs > 150
    assert resolve_config(preset='afa-paper', epochs=3, dataset='digits', arch='small_cnn')['epochs'] == 3
    assert resolve_config(preset='mart-code', beta=None, dataset='digits', arch='small_cnn')['beta'] == 6.0  # MART's own, not the preset's 5


def test_presets_name_their_methods_and_protocols_leave_it_to_you():
    assert resolve_config(preset='hfat-paper', dataset='digits', arch='small_cnn')['method'] == 'hfat'
    assert resolve_config(preset='hfat-code', dataset='digits', arch='small_cnn')['method'] == 'hfat'
    assert resolve_config(preset='dynat-code', dataset='digits', arch='small_cnn', guide_arch='small_cnn')['method'] == 'dynat'
    assert preset_table().set_index('preset').loc['hfat-code', 'method'] == 'hfat'
    for name, preset in PRESETS.items():
        method = preset.get('method', preset.get('objective'))
        if name.endswith('-protocol'): assert method is None and 'method' not in preset
        else: assert method is not None
    assert resolve_config(preset='hfat-protocol', objective='mart', dataset='digits', arch='small_cnn')['objective'] == 'mart'


def test_afa_paper_preset_carries_its_stage2_schedule():
    from robustbench_lab.learner import Schedule
    from robustbench_lab.runs import apply_preset
    c = apply_preset(dict(preset='afa-paper', method='afa', afa_stage=2, dataset='digits', arch='small_cnn'))
    s = Schedule(c['schedule'], c['lr'], c['epochs'], c['milestones'], c['lr_factors'])
    assert c['epochs'] == 20 and [s(e, 0, 1) for e in (0, 9, 10, 19)] == [0.01, 0.01, 0.01*0.1, 0.01*0.1]
    assert resolve_config(preset='afa-paper', method='afa', afa_stage=1, dataset='digits', arch='small_cnn')['epochs'] == 100


@pytest.mark.parametrize('name,value', [('lr', 'inf'), ('eps', 'nan'), ('hfat_lt', '-inf')])
def test_non_finite_values_are_refused(name, value):
    with pytest.raises(ConfigError, match=name): resolve_config(**{name: float(value)})


def test_resume_needs_something_to_resume_and_auto_resumes_when_there_is(tmp_path):
    common = dict(runs_dir=str(tmp_path), epochs=1, n_train=128, n_eval=32, n_report=32, progress=False, width=8)
    with pytest.raises(ConfigError, match=r"nothing to resume .*no run folder .*last\.pt"): train(run_name='ghost', resume=True, **common)
    assert not (tmp_path/'ghost').exists()
    first = train(run_name='auto', resume='auto', **common)  # nothing there: a fresh run
    again = train(run_name='auto', resume='auto', **common)  # there: continued (already finished, so evaluated again)
    assert [m['epoch'] for m in again.metrics] == [0] and first.dir == again.dir


class Poison(Callback):
    "Makes the model's output NaN from optimiser step `at` on (a forward hook), like a run that diverges there."
    def __init__(self, at): self.at, self.hook = at, None
    def before_batch(self, learn):
        if learn.step == self.at and self.hook is None:
            self.hook = learn.model.register_forward_hook(lambda m, i, o: o*float('nan'))


def test_divergence_stops_at_the_step_keeps_the_last_good_checkpoint_and_resumes(tmp_path):
    from robustbench_lab.data import Loader, load_arrays
    from robustbench_lab.learner import CheckpointCB, MetricsCB
    from robustbench_lab.methods import Standard
    from robustbench_lab.models import create_model
    from robustbench_lab.objectives import PGDAT
    x, y = load_arrays('digits', 'train')
    def learner(cbs):
        torch.manual_seed(0)
        return Learner(create_model('small_cnn', 'digits', width=8), Standard(PGDAT(eps=0.1, alpha=0.05, steps=1)),
                       Loader(x[:320], y[:320], batch_size=32, shuffle=True), epochs=2, lr=0.05, schedule='constant', cbs=cbs)
    ckdir = tmp_path/'ck'
    with pytest.raises(TrainingDiverged, match=r'epoch 2/2, batch 3, step 12: non-finite loss term'):
        learner([Poison(12), MetricsCB(tmp_path/'metrics.jsonl'), CheckpointCB(ckdir, every=5)]).fit()
    last = json.loads((tmp_path/'metrics.jsonl').read_text().splitlines()[-1])
    assert last['failed'] and last['step'] == 12 and 'loss' in last['reason']
    kept = load_checkpoint(ckdir/'last.pt')
    assert kept['step'] == 10 and all(torch.isfinite(v).all() for v in kept['model'].values() if v.is_floating_point())
    resumed = learner([MetricsCB(tmp_path/'metrics.jsonl'), CheckpointCB(ckdir, every=5)]).fit(resume_from=ckdir/'last.pt')
    clean = learner([]).fit()
    assert resumed.step == 20 and all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(), clean.model.state_dict().values()))


def test_fp16_gradient_overflow_is_skipped_by_the_scaler_not_taken_for_divergence():
    from robustbench_lab.data import Loader, load_arrays
    from robustbench_lab.methods import Standard
    from robustbench_lab.models import create_model
    from robustbench_lab.objectives import PGDAT
    x, y = load_arrays('digits', 'train')
    def learner(scale, **kw):
        "The learner's fp16 path with a CPU GradScaler (the learner takes fp16 on CUDA only)."
        torch.manual_seed(0)
        learn = Learner(create_model('small_cnn', 'digits', width=8), Standard(PGDAT(eps=0.1, alpha=0.05, steps=1)),
                        Loader(x[:320], y[:320], batch_size=32, shuffle=True), epochs=1, lr=0.05, schedule='constant', **kw)
        learn.scaler = torch.amp.GradScaler('cpu', init_scale=scale)
        return learn
    def poison_gradient(learn, steps):
        next(learn.model.parameters()).register_hook(lambda g: g*float('inf') if learn.step < steps else g)
    # with fp16, GradScaler finds its loss scale by overflowing: an infinite gradient at a finite loss, stood in for here by
    # a hook that makes one gradient infinite in the first 3 steps
    learn = learner(2.0**16)
    poison_gradient(learn, 3)
    learn.fit()  # nonfinite='stop': an overflow taken for divergence would raise TrainingDiverged here
    rec = learn.history[-1]
    assert rec['amp_skipped_steps'] == 3 and 'skipped_steps' not in rec, rec
    assert learn.scaler.get_scale() == 2.0**13  # halved at each overflow
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())
    # at a loss scale of 1 the scaling cannot be what overflowed: a gradient that stays infinite is divergence
    learn = learner(4.0)
    poison_gradient(learn, 100)
    with pytest.raises(TrainingDiverged, match='step 2: non-finite gradient'): learn.fit()
    # a refused step (here: a NaN loss from step 2 on) ends the scaler's step too, so that the next one can unscale again
    learn = learner(2.0**16, cbs=[Poison(2)], nonfinite='skip')
    learn.fit()
    assert learn.history[-1]['skipped_steps'] == 8 and 'amp_skipped_steps' not in learn.history[-1]


def test_bf16_autocast_runs_the_step_on_a_cpu_and_fp16_is_refused_there():
    from robustbench_lab.data import Loader, load_arrays
    from robustbench_lab.methods import Standard
    from robustbench_lab.models import create_model
    from robustbench_lab.objectives import PGDAT
    x, y = load_arrays('digits', 'train')
    torch.manual_seed(0)
    model = create_model('small_cnn', 'digits', width=8)
    seen = set()
    model.linear.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
    learner = lambda amp: Learner(model, Standard(PGDAT(eps=0.1, alpha=0.05, steps=1)), Loader(x[:64], y[:64], batch_size=32),
                                  epochs=1, lr=0.05, schedule='constant', amp=amp)
    from robustbench_lab.learner import _slow_cpu_bf16
    with pytest.warns(UserWarning, match='14x slower') if _slow_cpu_bf16('bf16', torch.device('cpu')) else contextlib.nullcontext():
        learn = learner('bf16')
    learn.fit()
    assert seen == {torch.bfloat16}  # the attack's and the update's forwards, under autocast
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(ConfigError, match="amp = 'fp16' on cpu"): learner('fp16')


def test_a_refused_step_leaves_seats_average_as_it_was():
    from robustbench_lab.data import Loader, load_arrays
    from robustbench_lab.methods import SEAT
    from robustbench_lab.models import create_model
    from robustbench_lab.objectives import PGDAT
    x, y = load_arrays('digits', 'train')
    torch.manual_seed(0)
    learn = Learner(create_model('small_cnn', 'digits', width=8), SEAT(PGDAT(eps=0.1, alpha=0.05, steps=1)),
                    Loader(x[:320], y[:320], batch_size=32, shuffle=True), epochs=1, lr=0.05, schedule='constant', nonfinite='skip')
    learn.model.register_forward_pre_hook(lambda m, args: (args[0]*float('nan'),) if learn.step >= 2 else None)
    after_two = {}
    class Keep(Callback):
        def after_batch(self, learn):
            if learn.step == 2: after_two.update({k: v.clone() for k, v in learn.eval_model().state_dict().items()}, t=learn.method.t)
    learn.cbs.append(Keep())
    learn.fit()  # NaN inputs from step 2 on: 8 refused steps, whose NaN BatchNorm statistics the average used to take in
    assert learn.history[-1]['skipped_steps'] == 8
    assert all(torch.isfinite(b).all() for b in learn.eval_model().buffers() if b.is_floating_point())
    # a refused step is not a step of the average either: it neither counts nor pulls the average toward the unchanged weights
    assert learn.method.t == after_two.pop('t') == 2
    assert all(torch.equal(v, after_two[k]) for k, v in learn.eval_model().state_dict().items())


def test_a_diverging_pipeline_exits_non_zero_and_says_why_in_its_report(tmp_path):
    out = papermill('train.ipynb', tmp_path/'o.ipynb', {'lr': 1e6, 'epochs': 1, 'runs_dir': tmp_path/'runs', 'checkpoint_every': 1,
                                                         'n_report': 32, 'progress': False})
    assert out.returncode != 0 and 'TrainingDiverged' in out.stderr + out.stdout
    run = next((tmp_path/'runs').iterdir())
    assert json.loads((run/'metrics.jsonl').read_text().splitlines()[-1])['failed']
    assert 'diverged' in json.loads((run/'report.json').read_text())['meta']['ended_early']


def error_message(out):
    "The `ConfigError: ...` line a failed pipeline ends with (the traceback above it quotes the notebook's source)."
    lines = [l for l in (out.stderr + out.stdout).splitlines() if l.startswith('ConfigError: ')]
    assert out.returncode != 0 and lines, out.stderr[-2000:]
    return lines[-1]


def test_errors_speak_the_pipelines_names_and_units(tmp_path):
    msg = error_message(papermill('train_afa.ipynb', tmp_path/'o.ipynb', {'K': 1, 'runs_dir': tmp_path/'runs'}))
    assert 'K = 1' in msg and 'afa_K' not in msg, msg
    msg = error_message(papermill('train_afa.ipynb', tmp_path/'o2.ipynb', {'K': 3, 'runs_dir': tmp_path/'runs'}, yaml='xi: [0, 4]'))
    assert 'xi = [0, 4]: expected a list of length 3' in msg, msg  # in /255, as given
    msg = error_message(papermill('train_afa.ipynb', tmp_path/'o3.ipynb', {'samples': 'branch', 'runs_dir': tmp_path/'runs'}))
    assert "samples = 'branch'" in msg and 'strong_branch' in msg, msg
    msg = error_message(papermill('train_dynat.ipynb', tmp_path/'o4.ipynb', {'lam': -1, 'runs_dir': tmp_path/'runs'}))
    assert 'lam = -1.0' in msg and 'dynat_lambda' not in msg, msg
    assert not (tmp_path/'runs').exists()  # refused before any run folder was made


def test_relative_data_paths_resolve_against_the_settings_file_from_any_folder(monkeypatch):
    monkeypatch.setenv('RBLAB_DATA', 'some/data')
    monkeypatch.chdir(REPO/'nbs')
    assert settings().data_dir == REPO/'some'/'data'


def test_run_files_get_ordinary_permissions(tmp_path):
    run = train(run_name='perm', runs_dir=str(tmp_path), epochs=1, n_train=64, n_eval=32, n_report=32, progress=False, width=8)
    mask = os.umask(0o022); os.umask(mask)
    for f in ['config.json', 'metrics.jsonl', 'report.json', 'checkpoints/last.pt']:
        assert (run.dir/f).stat().st_mode & 0o777 == 0o666 & ~mask, f


def test_readme_outputs_are_ignored():
    out = subprocess.run(['git', 'check-ignore', 'out.ipynb', 'nbs/out.ipynb'], cwd=REPO, capture_output=True, text=True)
    assert out.stdout.split() == ['out.ipynb', 'nbs/out.ipynb']


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def test_open_run_and_save_through_the_jupyter_server_leaves_git_clean(tmp_path):
    "What the lab does to a notebook (kernel metadata of another Python, outputs, execution counts) never reaches nbs/."
    import shutil, time, urllib.request
    repo = tmp_path/'repo'; (repo/'nbs').mkdir(parents=True)
    for nb in ('12_afa.ipynb', 'train.ipynb'): shutil.copy(REPO/'nbs'/nb, repo/'nbs'/nb)
    shutil.copy(REPO/'.gitignore', repo/'.gitignore')
    git = lambda *a: subprocess.run(['git', '-C', str(repo), *a], capture_output=True, text=True, check=True).stdout
    git('init', '-q'); git('add', '.'); git('-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-qm', 'clean')
    port, token = _free_port(), 'rblab-test'
    env = {**os.environ, 'JUPYTER_CONFIG_PATH': str(REPO/'.jupyter'), 'JUPYTER_RUNTIME_DIR': str(tmp_path/'rt')}
    server = subprocess.Popen([str(BIN/'jupyter'), 'server', '--no-browser', f'--port={port}', '--ip=127.0.0.1', '--allow-root',
                               f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={repo}'],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    def call(method, path, body=None):
        req = urllib.request.Request(f'http://127.0.0.1:{port}/api/contents/{path}', method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={'Authorization': f'token {token}', 'Content-Type': 'application/json'})
        with urllib.request.urlopen(req, timeout=30) as r: return json.loads(r.read())
    try:
        for _ in range(120):
            try: call('GET', 'nbs'); break
            except OSError: time.sleep(0.5)
        else: pytest.fail(f'jupyter server did not start: {server.stderr.read() if server.poll() is not None else ""}')
        for nb in ('12_afa.ipynb', 'train.ipynb'):
            model = call('GET', f'nbs/{nb}')
            content = model['content']
            content['metadata']['kernelspec']['display_name'] = 'Python 3 (ipykernel)'
            content['metadata']['language_info']['version'] = '3.12.9'
            content['metadata']['widgets'] = {'application/vnd.jupyter.widget-state+json': {'state': {}}}
            code = [c for c in content['cells'] if c['cell_type'] == 'code']
            for i, cell in enumerate(code):
                cell['execution_count'] = i + 1
                cell['metadata']['execution'] = {'iopub.status.busy': '2026-11-30T00:00:00Z'}
                cell['outputs'] = [{'output_type': 'stream', 'name': 'stdout', 'text': 'ran\n'}]
            call('PUT', f'nbs/{nb}', {'type': 'notebook', 'format': 'json', 'content': content})
            saved = json.loads((repo/'nbs'/nb).read_text())
            assert all(c['outputs'] == [] for c in saved['cells'] if c['cell_type'] == 'code')  # the save did happen
        assert git('status', '--porcelain') == '', git('diff')[:3000]
    finally:
        server.terminate(); server.wait(timeout=30)


def test_gairat_burn_in_is_not_mistaken_for_divergence(tmp_path):
    "Before reweighting starts GAIRAT has no λ; the step logs must not carry a NaN the divergence guard would stop on."
    run = train(dataset='digits', arch='small_cnn', width=8, objective='gairat', gairat_begin=3, epochs=1, n_eval=50, n_report=50,
                runs_dir=str(tmp_path), progress=False)
    assert run.report is not None and 'ended_early' not in run.report.meta
    assert all('lam' not in json.loads(l) for l in (run.dir/'steps.jsonl').read_text().splitlines())


def test_f2at_logits_source_is_flagged_unstable(tmp_path):
    with pytest.warns(UserWarning, match="'logits' is unstable"):
        run = train(dataset='digits', arch='small_cnn', width=8, method='f2at', f2at_source='logits', f2at_units=32, f2at_est_epochs=2,
                    f2at_est_batch=128, epochs=1, n_eval=50, n_report=50, runs_dir=str(tmp_path), progress=False, probes=False)
    assert [f['kind'] for f in run.report.flags if f['code'] == 'f2at_logits_unstable'] == ['mechanism']


def test_f2at_target_mode_is_probed_once_its_estimators_exist(tmp_path):
    "Mode 'target' has no estimators before `f2at_source_epochs`: the probe waits for them instead of failing the run."
    run = train(dataset='digits', arch='small_cnn', width=8, method='f2at', f2at_mode='target', f2at_source_epochs=1, f2at_units=32,
                f2at_est_epochs=2, f2at_est_batch=128, epochs=2, probe_every=1, probe_n=32, n_eval=50, n_report=50,
                runs_dir=str(tmp_path), progress=False)
    assert 'probe_i_nat' not in run.metrics[0] and 'probe_i_nat' in run.metrics[1]
    assert run.report.metrics['probe_i_nat'] == run.metrics[1]['probe_i_nat']


def test_one_refused_step_leaves_f2ats_online_estimators_finite():
    from robustbench_lab.data import Loader, load_arrays
    from robustbench_lab.f2at import F2AT, MIEstimator
    from robustbench_lab.models import create_model
    x, y = load_arrays('digits', 'train')
    torch.manual_seed(0)
    net = create_model('small_cnn', 'digits', width=8)
    method = F2AT(MIEstimator(1, net.feature_dim, 16), MIEstimator(1, net.feature_dim, 16), mode='online', alpha=0.5,
                  eps=0.1, alpha_attack=0.05, steps=1)
    learn = Learner(net, method, Loader(x[:320], y[:320], batch_size=32, shuffle=True), epochs=1, lr=0.05, schedule='constant',
                    nonfinite='skip')
    # NaN activations at step 2 only, in every forward (F²AT's representation calls forward_features, past the model's hooks)
    net.conv1.register_forward_hook(lambda m, args, out: out*float('nan') if learn.step == 2 else None)
    learn.fit()  # the estimators took no step from that batch, so the steps after it are taken
    assert learn.history[-1]['skipped_steps'] == 1
    ests = [method.est_nat, method.est_pert]
    assert all(torch.isfinite(t).all() for e in ests for t in [*e.parameters(), *e.buffers()] if t.is_floating_point())
    assert all(torch.isfinite(v).all() for s in method.est_opt.state.values() for v in s.values() if torch.is_tensor(v))
