"""The prepared GPU script runs on CPU at tiny sizes in CI, so that it cannot rot before a GPU runs it."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_device_check_runs_every_method_and_measurement_at_tiny_sizes(tmp_path, cifar_train):
    out = subprocess.run([sys.executable, str(REPO/'benchmarks'/'device_check.py'), '--tiny', '--out', str(tmp_path/'dc.json')],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    d = json.loads((tmp_path/'dc.json').read_text())
    methods = {r['method'] for r in d['methods']}
    assert {'hfat-code', 'dynat-code', 'awp-code', 'lbgat-code', 'seat-code', 'oat-code', 'f2at-paper', 'afa-paper stage 1',
            'afa-paper stage 2'} <= methods and all(r['ok'] for r in d['methods'])
    assert all(r['steps'] == 8 for r in d['methods'])
    settings = [r['setting'] for r in d['throughput']]
    assert settings[0].startswith('reference') and all(r['img_per_s'] > 0 for r in d['throughput'])
    aa = d['autoattack']
    # the same attack on the same points, at a radius where some points survive and some do not
    assert aa['n'] == 16 and aa['per_sample_equal'] and 0 < aa['pyautoattack_robust'] < 1, aa
    # the attack's own time and evaluate()'s clean pass and sanity checks are parts of the whole call, reported apart
    assert 0 < aa['workbench_attack_s'] and aa['workbench_attack_s'] + aa['workbench_clean_s'] + aa['workbench_checks_s'] <= aa['workbench_s'], aa
    assert d['failed'] == []
