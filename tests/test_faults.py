"""Faults on a shared cluster lose no work and say what happened: a preemption signal (SIGTERM, SIGUSR1) or a notebook's
stop button (SIGINT) ends a run at a checkpointed step with exit status 75, from which it resumes bit-identically (one
and two processes); a second signal abandons the checkpoint being written, whole; a damaged last.pt falls back to
prev.pt; damaged or torn run files are named with what to do; a full disk is an error naming the file and the free space,
with the last good checkpoint kept and no temporary file left; Run.verify and rblab-run --verify say what is damaged."""
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from robustbench_lab.core import EXIT_INTERRUPTED, RunFileError, RunInterrupted, WriteFailed
from robustbench_lab.learner import Callback, load_checkpoint
from robustbench_lab.runs import Run, restore_config
import robustbench_lab.train as T

BIN = Path(sys.executable).parent
TINY = dict(dataset='digits', arch='small_cnn', width=8, epochs=2, n_train=512, batch_size=64, n_eval=32, n_report=32, hider_n=32,
            steps=2, progress=False)


def _weights(run_dir):
    return load_checkpoint(Path(run_dir)/'checkpoints'/'last.pt')['model']


def _same(a, b):
    a, b = _weights(a), _weights(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Signal(Callback):
    "Sends this process `sig` after optimiser step `at`: a signal arriving mid-epoch, as a scheduler's or a stop button's."
    order = 1
    def __init__(self, at, sig): self.at, self.sig = at, sig
    def after_batch(self, learn):
        if learn.step == self.at: os.kill(os.getpid(), self.sig)


def _with(cb, fn):
    "Run `fn()` with `cb` among the callbacks of every training run."
    cbs = T._callbacks
    T._callbacks = lambda *a, **k: cbs(*a, **k) + [cb]
    try: return fn()
    finally: T._callbacks = cbs


def _script(tmp_path, code, env=None, timeout=300):
    p = tmp_path/f'script{time.monotonic_ns()}.py'
    p.write_text(textwrap.dedent(code))
    return subprocess.run([sys.executable, str(p)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})})


@pytest.mark.parametrize('sig', ['SIGTERM', 'SIGUSR1'])
def test_a_preemption_signal_ends_the_run_at_a_checkpointed_step_with_status_75_and_it_resumes_bit_identically(tmp_path, sig):
    runs = str(tmp_path/'runs')
    args = ' '.join(f'--{k} {v}' for k, v in {**TINY, 'runs_dir': runs}.items())
    stopped = _script(tmp_path, f'''
        import os, signal, sys
        from robustbench_lab.learner import Callback
        import robustbench_lab.train as T
        class Signal(Callback):
            order = 1
            def after_batch(self, learn):
                if learn.step == 5: os.kill(os.getpid(), signal.{sig})
        cbs = T._callbacks
        T._callbacks = lambda *a, **k: cbs(*a, **k) + [Signal()]
        sys.exit(T.cli_train({(args + ' --run_name cut').split()!r}))
        ''')
    assert stopped.returncode == EXIT_INTERRUPTED, stopped.stderr[-2000:]
    assert f'stopped on {sig} after step 6' in stopped.stderr
    run = tmp_path/'runs'/'cut'
    record = json.loads((run/'metrics.jsonl').read_text().splitlines()[-1])
    ck = load_checkpoint(run/'checkpoints'/'last.pt')
    assert record['interrupted'] and record['signal'] == sig and (record['epoch'], record['batch'], record['step']) == (0, 6, 6)
    assert (ck['epoch'], ck['batch'], ck['step']) == (0, 6, 6) and not (run/'report.json').exists()
    # the resume (a new process, as a requeued job) and a run of one go compute the same weights
    for name, extra in (('cut', ' --resume True'), ('whole', '')):
        out = _script(tmp_path, f'''
            import sys
            from robustbench_lab.train import cli_train
            sys.exit(cli_train({(args + f' --run_name {name}' + extra).split()!r}))
            ''')
        assert out.returncode == 0, out.stderr[-2000:]
    assert _same(run, tmp_path/'runs'/'whole')
    assert json.loads((run/'report.json').read_text())['meta']['interruptions'][0]['signal'] == sig


def _children(pid):
    "Process ids whose parent is `pid` (from /proc)."
    out = []
    for d in Path('/proc').iterdir():
        if d.name.isdigit():
            try:
                if int((d/'stat').read_text().rsplit(')', 1)[1].split()[1]) == pid: out.append(int(d.name))
            except (OSError, IndexError, ValueError): pass
    return out


