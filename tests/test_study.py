"""Studies: a spec expands into deterministically named runs, validated all before any runs; finished runs are skipped and
a killed one continues bit-identically; one writer per run folder (two trainings under one name, a lock left by a killed
process); the table's means, intervals and paired differences against hand computation; Markdown and LaTeX export; the
papermill study pipeline and rblab-study."""
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from robustbench_lab.core import ConfigError, FolderLock, RunLocked
from robustbench_lab.evaluate import Report
from robustbench_lab.learner import load_checkpoint
from robustbench_lab.study import Study, main as study_main, run_study
from robustbench_lab.train import train

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TINY = dict(dataset='digits', arch='small_cnn', width=8, n_train=384, epochs=2, batch_size=64, lr=0.05, n_eval=32, n_report=64,
            hider_n=32, steps=2)


def _train_1_thread(**params):
    "train() with one intra-op thread, as the study's jobs ran (threads=1): CPU results are bit-identical only at one thread count."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try: return train(**params)
    finally: torch.set_num_threads(n)


def _weights(run_dir):
    return load_checkpoint(Path(run_dir)/'checkpoints'/'last.pt')['model']


def _same(a, b):
    a, b = _weights(a), _weights(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_bad_cell_refuses_the_whole_study_and_nothing_is_created(tmp_path):
    spec = dict(name='s', base=TINY, seeds=[0, 1],
                cells=[dict(label='fine'), dict(label='unknown name', objective='pgdat', hfat_stepz=2),
                       dict(label='bad value', method='afa', afa_K=1), dict(label='fine too', objective='trades')])
    f = tmp_path/'s.yaml'
    f.write_text(yaml.safe_dump(spec))
    runs = tmp_path/'runs'
    with pytest.raises(ConfigError) as e: run_study(f, executor='debug', runs_dir=runs)
    msg = str(e.value)
    assert "2 bad cell(s), nothing was run" in msg and "'unknown name'" in msg and 'hfat_steps' in msg and "'bad value'" in msg and 'afa_K' in msg
    assert "'fine'" not in msg and "'fine too'" not in msg
    assert not runs.exists()
    for bad, says in [(dict(spec, cells=None, grid=dict(seed=[1, 2])), 'set by the study itself'),
                      (dict(spec, cells=None, zip=dict(lr=[0.1, 0.2], epochs=[1])), 'one length'),
                      (dict(spec, cells=None, seeds=[0, 0]), 'distinct'),
                      (dict(spec, cells=None, baseline='nope'), "'nope' is not a cell"),
                      (dict(spec, cells=None, evaluate=[dict(tag='x', suite='hfat', only=['PGD-7'])]), "the hfat suite's attacks are"),
                      (dict(spec, colls=[]), 'unknown key(s) colls'),
                      (dict(spec, name='a b'), 'study name')]:
        with pytest.raises(ConfigError, match=says.replace('(', r'\(').replace(')', r'\)')): Study(bad, runs_dir=runs)
    assert not runs.exists()


def test_run_names_are_a_function_of_the_spec(tmp_path):
    spec = dict(name='grid', base=TINY, cells=[dict(label='AT', objective='pgdat'), dict(objective='trades', trades_beta=3.0)],
                grid=dict(lr=[0.05, 0.1]), zip=dict(epochs=[1, 2], n_train=[128, 256]), seeds=[2, 0])
    names = [r.name for r in Study(spec, runs_dir=tmp_path, validate=False).runs]
    assert names == [r.name for r in Study(yaml.safe_load(yaml.safe_dump(spec)), runs_dir=tmp_path, validate=False).runs]
    assert len(names) == len(set(names)) == 2*2*2*2
    assert names[:3] == ['grid-AT-0.05-1-128-s2', 'grid-AT-0.05-2-256-s2', 'grid-AT-0.1-1-128-s2']
    assert 'grid-trades-3-0.1-2-256-s0' in names
    cells = Study(spec, runs_dir=tmp_path, validate=False).cells
    assert 'AT lr=0.05 epochs=1 n_train=128' in cells and 'objective=trades trades_beta=3 lr=0.1 epochs=2 n_train=256' in cells
    with pytest.raises(ConfigError, match='share a run name'):
        Study(dict(spec, grid=None, zip=None, cells=[dict(label='a b'), dict(label='a_b')]), runs_dir=tmp_path, validate=False)


def close(a, b): return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-4)  # accuracies pass through float32 means


