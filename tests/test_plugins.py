"""The open workbench: a researcher's own objective and method (tests/plugins/my_ideas.py) train through train(), papermill,
nproc=2 and torchrun; their bad values and misspelt names are refused before any compute in their own words; an entry-point
plug-in is found; runs made with a plug-in resume, and refuse clearly when it is missing; a run folder written by the version
before the registries loads, evaluates and resumes; every preset and every pipeline name resolves."""
import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from robustbench_lab.core import ConfigError
from robustbench_lab.evaluate import evaluate
from robustbench_lab.learner import load_checkpoint
from robustbench_lab.methods import METHODS, Method, register_method
from robustbench_lab.objectives import OBJECTIVES, PGDAT, register_objective
from robustbench_lab.registry import PRESETS, declared_params, import_plugins
from robustbench_lab.runs import RUN_SETTINGS, known_names, preset_values
from robustbench_lab.train import Run, check_pipeline_names, parameters_cell, pipeline_names, resolve_config, train

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO/'tests'/'plugins'/'my_ideas.py'
FIXTURE = REPO/'tests'/'fixtures'/'v1-hfat-trades'
BIN = Path(sys.executable).parent
TINY = dict(dataset='digits', arch='small_cnn', width=8, epochs=1, n_train=256, batch_size=64, n_eval=32, n_report=32, hider_n=32,
            steps=2, progress=False)
MINE = dict(plugins=[str(PLUGIN)], method='mixgrad', objective='pgdat_ls', mixgrad_w=0.3, pgdat_ls_smoothing=0.2)


def _weights(run_dir):
    return load_checkpoint(Path(run_dir)/'checkpoints'/'last.pt')['model']


def _run(code, tmp_path, env=None, timeout=300):
    script = tmp_path/'script.py'
    script.write_text(textwrap.dedent(code))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
                          env={**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})})


def test_a_plugin_method_trains_and_its_settings_are_recorded_by_component(tmp_path):
    run = train(run_name='mine', runs_dir=str(tmp_path), **TINY, **MINE)
    stored = json.loads((run.dir/'config.json').read_text())
    assert stored['plugins'] == [str(PLUGIN)]
    assert stored['method'] == dict(name='mixgrad', cls='my_ideas.MixGrad', settings=dict(mixgrad_w=0.3), derived=[], uses={})
    assert stored['objective']['settings']['pgdat_ls_smoothing'] == 0.2 and stored['objective']['cls'] == 'my_ideas.LabelSmoothedPGDAT'
    assert not any(k.startswith(('hfat_', 'dynat_', 'afa_', 'f2at_')) for k in stored['run'])  # only the run's components
    steps = [json.loads(l) for l in (run.dir/'steps.jsonl').read_text().splitlines()]
    assert {'clean_ce', 'adv_loss'} <= set(steps[0])  # the plug-in's own step logs
    # the values reached the classes: the objective's loss is the label-smoothed CE
    obj = run_method = None
    from robustbench_lab.train import build_method
    m = build_method(run.config)
    assert m.w == 0.3 and m.objective.smoothing == 0.2 and type(m.objective).__name__ == 'LabelSmoothedPGDAT'


def test_plugin_values_and_names_are_refused_before_any_compute_in_their_own_words(tmp_path):
    bad = [(dict(mixgrad_w=1.5), r'mixgrad_w = 1\.5 \(float\): expected a number >= 0 and <= 1'),
           (dict(pgdat_ls_smoothing='lots'), r"pgdat_ls_smoothing = 'lots' \(str\): expected a number \(LabelSmoothedPGDAT.smoothing: label smoothing"),
           (dict(mixgrad_ww=0.3), r"unknown parameter 'mixgrad_ww' \(did you mean 'mixgrad_w'\?\)"),
           (dict(method='mixgrd'), r"method = 'mixgrd': expected one of .*mixgrad.* \(did you mean 'mixgrad'\?\)")]
    for change, msg in bad:
        with pytest.raises(ConfigError, match=msg): train(run_name='bad', runs_dir=str(tmp_path), **TINY, **{**MINE, **change})
    assert not any(tmp_path.iterdir())
    # a setting of a method the run does not use does nothing, and says so
    with pytest.warns(UserWarning, match=r"this run uses method 'standard' and objective 'pgdat_ls', which ignore mixgrad_w = 0\.3 \(of method 'mixgrad'\)"):
        resolve_config(**{**MINE, 'method': 'standard'})
    with pytest.raises(ConfigError, match=r"plugins: .*no_such\.py.*: no such file"): resolve_config(plugins=['no_such.py'])