@pytest.mark.parametrize('target', ['torchrun', 'workers'])
def test_two_processes_stop_at_the_same_step_and_resume_bit_identically(tmp_path, target):
    "SIGTERM to torchrun (which passes it on), or SIGUSR1 to each worker as Slurm signals a job step's processes."
    runs = tmp_path/'runs'
    params = {**TINY, 'epochs': 3, 'n_train': 1024, 'batch_size': 32, 'runs_dir': str(runs)}
    def torchrun(name, *extra):
        argv = [a for k, v in {**params, 'run_name': name}.items() for a in (f'--{k}', str(v))] + list(extra)
        return subprocess.Popen([str(BIN/'torchrun'), '--standalone', '--nproc_per_node', '2', '-m', 'robustbench_lab.train', *argv],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    agent = torchrun('cut')
    steps = runs/'cut'/'steps.jsonl'
    deadline = time.monotonic() + 120
    while (not steps.exists() or len(steps.read_text().splitlines()) < 40) and time.monotonic() < deadline: time.sleep(0.02)
    if target == 'torchrun': agent.send_signal(signal.SIGTERM)
    else:
        for pid in _children(agent.pid): os.kill(pid, signal.SIGUSR1)
    out, err = agent.communicate(timeout=120)
    assert agent.returncode != 0 and 'stopped on' in out + err, (out + err)[-3000:]
    record = json.loads((runs/'cut'/'metrics.jsonl').read_text().splitlines()[-1])
    ck = load_checkpoint(runs/'cut'/'checkpoints'/'last.pt')
    assert record['interrupted'] and ck['step'] == record['step'] and 40 <= ck['step'] < 96, (record, ck['step'])
    for p, name in ((torchrun('cut', '--resume', 'True'), 'cut'), (torchrun('whole'), 'whole')):
        o, e = p.communicate(timeout=300)
        assert p.returncode == 0, (o + e)[-3000:]
    assert _same(runs/'cut', runs/'whole')


def test_the_stop_button_of_a_notebook_ends_the_cell_at_a_checkpointed_step(tmp_path):
    "SIGINT in the process that trains (a kernel's interrupt): RunInterrupted, a KeyboardInterrupt, after checkpointing the step."
    p = dict(TINY, runs_dir=str(tmp_path))
    before = signal.getsignal(signal.SIGINT)  # (the default handler in a terminal; SIG_IGN under nohup or `&`)
    with pytest.raises(RunInterrupted, match=r'stopped on SIGINT after step 4 \(epoch 1/2, batch 4\)') as e:
        _with(Signal(3, signal.SIGINT), lambda: T.train(run_name='cell', **p))
    assert isinstance(e.value, KeyboardInterrupt) and e.value.record['step'] == 4
    assert load_checkpoint(tmp_path/'cell'/'checkpoints'/'last.pt')['step'] == 4
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are given back
    T.train(run_name='cell', resume=True, **p)
    T.train(run_name='whole', **p)
    assert _same(tmp_path/'cell', tmp_path/'whole')


def test_a_second_signal_while_checkpointing_ends_at_once_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import robustbench_lab.learner as L
    p = dict(TINY, runs_dir=str(tmp_path))
    saves = []
    def save(state, f, *a, **k):
        saves.append(1)
        if state.get('interruptions'): os.kill(os.getpid(), signal.SIGTERM)  # the second signal, in the middle of the write
        return torch_save(state, f, *a, **k)
    torch_save = torch.save
    monkeypatch.setattr(L.torch, 'save', save)
    with pytest.raises(RunInterrupted, match='SIGTERM while stopping on SIGTERM: ended at once'):
        _with(Signal(10, signal.SIGTERM), lambda: T.train(run_name='r', **p))
    monkeypatch.setattr(L.torch, 'save', torch_save)
    kept = load_checkpoint(tmp_path/'r'/'checkpoints'/'last.pt')  # the first epoch's, 8 steps of 64 images
    assert kept['step'] == 8 and not kept['interruptions'] and not list((tmp_path/'r').rglob('*.tmp'))


def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one_saying_what_is_lost(tmp_path):
    p = dict(TINY, runs_dir=str(tmp_path), checkpoint_every=3)
    _with(Signal(7, signal.SIGTERM), lambda: pytest.raises(RunInterrupted, T.train, run_name='r', **p))
    ck = tmp_path/'r'/'checkpoints'
    assert load_checkpoint(ck/'prev.pt')['step'] == 6 and load_checkpoint(ck/'last.pt')['step'] == 8
    data = (ck/'last.pt').read_bytes()
    (ck/'last.pt').write_bytes(data[:len(data)//2])  # a copy cut short
    with pytest.raises(RunFileError, match=r'last\.pt: damaged or cut short'): load_checkpoint(ck/'last.pt')
    with pytest.warns(UserWarning, match=r"last\.pt is damaged or cut short.*resuming from .*prev\.pt \(epoch 1, batch 6, step 6\); "
                                         r"2 step\(s\) since it are trained again"):
        T.train(run_name='r', resume=True, **p)
    T.train(run_name='whole', **p)
    assert _same(tmp_path/'r', tmp_path/'whole')


def test_damaged_run_files_are_named_with_what_to_do(tmp_path):
    run = T.train(run_name='r', **dict(TINY, epochs=1, runs_dir=str(tmp_path))).dir
    cfg = (run/'config.json').read_text()
    (run/'config.json').write_text(cfg[:len(cfg)//3])
    with pytest.raises(RunFileError, match=r"config\.json: damaged, not readable as JSON .*restore_config\("): Run.load(run)
    with pytest.raises(RunFileError, match=r"config\.json: damaged"): T.train(run_name='r', resume=True, **dict(TINY, epochs=1, runs_dir=str(tmp_path)))
    restore_config(run)  # from the copy in the checkpoint
    assert Run.load(run).config['epochs'] == 1
    report = (run/'report.json').read_text()
    (run/'report.json').write_text(report[:100])
    with pytest.raises(RunFileError, match=r"report\.json: damaged .*remove it and evaluate the run again"): Run.load(run)
    (run/'report.json').write_text(report)
    (run/'metrics.jsonl').write_text((run/'metrics.jsonl').read_text() + '{"epoch": 1, "lo')  # torn by a kill
    with pytest.warns(UserWarning, match=r'last line \(line 2\) was torn'): assert len(Run.load(run).metrics) == 1
    (run/'hiders.pt').write_bytes(b'not a tensor file')
    with pytest.raises(RunFileError, match=r'hiders\.pt: damaged .*delete it to resume'):
        T.train(run_name='r', resume=True, **dict(TINY, epochs=1, runs_dir=str(tmp_path)))


def test_a_full_disk_ends_the_run_naming_the_file_and_the_space_keeping_the_last_good_checkpoint(tmp_path, monkeypatch):
    import robustbench_lab.core as C
    p = dict(TINY, runs_dir=str(tmp_path))
    full, write = [], C._Recording.write
    def writes(self, data):  # after step 10 every write fails as on a full disk
        if full: raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(self, data)
    monkeypatch.setattr(C._Recording, 'write', writes)
    class Fill(Callback):
        order = 1
        def after_batch(self, learn):
            if learn.step == 10: full.append(1)
    with pytest.raises(WriteFailed, match=r'r/(hiders|metrics)\S*: writing failed \(No space left on device\); [\d,.]+ MiB free on its filesystem'):
        _with(Fill(), lambda: T.train(run_name='r', **p))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path/'r'/'checkpoints'/'last.pt')['step'] == 8 and not list((tmp_path/'r').rglob('*.tmp'))
    # a real full filesystem where one can be made (a small tmpfs; root in a container may not mount)
    small = tmp_path/'small'
    small.mkdir()
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=200k', 'tmpfs', str(small)], capture_output=True).returncode: return
    try:
        with pytest.raises(WriteFailed, match=r'No space left on device'): T.train(run_name='s', **dict(p, epochs=1, runs_dir=str(small)))
        assert not list(small.rglob('*.tmp'))
    finally: subprocess.run(['umount', '-l', str(small)])


def test_verify_says_what_is_damaged_and_what_a_resume_would_start_from(tmp_path):
    p = dict(TINY, runs_dir=str(tmp_path), checkpoint_every=3)
    _with(Signal(7, signal.SIGTERM), lambda: pytest.raises(RunInterrupted, T.train, run_name='r', **p))
    run = tmp_path/'r'
    healthy = Run.verify(run)
    assert healthy.ok and 'checkpoints/last.pt (epoch 1, batch 8, step 8)' in healthy.resume
    (run/'checkpoints'/'last.pt').write_bytes((run/'checkpoints'/'last.pt').read_bytes()[:1000])
    (run/'steps.jsonl').write_text((run/'steps.jsonl').read_text() + '{"step": 8, "ep')
    (run/'checkpoints'/'.last.pt.abc.tmp').write_bytes(b'half')
    out = subprocess.run([str(BIN/'rblab-run'), '--verify', str(run)], capture_output=True, text=True)
    assert out.returncode == 1, out.stdout + out.stderr
    assert 'damaged  checkpoints/last.pt' in out.stdout and 'torn  steps.jsonl' in out.stdout and 'leftover  checkpoints/.last.pt.abc.tmp' in out.stdout
    assert 'resume: checkpoints/prev.pt (epoch 1, batch 6, step 6): last.pt is damaged' in out.stdout