def _report(path, clean, robust, **meta):
    n = len(clean)
    rep = Report(clean=torch.tensor(clean, dtype=torch.bool), robust={k: torch.tensor(v, dtype=torch.bool) for k, v in robust.items()},
                 seconds={'clean': 1.0, **{k: 2.0 for k in robust}}, attacks={k: dict(repr=k, kind='test', eps=0.1) for k in robust},
                 meta=dict(n=n, **meta))
    rep.save(path)


def _fake_run(runs, name, clean_hits, pgd_hits, aa_hits, hider):
    "A finished run folder with reports of known accuracies: clean and PGD on 10 points, AA on 5 points."
    d = runs/name
    d.mkdir(parents=True)
    _report(d/'report.json', [True]*clean_hits + [False]*(10 - clean_hits), {})
    r = Report.load(d/'report.json'); r.metrics['hider_ratio_adv'] = hider; r.save(d/'report.json')
    _report(d/'report_main.json', [True]*clean_hits + [False]*(10 - clean_hits), {'PGD': [True]*pgd_hits + [False]*(10 - pgd_hits)}, checkpoint='last',
            tag='main', evaluation=dict(suite='monitor', n=10, only=None, exclude=None, checkpoint='last'))
    _report(d/'report_aa.json', [True]*5, {'AA': [True]*aa_hits + [False]*(5 - aa_hits)}, checkpoint='last',
            tag='aa', evaluation=dict(suite='hfat', n=5, only=['AA'], exclude=None, checkpoint='last'))
    (d/'metrics.jsonl').write_text(''.join(json.dumps(dict(epoch=e, train_seconds=10.0, seconds=12.0, robust_acc=0.1*(e + s)))+'\n'
                                           for e, s in [(0, clean_hits), (1, clean_hits)]))


def test_table_means_intervals_and_paired_differences_match_hand_computation(tmp_path):
    runs = tmp_path/'runs'
    spec = dict(name='h', base=TINY, cells=[dict(label='A'), dict(label='B', objective='trades')], seeds=[0, 1, 2], baseline='A',
                evaluate=[dict(tag='main', suite='monitor', n=10), dict(tag='aa', suite='hfat', n=5, only=['AA'])])
    study = Study(spec, runs_dir=runs)
    for seed, (ca, pa, cb, pb) in enumerate([(5, 2, 7, 3), (6, 3, 7, 4), (7, 4, 9, 4)]):
        _fake_run(runs, f'h-A-s{seed}', ca, pa, 2, 0.1*seed)
        _fake_run(runs, f'h-B-s{seed}', cb, pb, 3, 0.2)
    assert study.status().state.eq('done').all()
    t = study.table().set_index(['cell', 'measure'])
    # A clean: 50, 60, 70 -> mean 60, sd 10; t(0.975, 2) = 4.302653 -> half-width 24.84138
    a = t.loc[('A', 'clean')]
    assert a['n'] == 3 and close(a['mean'], 60) and close(a['std'], 10) and close(a['ci_hi'] - a['mean'], 4.302653*10/math.sqrt(3))
    # B - A clean: 20, 10, 20 -> mean 16.667, sd 5.7735, t = 5; with 2 degrees of freedom p = 1 - t/sqrt(t^2 + 2)
    b = t.loc[('B', 'clean')]
    assert close(b['diff'], 50/3) and b['n_pairs'] == 3 and close(b['p'], 1 - 5/math.sqrt(27))
    assert close(b['diff_hi'] - b['diff'], 4.302653*(10/math.sqrt(3))/math.sqrt(3))
    # PGD: A 20, 30, 40; B 30, 40, 40 -> differences 10, 10, 0; the worst case over the first report equals PGD here
    assert close(t.loc[('B', 'PGD'), 'diff'], 20/3) and close(t.loc[('B', 'worst case'), 'mean'], 110/3)
    # AA on its own 5 points is shown with its n; identical differences (every seed +20) leave nothing to test: p undefined
    assert close(t.loc[('B', 'AA (n=5)'), 'diff'], 20) and math.isnan(t.loc[('B', 'AA (n=5)'), 'p']) and close(t.loc[('A', 'AA (n=5)'), 'mean'], 40)
    assert close(t.loc[('A', 'hider ratio'), 'mean'], 0.1)
    s = study.summary()
    assert s.loc['A', 'clean'] == '60.00 ± 24.84 (sd 10.00)' and s.loc['A', 'seeds'] == 3 and s.loc['A', 'eval n'] == 10 and s.loc['A', 'train s'] == 20
    d = study.differences()
    row = d[(d.cell == 'B') & (d.measure == 'clean')].iloc[0]
    assert row.difference == '+16.67' and row.p == f'{1 - 5/math.sqrt(27):.3f}' and bool(row.significant) and row.baseline == 'A'
    aa = d[(d.cell == 'B') & (d.measure == 'AA (n=5)')].iloc[0]
    assert aa.p == '' and not aa.significant
    # a per-cell baseline, and seeds missing on one side are not paired
    (runs/'h-A-s2'/'report_aa.json').unlink()
    t2 = study.table(baseline={'B': 'A'}).set_index(['cell', 'measure'])
    assert t2.loc[('B', 'clean'), 'n_pairs'] == 2 and 'diff' not in t2.loc[('A', 'clean')].dropna()
    md, tex = study.export(tmp_path/'out')
    text = md.read_text()
    assert '| A | 2 | 55.00 ± 63.53 (sd 7.07) |' in text and 'Paired differences against `A`' in text
    latex = tex.read_text()
    assert r'\begin{tabular}' in latex and r'55.00 $\pm$ 63.53 (sd 7.07)' in latex and r'95\% CI' in latex and 'AA (n=5)' in latex
    # a run missing a study report, or holding one made for another evaluation spec, is 'trained': the report is made again
    assert list(study.status().state) == ['done']*4 + ['trained', 'done']  # (seeds outermost: h-A-s2 is fifth)
    changed = Study(dict(spec, evaluate=[dict(tag='main', suite='monitor', n=8), spec['evaluate'][1]]), runs_dir=runs, validate=False)
    assert changed.status().state.eq('trained').all()