def test_declarations_are_inherited_and_capabilities_decide_pairings(tmp_path):
    import_plugins([str(PLUGIN)])
    ls = declared_params(OBJECTIVES['pgdat_ls'], 'pgdat_ls')
    assert [p.flat for p in ls.values()][:5] == ['pgdat_ls_smoothing', 'eps', 'alpha', 'steps', 'bn_mode']  # PGD-AT's, through **kw
    # a PGD-AT variant is a label loss (its declarations are PGD-AT's): DYNAT takes it; MART is not, and the error names both
    assert resolve_config(method='dynat', objective='pgdat_ls', plugins=[str(PLUGIN)])['pgdat_ls_init'] == 'normal'  # DYNAT's recipe
    with pytest.raises(ConfigError, match=r"objective = 'mart': method 'dynat' \(DYNAT\) needs an objective that offers 'label_attack'.*"
                                          r"Objectives that do: .*pgdat_ls"):
        resolve_config(method='dynat', objective='mart')
    # AWP's defaults follow the declared capability, not the class: a subclass that declares no 'at_awp' gets TRADES-AWP's
    from robustbench_lab.methods import AWP
    class NotAT(PGDAT): capabilities = frozenset({'label_loss'})
    assert AWP(PGDAT()).gamma == 0.01 and AWP(NotAT()).gamma == 0.005 and AWP(NotAT()).bn_mode == 'eval'


def test_re_registering_a_name_replaces_it_with_a_warning():
    @register_method('rereg_demo')
    class A(Method):
        def compute_grads(self, model, x, y, backward): pass
    with pytest.warns(UserWarning, match=r"method 'rereg_demo': .*A is replaced by .*A"):
        @register_method('rereg_demo')
        class A(Method):  # the same cell run again
            def compute_grads(self, model, x, y, backward): pass
    assert METHODS['rereg_demo'] is A
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        register_method('rereg_demo')(A)  # the same class again: nothing to say
    with pytest.raises(ConfigError, match='not a subclass of Method'): register_method('x')(int)


