"""The prepared GPU script runs on CPU at tiny sizes in CI, so that it cannot rot before a GPU runs it."""
import argparse
import contextlib
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path
from unittest.mock import patch

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO/'benchmarks'/'device_check.py'


def test_device_check_runs_every_method_and_measurement_at_tiny_sizes(tmp_path, cifar_train):
    out = subprocess.run([sys.executable, str(SCRIPT), '--tiny', '--out', str(tmp_path/'dc.json')],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    d = json.loads((tmp_path/'dc.json').read_text())
    methods = {r['method']: r for r in d['methods']}
    assert {'pgd-at', 'hfat-code', 'dynat-code', 'awp-code', 'lbgat-code', 'seat-code', 'oat-code', 'f2at-paper', 'afa-paper stage 1',
            'afa-paper stage 2'} <= set(methods) and all(r['ok'] for r in methods.values())
    assert all(r['steps'] == 8 and r['img_per_s_steady'] > 0 for r in methods.values())  # two epochs of 4 steps
    assert all(r['amp'] == 'bf16' for r in methods.values())  # the GPU run's autocast dtype paths, here on the CPU
    # every method compiles (the `eager` backend still captures graphs), within dynamo's recompile limit: AFA's Stage I
    # needs 9 variants of the forward, OAT's per-sample routing more, past dynamo's default of 8
    assert all(r['graphs_compiled'] >= 1 for r in methods.values())
    assert methods['afa-paper stage 1']['graphs_compiled'] > 8 and methods['oat-code']['graphs_compiled'] > 8
    settings = [r['setting'] for r in d['throughput']]
    assert settings[0].startswith('reference') and all(r['img_per_s'] > 0 for r in d['throughput'])
    assert any(r.get('deterministic') is False for r in d['throughput'])  # the cost of the deterministic kernels, measured
    assert {r['mode'] for r in d['distributed']} == {'in-process', 'launched'} and d['distributed_overhead']['pairs'] == 1
    assert d['resume'] == [dict(run='dc-ddp-0-in-process', ok=True, why='')]
    # every recipe's training time estimated from the measured costs
    est = {r['recipe']: r for r in d['estimates']}
    assert len(est) == 16 and all(r['hours_1_gpu'] > 0 and r['hours_8_gpus_ideal'] == pytest.approx(r['hours_1_gpu']/8) for r in est.values())
    aa = d['autoattack']
    # the same attack on the same points, at a radius where some points survive and some do not
    assert aa['n'] == 16 and aa['per_sample_equal'] and 0 < aa['pyautoattack_robust'] < 1, aa
    # the attack's own time and evaluate()'s clean pass and sanity checks are parts of the whole call, reported apart
    assert 0 < aa['workbench_attack_s'] and aa['workbench_attack_s'] + aa['workbench_clean_s'] + aa['workbench_checks_s'] <= aa['workbench_s'], aa
    assert d['failed'] == [] and d['skipped'] == []


def load_device_check():
    spec = importlib.util.spec_from_file_location('device_check', SCRIPT)
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
    return module


def test_rows_past_the_budget_are_recorded_and_a_resumed_call_runs_only_them(tmp_path, cifar_train):
    first, second = tmp_path/'first.json', tmp_path/'second.json'
    run = lambda *args: subprocess.run([sys.executable, str(SCRIPT), '--tiny', '--only', 'throughput', *args], capture_output=True,
                                       text=True, timeout=600)
    out = run('--out', str(first), '--budget-s', '1e-9')
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    d = json.loads(first.read_text())
    assert d['throughput'] and all('skipped' in r and 'img_per_s' not in r for r in d['throughput'])
    assert d['skipped'] == [f"{r['arch']} {r['setting']}" for r in d['throughput']] and d['failed'] == []
    # as if the first call had measured its first row: a resumed call keeps it and runs the others
    kept = dict(d['throughput'][0], img_per_s=123.0); del kept['skipped']
    d['throughput'][0] = kept
    first.write_text(json.dumps(d))
    out = run('--out', str(second), '--resume', str(first))
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    e = json.loads(second.read_text())
    assert e['throughput'][0] == kept and [r['setting'] for r in e['throughput']] == [r['setting'] for r in d['throughput']]
    assert all(r['img_per_s'] > 0 and r['img_per_s'] != 123.0 for r in e['throughput'][1:])
    assert e['skipped'] == [] and e['resumed_from']['path'] == str(first)
    # the estimates name what they lack (no method was measured in these calls)
    assert all('missing' in r and 'hours_1_gpu' not in r for r in e['estimates'])


def test_estimates_scale_the_methods_cost_by_the_architectures():
    device_check = load_device_check()
    a = argparse.Namespace(tiny=False); device_check.configure(a, 'cuda')
    est = a.estimate_setting
    out = dict(throughput=[dict(arch='preact_resnet18', reference=False, img_per_s=2000.0, **est),
                           dict(arch='wrn-34-10', reference=False, img_per_s=250.0, **est),
                           dict(arch='wrn-34-10', reference=False, img_per_s=400.0, **dict(est, deterministic=False)),  # not this one
                           dict(arch='wrn-34-10', reference=True, img_per_s=100.0)],  # nor the reference loop
               methods=[dict(method='dynat-code', ok=True, img_per_s_steady=1000.0), dict(method='hfat-code', ok=True, img_per_s_steady=800.0)])
    rows = {r['recipe']: r for r in device_check.estimate_recipes(a, out)}
    # DYNAT: half PGD-AT's speed on PreActResNet-18, on a WRN-34-10 8x slower than PreActResNet-18: 1/125 s per image
    assert rows['dynat-code']['s_per_image'] == pytest.approx(2000/(1000*250))
    assert rows['dynat-code']['hours_1_gpu'] == pytest.approx(100*50000/125/3600)  # 100 epochs
    assert rows['hfat-code']['s_per_image'] == pytest.approx(1/800) and rows['hfat-code']['epochs'] == 200
    assert rows['trades-code']['missing'] == ['trades-code on preact_resnet18']
    assert 'PGD-AT on resnet18 (learner bf16, channels-last, eager)' in rows['mart-code']['missing']


def test_the_recompile_limit_watch_and_the_kernel_choice():
    import torch
    import torch._dynamo
    device_check = load_device_check()
    watch = device_check.RecompileLimitWatch()
    f = torch.compile(lambda x: x*2, backend='eager')
    with patch.object(torch._dynamo.config, 'recompile_limit', 1):
        torch._dynamo.reset()
        for n in (1, 2, 3): f(torch.ones(n, 2, 2*n))  # a new shape per call, past a limit of one variant
    assert watch.hits >= 1
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled())
    device_check.seed_everything(0)
    with device_check.kernel_choice(False):
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic and not torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic and torch.are_deterministic_algorithms_enabled()
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[:2]
    torch.use_deterministic_algorithms(before[2], warn_only=True)


def test_bad_arguments_are_refused_before_any_work(tmp_path):
    device_check = load_device_check()
    for args, says in ((['--only', 'speed'], '--only'), (['--methods', 'pgd-at'], '--methods'), (['--budget-s', '-1'], '--budget-s'),
                       (['--resume', str(tmp_path/'none.json')], '--resume')):
        err = io.StringIO()
        with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(err):
            device_check.main(['--tiny', '--out', str(tmp_path/'x.json'), *args])
        assert e.value.code == 2 and says in err.getvalue(), (args, err.getvalue()[-500:])
        assert not (tmp_path/'x.json').exists()


def test_a_graph_compiled_in_the_second_epoch_is_not_part_of_a_methods_steady_cost():
    dc = load_device_check()
    # the Rice-based recipes meet a new variant of the forward at the first batch of the second epoch (eval-mode attack)
    steps = [dict(epoch=0, seconds=30.0), dict(epoch=0, seconds=0.5), dict(epoch=1, seconds=12.0), dict(epoch=1, seconds=0.5),
             dict(epoch=1, seconds=0.25), dict(epoch=1, seconds=0.5)]
    assert dc.steady_img_per_s(steps, 128) == 128/0.5
