"""The prepared GPU script runs on CPU at tiny sizes in CI, so that it cannot rot before a GPU runs it."""
import contextlib
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

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


def test_rows_past_the_budget_are_recorded_and_a_resumed_call_runs_them(tmp_path, cifar_train):
    first, second = tmp_path/'first.json', tmp_path/'second.json'
    run = lambda *args: subprocess.run([sys.executable, str(SCRIPT), '--tiny', '--only', 'throughput', *args], capture_output=True,
                                       text=True, timeout=600)
    out = run('--out', str(first), '--budget-s', '1e-9')
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    d = json.loads(first.read_text())
    assert d['throughput'] and all('skipped' in r and 'img_per_s' not in r for r in d['throughput'])
    assert d['skipped'] == [r['setting'] for r in d['throughput']] and d['failed'] == []
    out = run('--out', str(second), '--resume', str(first))
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    e = json.loads(second.read_text())
    assert [r['setting'] for r in e['throughput']] == d['skipped'] and all(r['img_per_s'] > 0 for r in e['throughput'])
    assert e['skipped'] == [] and e['resumed_from']['path'] == str(first)
    # the estimates name what they lack (no method was measured in these calls)
    assert all('missing' in r and 'hours_1_gpu' not in r for r in e['estimates'])


def test_bad_arguments_are_refused_before_any_work(tmp_path):
    spec = importlib.util.spec_from_file_location('device_check', SCRIPT)
    device_check = importlib.util.module_from_spec(spec); spec.loader.exec_module(device_check)
    for args, says in ((['--only', 'speed'], '--only'), (['--methods', 'pgd-at'], '--methods'), (['--budget-s', '-1'], '--budget-s'),
                       (['--resume', str(tmp_path/'none.json')], '--resume')):
        err = io.StringIO()
        with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(err):
            device_check.main(['--tiny', '--out', str(tmp_path/'x.json'), *args])
        assert e.value.code == 2 and says in err.getvalue(), (args, err.getvalue()[-500:])
        assert not (tmp_path/'x.json').exists()