def test_a_plugin_reaches_papermill_kernels(tmp_path):
    out = subprocess.run([str(BIN/'rblab-run'), str(REPO/'nbs'/'train.ipynb'), '-p', 'plugins', str(PLUGIN), '-p', 'method', 'mixgrad',
                          '-p', 'objective', 'pgdat_ls', '-p', 'mixgrad_w', '0.7', '-p', 'runs_dir', str(tmp_path/'runs'),
                          '-p', 'run_name', 'pm', *[a for k, v in TINY.items() for a in ('-p', k, str(v))]],
                         capture_output=True, text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert out.returncode == 0, (out.stdout + out.stderr)[-2000:]
    assert Run.load(tmp_path/'runs'/'pm').config['mixgrad_w'] == 0.7
    # and its misspelt settings are refused before a kernel starts
    out = subprocess.run([str(BIN/'rblab-run'), str(REPO/'nbs'/'train.ipynb'), '-p', 'plugins', str(PLUGIN), '-p', 'mixgrad_v', '1',
                          '-p', 'runs_dir', str(tmp_path/'runs2')], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "did you mean 'mixgrad_w'" in out.stderr and not (tmp_path/'runs2').exists()


def test_a_plugin_and_a_notebook_defined_method_reach_nproc_workers(tmp_path):
    "Two processes train the single-process computation, with the plug-in file and with a class defined in `__main__`."
    one = train(run_name='one', runs_dir=str(tmp_path), **TINY, **MINE)
    two = train(run_name='two', runs_dir=str(tmp_path), nproc=2, sync_bn=True, **TINY, **MINE)
    for k, v in _weights(one.dir).items():
        if v.is_floating_point(): assert torch.allclose(v, _weights(two.dir)[k], rtol=0, atol=1e-5), k
    # a class of the launching script's own (module __main__, as in a notebook cell) travels to the workers by value
    out = _run(f'''
        from __future__ import annotations  # hints as strings: the workers get the class with its hints evaluated
        from typing import Literal
        import torch.nn.functional as F
        from robustbench_lab.methods import Method, register_method
        from robustbench_lab.registry import register_preset
        from robustbench_lab.train import train

        @register_method('cellgrad')
        class CellGrad(Method):
            def __init__(self, objective, scale:float=1.0, # scales the loss
                         how:Literal['plain', 'twice']='plain'):
                super().__init__(objective); self.scale = scale
            def compute_grads(self, model, x, y, backward):
                x_adv = self.perturb(model, x, y); model.train()
                loss, logs = self.objective.loss(model, x, x_adv, y); backward(self.scale*loss); return logs

        register_preset('cell-recipe', dict(method='cellgrad', cellgrad_how='twice'))  # a recipe of this session too

        if __name__ == '__main__':
            run = train(preset='cell-recipe', cellgrad_scale=0.5, nproc=2, run_name='cell', runs_dir={str(tmp_path)!r}, **{TINY!r})
            print('OK', run.config['cellgrad_scale'], run.config['cellgrad_how'])
        ''', tmp_path)
    assert out.returncode == 0 and 'OK 0.5 twice' in out.stdout, (out.stdout + out.stderr)[-2000:]


def test_a_plugin_runs_under_torchrun(tmp_path):
    args = [a for k, v in {**TINY, 'plugins': str(PLUGIN), 'method': 'mixgrad', 'objective': 'pgdat_ls', 'mixgrad_w': 0.3,
                           'run_name': 'tr', 'runs_dir': str(tmp_path)}.items() for a in (f'--{k}', str(v))]
    out = subprocess.run([str(BIN/'torchrun'), '--standalone', '--nproc_per_node', '2', '-m', 'robustbench_lab.train', *args],
                         capture_output=True, text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert out.returncode == 0, (out.stdout + out.stderr)[-2000:]
    run = Run.load(tmp_path/'tr')
    assert run.config['nproc'] == 2 and run.config['mixgrad_w'] == 0.3 and run.report is not None


def test_an_entry_point_plugin_is_found(tmp_path):
    (tmp_path/'rblab_ep_demo').mkdir()
    (tmp_path/'rblab_ep_demo'/'__init__.py').write_text(textwrap.dedent('''
        from robustbench_lab.methods import register_method
        from robustbench_lab.methods import Standard

        @register_method('epdemo')
        class EPDemo(Standard):
            def __init__(self, objective, k:int=2, # how many
                         **kw): super().__init__(objective, **kw); self.k = k
        '''))
    info = tmp_path/'rblab_ep_demo-0.1.dist-info'
    info.mkdir()
    (info/'METADATA').write_text('Metadata-Version: 2.1\nName: rblab-ep-demo\nVersion: 0.1\n')
    (info/'entry_points.txt').write_text('[robustbench_lab.plugins]\ndemo = rblab_ep_demo\n')
    out = _run('''
        from robustbench_lab.runs import resolve_config
        c = resolve_config(method='epdemo', epdemo_k=3)
        print('OK', c['epdemo_k'], c['epdemo_eval_first_batch'])
        ''', tmp_path, env={'PYTHONPATH': str(tmp_path)})
    assert out.returncode == 0 and 'OK 3 False' in out.stdout, (out.stdout + out.stderr)[-2000:]


@pytest.mark.filterwarnings('ignore:.* is replaced by')  # the copied plug-in registers the test plug-in's names again
def test_a_plugin_run_resumes_in_a_new_process_and_is_refused_clearly_without_its_plugin(tmp_path):
    plugin = tmp_path/'ideas'/'my_ideas.py'
    plugin.parent.mkdir()
    shutil.copy(PLUGIN, plugin)
    params = dict(TINY, epochs=2, plugins=[str(plugin)], method='mixgrad', objective='pgdat_ls', mixgrad_w=0.3,
                  run_name='mine', runs_dir=str(tmp_path/'runs'))
    first = _run(f'''
        from robustbench_lab.learner import Callback
        import robustbench_lab.train as T
        class Stop(Callback):
            order = 1000
            def after_record(self, learn):
                if learn.epoch == 1: raise SystemExit(3)
        cbs = T._callbacks
        T._callbacks = lambda *a, **k: cbs(*a, **k) + [Stop()]
        T.train(**{params!r})
        ''', tmp_path)
    assert first.returncode == 3 and not (tmp_path/'runs'/'mine'/'report.json').exists(), first.stderr[-2000:]
    # a new process, no plugins argument: the recorded plug-in is imported, and the run continues to the computation of one go
    resumed = _run(f'''
        from robustbench_lab.train import train
        p = {params!r}; p.pop('plugins')
        print('OK', train(resume=True, **p).metrics[-1]['epoch'])
        ''', tmp_path)
    assert resumed.returncode == 0 and 'OK 1' in resumed.stdout, (resumed.stdout + resumed.stderr)[-2000:]
    ref = _run(f'from robustbench_lab.train import train; train(**{dict(params, run_name="ref")!r})', tmp_path)  # the same threads
    assert ref.returncode == 0, ref.stderr[-2000:]
    a, b = _weights(tmp_path/'runs'/'ref'), _weights(tmp_path/'runs'/'mine')
    assert all(torch.equal(a[k], b[k]) for k in a)
    plugin.rename(tmp_path/'moved.py')
    gone = _run(f'''
        from robustbench_lab.train import Run
        Run.load({str(tmp_path/'runs'/'mine')!r}).model()
        ''', tmp_path)
    assert gone.returncode != 0 and f"plugins: {str(plugin)!r}: no such file" in gone.stderr, gone.stderr[-2000:]


def test_a_run_folder_of_the_version_before_the_registries_loads_evaluates_and_resumes(tmp_path):
    "tests/fixtures/v1-hfat-trades: made by main at b633cdc (HFAT around TRADES on digits, stopped after epoch 1 of 2)."
    raw = json.loads((FIXTURE/'config.json').read_text())
    assert set(raw) <= known_names()  # every name of that version's config (all 115) still works
    old = Run.load(FIXTURE)
    assert old.config['hfat_steps_s'] == 2 and old.config['beta'] == 3.0 and 'f2at_K' not in old.config
    x, y = __import__('robustbench_lab.data', fromlist=['load_arrays']).load_arrays('digits', 'test')
    rep = evaluate(old.model(), x, y, 'monitor', n=32, eps=old.config['eps'])
    assert 0 <= rep.robust_accuracy['PGD-20'] <= rep.clean_accuracy <= 1
    shutil.copytree(FIXTURE, tmp_path/'v1-hfat-trades')
    params = dict(method='hfat', objective='trades', dataset='digits', arch='small_cnn', width=8, epochs=2, batch_size=64, n_train=256,
                  n_eval=32, n_report=32, hider_n=32, hfat_steps_s=2, steps=2, beta=3.0, lr=0.05, seed=3, progress=False,
                  runs_dir=str(tmp_path))
    n = torch.get_num_threads(); torch.set_num_threads(2)  # the fixture's epoch was trained at 2 threads: CPU bits depend on the count
    try:
        resumed = train(run_name='v1-hfat-trades', resume=True, **params)
        fresh = train(run_name='fresh', **params)
    finally: torch.set_num_threads(n)
    a, b = _weights(fresh.dir), _weights(resumed.dir)
    assert [m['epoch'] for m in resumed.metrics] == [0, 1] and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match=r'different settings \(hfat_steps_s\)'):
        train(run_name='v1-hfat-trades', resume=True, **{**params, 'hfat_steps_s': 3})


def test_every_preset_is_valid_against_the_schema_and_explicit_values_win():
    known = known_names()
    for name, preset in PRESETS.items():
        keys = set(preset) - {'variants'} | {k for c, o in preset.get('variants', ()) for k in (*c, *o)}
        assert keys <= known, (name, keys - known)
        c = resolve_config(preset=name, dataset='digits', arch='small_cnn', **({'natural_arch': None} if name == 'lbgat-code' else {}),
                           **({'guide_arch': None} if name.startswith('dynat') else {}))
        for k, v in preset.items():
            if k in ('variants', 'dataset', 'arch', 'natural_arch', 'guide_arch', 'n_eval'): continue
            assert json.dumps(c[k]) == json.dumps(v), (name, k, c[k], v)
    # an explicit value wins over the preset, a run setting's default and a component's default alike
    assert resolve_config(preset='mart-code', dataset='digits', arch='small_cnn', lr=0.1, beta=6.0)[('lr')] == 0.1
    assert resolve_config(preset='mart-code', dataset='digits', arch='small_cnn', beta=None)['beta'] == 6.0  # None: MART's own
    assert resolve_config(preset='trades-awp-code', dataset='digits', arch='small_cnn', awp_warmup=None)['awp_warmup'] is None
    assert preset_values(dict(preset='afa-paper', method='afa', afa_stage=2))['epochs'] == 20
    assert preset_values(dict(preset='afa-paper', method='afa'))['epochs'] == 100


def test_every_pipeline_name_resolves_to_a_train_parameter():
    for nb in sorted((REPO/'nbs').glob('train*.ipynb')):
        cells = json.loads(nb.read_text())['cells']
        values = parameters_cell(nb)
        spec = {}
        for c in cells:
            for node in ast.parse(''.join(c['source'])).body if c['cell_type'] == 'code' and 'PIPELINE =' in ''.join(c['source']) else []:
                if isinstance(node, ast.Assign) and getattr(node.targets[0], 'id', None) == 'PIPELINE': spec = eval(compile(ast.Expression(node.value), nb.name, 'eval'))
        assert spec or nb.stem == 'train', nb.name
        names = check_pipeline_names(values, pipeline_names(values, spec.get('method'), spec.get('aliases')), spec.get('own', ()))
        assert all(t in known_names() for t in names.values()), nb.name
        if spec.get('method'): assert any(t.startswith(f"{spec['method']}_") for t in names.values()), nb.name


def test_what_a_recipe_chose_is_recorded_as_derived_and_chosen_again_where_a_configuration_is_reused(tmp_path):
    from robustbench_lab.runs import flat_config, group_config
    c = resolve_config(preset='dynat-code', dataset='digits', arch='small_cnn', guide_arch=None)
    assert c['pgdat_init'] == 'normal' and {'pgdat_init', 'pgdat_clip_start', 'dynat_guide_bn_updates'} <= c.derived
    stored = group_config(c)
    assert 'pgdat_init' in stored['objective']['derived'] and 'dynat_inner' not in stored['method']['derived']  # the preset's
    again = flat_config(stored, derived=False)  # what to pass to train() for this run again (as torchrun does from config.json)
    assert 'pgdat_init' not in again and again['dynat_inner'] == 'dynamic'
    other = resolve_config(**{**again, 'method': 'standard', 'code_forwards': False, 'clip_start': True, 'preset': None,
                              'dynat_inner': None, 'guide_arch': None})
    assert other['pgdat_init'] == 'uniform' and other['pgdat_clip_start']  # derived again, for PGD-AT alone
    assert resolve_config(**c.given()) == c


def test_registered_names_that_would_collide_with_run_settings_are_refused_and_lbgat_takes_trades():
    @register_method('weight')
    class Weight(Method):
        def __init__(self, objective, decay:float=0.1): super().__init__(objective)  # weight_decay is the optimiser's
        def compute_grads(self, model, x, y, backward): pass
    with pytest.raises(ConfigError, match=r"method 'weight' \(Weight\): its parameter 'decay' would be train\(\)'s run setting 'weight_decay'"):
        resolve_config(method='weight')
    assert resolve_config(method='lbgat', objective='trades')['objective'] is None


def test_a_component_of_a_normally_imported_module_is_recorded_as_a_plugin(tmp_path):
    (tmp_path/'lab_ideas.py').write_text(PLUGIN.read_text().replace("'pgdat_ls'", "'pgdat_ls2'").replace("'mixgrad'", "'mixgrad2'"))
    out = _run(f'''
        import sys; sys.path.insert(0, {str(tmp_path)!r})
        import lab_ideas  # imported as a module, not through plugins=
        from robustbench_lab.runs import resolve_config
        print('OK', resolve_config(method='mixgrad2')['plugins'])
        ''', tmp_path)
    assert out.returncode == 0 and f"OK [{str(tmp_path/'lab_ideas.py')!r}]" in out.stdout, (out.stdout + out.stderr)[-2000:]
