"""The project's own contracts: dependency lists agree, settings precedence, the library matches the notebooks."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from robustbench_lab.core import ConfigError, settings

REPO = Path(__file__).resolve().parent.parent
try:
    import tomllib
except ImportError:  # python < 3.11
    import tomli as tomllib

CONDA_TO_PIP = {'pytorch': 'torch'}


def _split(req):
    m = re.match(r'\s*([A-Za-z0-9_.\-]+)\s*(.*)$', req)
    return m[1].lower().replace('_', '-'), m[2].replace(' ', '')


def test_environment_yml_matches_pyproject():
    proj = tomllib.loads((REPO/'pyproject.toml').read_text())['project']
    pip_reqs = dict(_split(r) for r in proj['dependencies'] + proj['optional-dependencies']['dev'])
    env = yaml.safe_load((REPO/'environment.yml').read_text())
    conda = {}
    for dep in env['dependencies']:
        if isinstance(dep, dict):
            for r in dep['pip']:
                if not r.startswith('-e'): conda.update([_split(r)])
        else:
            name, spec = _split(dep)
            if name not in ('python', 'pip'): conda[CONDA_TO_PIP.get(name, name)] = spec
    assert conda == pip_reqs


def test_settings_precedence(tmp_path, monkeypatch):
    ini = tmp_path/'settings.ini'
    ini.write_text('[robustbench_lab]\ndata_dir = d_ini\nruns_dir = r_ini\ndevice = cpu\neval_n = 11\n')
    for v in ('RBLAB_DATA', 'RBLAB_RUNS', 'RBLAB_DEVICE', 'RBLAB_EVAL_N'): monkeypatch.delenv(v, raising=False)
    s = settings(settings_file=ini)
    assert (s.data_dir, s.runs_dir, s.eval_n) == (tmp_path/'d_ini', tmp_path/'r_ini', 11)
    monkeypatch.setenv('RBLAB_DATA', str(tmp_path/'d_env'))
    monkeypatch.setenv('RBLAB_RUNS', str(tmp_path/'r_env'))
    s = settings(settings_file=ini)
    assert (s.data_dir, s.runs_dir) == (tmp_path/'d_env', tmp_path/'r_env') and s.source['data_dir'] == 'env RBLAB_DATA'
    s = settings(settings_file=ini, data_dir=tmp_path/'d_arg')
    assert s.data_dir == tmp_path/'d_arg' and s.runs_dir == tmp_path/'r_env'


def test_settings_file_search(tmp_path, monkeypatch):
    (tmp_path/'settings.ini').write_text('[robustbench_lab]\neval_n = 3\n')
    (tmp_path/'sub').mkdir()
    monkeypatch.chdir(tmp_path/'sub')
    monkeypatch.delenv('RBLAB_EVAL_N', raising=False)
    monkeypatch.delenv('RBLAB_SETTINGS', raising=False)
    assert settings().eval_n == 3
    monkeypatch.setenv('RBLAB_SETTINGS', str(tmp_path/'nope.ini'))
    with pytest.raises(ConfigError, match='RBLAB_SETTINGS'): settings()


def test_settings_rejects_unknown_keys(tmp_path):
    (tmp_path/'settings.ini').write_text('[robustbench_lab]\ndatadir = x\n')
    with pytest.raises(ConfigError, match='datadir'): settings(settings_file=tmp_path/'settings.ini')


def test_repo_settings_ini_is_read():
    s = settings(settings_file=REPO/'settings.ini')
    assert s.device == os.environ.get('RBLAB_DEVICE', 'auto') and s.eval_n >= 1


def test_papermill_parameters_tag_survives_nbdev_clean(tmp_path):
    import json, shutil
    nb = {'cells': [{'cell_type': 'code', 'execution_count': 3, 'id': 'a1', 'metadata': {'tags': ['parameters'], 'scrolled': True},
                     'outputs': [], 'source': ['epochs = 1']}],
          'metadata': {'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'}},
          'nbformat': 4, 'nbformat_minor': 5}
    (tmp_path/'nbs').mkdir()
    shutil.copy(REPO/'pyproject.toml', tmp_path/'pyproject.toml')
    (tmp_path/'nbs'/'p.ipynb').write_text(json.dumps(nb))
    subprocess.run([str(Path(sys.executable).parent/'nbdev-clean')], cwd=tmp_path, check=True)
    cell = json.loads((tmp_path/'nbs'/'p.ipynb').read_text())['cells'][0]
    assert cell['metadata'] == {'tags': ['parameters']} and cell['execution_count'] is None