def _kill_at(tmp_path, params, step):
    "Train `params` in a fresh process that SIGKILLs itself after optimiser step `step` (a lost node, an OOM kill)."
    code = textwrap.dedent(f'''
        import os, signal
        from robustbench_lab.learner import Callback
        import robustbench_lab.train as T
        class Kill(Callback):
            order = 1
            def after_batch(self, learn):
                if learn.step == {step}: os.kill(os.getpid(), signal.SIGKILL)
        cbs = T._callbacks
        T._callbacks = lambda *a, **k: cbs(*a, **k) + [Kill()]
        T.train(**{params!r})
        ''')
    p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=300)
    assert p.returncode == -9, p.stderr[-2000:]


def test_local_study_skips_finished_runs_and_a_killed_run_continues_bit_identically(tmp_path):
    runs = tmp_path/'runs'
    spec = dict(name='loc', base={**TINY, 'epochs': 3, 'checkpoint_every': 4}, cells=[dict(label='AT', objective='pgdat')], seeds=[0, 1])
    study = Study(spec, runs_dir=runs)
    first, killed = study.runs
    _train_1_thread(**first.params, progress=False)
    _kill_at(tmp_path, {**killed.params, 'progress': False}, 10)  # killed during epoch 2, after the checkpoint at step 8
    assert FolderLock.holder(runs/killed.name) is None  # the kernel released the dead writer's lock
    assert list(study.status().state) == ['done', 'stopped']
    stamp = (runs/first.name/'report.json').stat().st_mtime_ns
    run_study(spec, executor='local', parallel=2, threads=1, runs_dir=runs, progress=False)
    assert list(study.status().state) == ['done', 'done']
    assert (runs/first.name/'report.json').stat().st_mtime_ns == stamp  # skipped, not trained or evaluated again
    ref = _train_1_thread(**{**killed.params, 'run_name': 'reference'}, progress=False)
    assert _same(ref.dir, runs/killed.name)
    assert (runs/'studies'/'loc'/'jobs').is_dir()


def test_two_trainings_under_one_name_one_writes_the_other_is_refused_naming_it(tmp_path):
    args = [sys.executable, '-m', 'robustbench_lab.train'] + [a for k, v in {**TINY, 'epochs': 6, 'run_name': 'same', 'runs_dir': str(tmp_path),
                                                                              'progress': False}.items() for a in (f'--{k}', str(v))]
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    procs = [subprocess.Popen(args + ['--seed', str(s)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], outs
    loser = next(err for p, (out, err) in zip(procs, outs) if p.returncode == 1)
    winner_seed = next(s for s, p in zip((0, 1), procs) if p.returncode == 0)
    assert 'another process is writing this run folder: pid' in loser and ' on host ' in loser and ' since ' in loser
    cfg = json.loads((tmp_path/'same'/'config.json').read_text())
    assert cfg['run']['seed'] == winner_seed == load_checkpoint(tmp_path/'same'/'checkpoints'/'last.pt')['config']['run']['seed']
    assert not (tmp_path/'.same.lock').exists()


def test_a_lock_left_by_a_killed_writer_is_taken_over_with_a_warning(tmp_path):
    params = {**TINY, 'epochs': 2, 'checkpoint_every': 3, 'run_name': 'left', 'runs_dir': str(tmp_path), 'progress': False}
    _kill_at(tmp_path, params, 4)
    left = json.loads((tmp_path/'.left.lock').read_text())
    with pytest.warns(UserWarning, match=f"taking over the lock left by pid {left['pid']}"):
        run = train(**params, resume=True)
    assert len(run.metrics) == 2 and not (tmp_path/'.left.lock').exists()
    with FolderLock(tmp_path/'left'):
        with pytest.raises(RunLocked, match=f'pid {os.getpid()}'): train(**params, resume=True)
        with pytest.raises(RunLocked): train(**{**params, 'nproc': 2}, resume=True)  # refused before any worker starts


def test_study_pipeline_notebook_and_cli(tmp_path):
    spec = dict(name='nb', base={**TINY, 'epochs': 1, 'n_train': 192}, grid=dict(objective=['pgdat', 'trades']), seeds=[0], baseline='objective=pgdat')
    f = tmp_path/'nb.yaml'
    f.write_text(yaml.safe_dump(spec))
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'RBLAB_RUNS': str(tmp_path/'runs')}
    assert subprocess.run([str(BIN/'rblab-study'), 'nb', '--status'], env=env, capture_output=True, text=True).returncode == 1  # never run
    out = tmp_path/'out.ipynb'
    p = subprocess.run([str(BIN/'papermill'), str(REPO/'nbs'/'study.ipynb'), str(out), '-p', 'spec', str(f), '-p', 'export', str(tmp_path/'tables'),
                        '--cwd', str(REPO/'nbs')], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert '± ' in (tmp_path/'tables'/'nb.md').read_text()
    st = subprocess.run([str(BIN/'rblab-study'), 'nb', '--status'], env=env, capture_output=True, text=True)
    assert st.returncode == 0 and st.stdout.count(' done ') == 2, st.stdout + st.stderr
    no_data = {k: v for k, v in env.items() if k != 'RBLAB_DATA'}  # --status reads run folders only
    st = subprocess.run([str(BIN/'rblab-study'), 'nb', '--status'], env=no_data, capture_output=True, text=True, cwd=tmp_path)
    assert st.returncode == 0 and st.stdout.count(' done ') == 2, st.stdout + st.stderr
    bad = tmp_path/'bad.yaml'
    bad.write_text(yaml.safe_dump(dict(spec, name='bad', base={**TINY, 'lr': -1})))
    p = subprocess.run([str(BIN/'papermill'), str(REPO/'nbs'/'study.ipynb'), str(tmp_path/'bad.ipynb'), '-p', 'spec', str(bad),
                        '--cwd', str(REPO/'nbs')], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and 'lr' in p.stderr and not (tmp_path/'runs'/'studies'/'bad').exists()


def test_sigterm_stops_a_local_study_at_a_checkpointed_step_and_a_rerun_finishes_it(tmp_path):
    spec = dict(name='stop', base={**TINY, 'epochs': 6, 'n_train': 768}, cells=[dict(label='AT', objective='pgdat')], seeds=[0, 1])
    f = tmp_path/'stop.yaml'
    f.write_text(yaml.safe_dump(spec))
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'RBLAB_RUNS': str(tmp_path/'runs')}
    p = subprocess.Popen([str(BIN/'rblab-study'), str(f), '--parallel', '1', '--threads', '1'], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    first = tmp_path/'runs'/'stop-AT-s0'
    t0 = time.time()
    while time.time() - t0 < 120 and not ((first/'metrics.jsonl').exists() and (first/'metrics.jsonl').read_text().count('\n') >= 1):
        time.sleep(0.2)
    p.send_signal(15)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 75, err[-2000:]
    assert 'stopped on SIGTERM' in err
    records = [json.loads(l) for l in (first/'metrics.jsonl').read_text().splitlines()]
    assert records[-1].get('interrupted') and records[-1]['signal'] == 'SIGTERM'  # passed on to the run, which checkpointed
    study = Study(spec, runs_dir=tmp_path/'runs')
    assert list(study.status().state) == ['stopped', 'pending']  # no run started after the signal
    assert subprocess.run([str(BIN/'rblab-study'), str(f)], env=env, capture_output=True, text=True, timeout=600).returncode == 0
    assert list(study.status().state) == ['done', 'done']
    ref = _train_1_thread(**{**study.runs[0].params, 'run_name': 'reference', 'runs_dir': str(tmp_path/'ref')}, progress=False)
    assert _same(ref.dir, first)


def test_a_failed_run_keeps_only_the_runs_that_read_it_from_starting_and_rerun_failed_runs_both(tmp_path, monkeypatch):
    import robustbench_lab.study as S
    runs = tmp_path/'runs'
    spec = dict(name='dep', base=dict(TINY, epochs=1, method='afa', afa_K=2), seeds=[0, 1],
                cells=[dict(label='Stage I', afa_stage=1), dict(label='Stage II', afa_stage=2, afa_from='{cell:Stage I}')])
    real, calls = S.train, []
    def train_failing_s0_stage1(**p):
        calls.append(p['run_name'])
        if p['run_name'] == 'dep-Stage_I-s0': raise RuntimeError('out of memory (simulated)')
        return real(**p)
    monkeypatch.setattr(S, 'train', train_failing_s0_stage1)
    study = run_study(spec, executor='debug', runs_dir=runs, progress=False)
    st = study.status().set_index('run')
    assert calls == ['dep-Stage_I-s0', 'dep-Stage_I-s1', 'dep-Stage_II-s1']  # seed 0's Stage II never started; seed 1 went on
    assert st.loc['dep-Stage_I-s0', 'state'] == 'failed' and 'out of memory' in st.loc['dep-Stage_I-s0', 'error']
    assert st.loc['dep-Stage_II-s0', 'state'] == 'failed' and 'dep-Stage_I-s0 (failed)' in st.loc['dep-Stage_II-s0', 'error']
    assert not (runs/'dep-Stage_II-s0').exists() and st.loc['dep-Stage_II-s1', 'state'] == 'done'
    calls.clear(); run_study(spec, executor='debug', runs_dir=runs, progress=False)
    assert calls == []  # failed runs stay failed until asked
    monkeypatch.setattr(S, 'train', real)
    assert run_study(spec, executor='debug', runs_dir=runs, progress=False, rerun_failed=True).status().state.eq('done').all()


def test_a_second_study_process_adds_a_worker_and_a_run_waits_for_its_input_trained_by_the_other(tmp_path):
    runs = tmp_path/'runs'
    spec = dict(name='two', base=dict(TINY, epochs=2, method='afa', afa_K=2), seeds=[0],
                cells=[dict(label='Stage I', afa_stage=1), dict(label='Stage II', afa_stage=2, afa_from='{cell:Stage I}')])
    study = Study(spec, runs_dir=runs)
    first = study.runs[0].params
    args = [sys.executable, '-m', 'robustbench_lab.train'] + [a for k, v in {**first, 'progress': False}.items() for a in (f'--{k}', str(v))]
    other = subprocess.Popen(args, env={**os.environ, 'OMP_NUM_THREADS': '1'}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while FolderLock.holder(runs/'two-Stage_I-s0') is None and other.poll() is None and time.time() - t0 < 60: time.sleep(0.05)
    assert other.poll() is None, other.communicate()  # the other process trains Stage I
    run_study(spec, executor='debug', runs_dir=runs, progress=False)  # Stage II waits for it, then runs here
    assert other.wait(timeout=300) == 0
    st = study.status()
    assert list(st.state) == ['done', 'done'], st.to_string()
    assert (runs/'two-Stage_II-s0'/'config.json').stat().st_mtime >= (runs/'two-Stage_I-s0'/'report.json').stat().st_mtime
