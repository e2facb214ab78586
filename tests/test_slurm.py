"""A study on a real single-node Slurm cluster (tests/conftest.py starts it): a 2-cell x 2-seed study submitted through
submitit as one job array. Two jobs are interrupted while they train: one requeued by `scontrol requeue` (SIGTERM:
the run stops at a checkpointed step and Slurm runs the job again), one sent submitit's warning signal SIGUSR2, as Slurm
sends it before a time limit (the run stops at a checkpointed step and submitit's Checkpointable requeues the call). Both end
with weights bit-identical to uninterrupted runs."""
import json
import os
import signal
import subprocess
import time

import torch

from robustbench_lab.core import FolderLock
from robustbench_lab.learner import load_checkpoint
from robustbench_lab.study import Study, run_study
from robustbench_lab.train import train

SPEC = dict(name='sl', base=dict(dataset='digits', arch='small_cnn', width=16, n_train=1024, epochs=5, batch_size=64, lr=0.05,
                                 n_eval=64, n_report=64, hider_n=32, steps=5),
            grid=dict(objective=['pgdat', 'trades']), seeds=[0, 1], evaluate=[dict(tag='pgd', suite='monitor', n=100)])


def _epochs(run_dir):
    try: return [json.loads(l) for l in (run_dir/'metrics.jsonl').read_text().splitlines() if l.strip()]
    except FileNotFoundError: return []


def _mid_run(study, runs, exclude=()):
    "A run seen part-way through training (an epoch recorded, not finished)."
    t0 = time.time()
    while time.time() - t0 < 300:
        for r in study.runs:
            recs = _epochs(runs/r.name)
            if r.name not in exclude and 1 <= len(recs) < 4 and not (runs/r.name/'report.json').exists(): return r
        time.sleep(0.2)
    raise AssertionError(f'no run caught mid-training:\n{study.status().to_string()}')


def _stopped_on(run_dir, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        stops = [x for x in _epochs(run_dir) if x.get('interrupted')]
        if stops: return stops[0]['signal']
        time.sleep(0.3)
    raise AssertionError(f'{run_dir.name} did not stop: {_epochs(run_dir)}')


def _release(job):
    "A requeued job waits about two minutes (BeginTime): let it start now."
    for _ in range(10):
        out = subprocess.run(['squeue', '-h', '-r', '-j', job, '-o', '%T'], capture_output=True, text=True).stdout.strip()
        if out == 'PENDING': subprocess.run(['scontrol', 'update', f'JobId={job}', 'StartTime=now'], capture_output=True)
        if out in ('PENDING', 'RUNNING', ''): return
        time.sleep(0.5)


def test_slurm_job_array_requeued_jobs_resume_bit_identically(tmp_path, slurm_cluster):
    runs, threads = tmp_path/'runs', torch.get_num_threads()
    study = run_study(SPEC, executor='slurm', parallel=4, threads=1, timeout_min=20, wait=False, runs_dir=runs, progress=False)
    jobs = json.loads((study.folder/'jobs.json').read_text())
    assert len(jobs) == 4 and len({j.split('_')[0] for j in jobs.values()}) == 1  # one array
    assert study.status().state.str.startswith(('queued', 'running')).all()
    first = _mid_run(study, runs)
    assert subprocess.run(['scontrol', 'requeue', jobs[first.name]], capture_output=True, text=True).returncode == 0
    assert _stopped_on(runs/first.name) == 'SIGTERM'
    second = _mid_run(study, runs, exclude={first.name})
    # the warning Slurm sends before a time limit (--signal=USR2@90, as submitit asks), to the job's task: the training process
    os.kill(FolderLock.holder(runs/second.name)['pid'], signal.SIGUSR2)
    assert _stopped_on(runs/second.name) == 'SIGUSR2'
    t0 = time.time()
    while time.time() - t0 < 300 and not all((runs/r.name/'report_pgd.json').exists() for r in (first, second)):
        for r in (first, second): _release(jobs[r.name])
        time.sleep(1)
    st = study.wait(timeout_s=600, poll_s=1, progress=False)
    assert list(st.state) == ['done']*4, st.to_string()
    for r in (first, second):
        torch.set_num_threads(1)  # as the jobs ran (threads=1): CPU results are bit-identical only at one thread count
        try: ref = train(**{**r.params, 'run_name': f'reference-{r.name}', 'progress': False})
        finally: torch.set_num_threads(threads)
        a, b = load_checkpoint(runs/r.name/'checkpoints'/'last.pt')['model'], load_checkpoint(ref.dir/'checkpoints'/'last.pt')['model']
        assert all(torch.equal(a[k], b[k]) for k in a), r.name
    assert Study(SPEC, runs_dir=runs).results().shape[0] == 4


def test_slurm_a_cell_reading_another_cells_run_starts_after_it(tmp_path, slurm_cluster):
    base = dict(dataset='digits', arch='small_cnn', width=8, n_train=256, epochs=1, batch_size=64, n_eval=32, n_report=32, hider_n=32,
                steps=2, method='afa', afa_K=2)
    spec = dict(name='deps', base=base, seeds=[0, 1],
                cells=[dict(label='Stage II', afa_stage=2, afa_from='{cell:Stage I}'), dict(label='Stage I', afa_stage=1)])
    study = run_study(spec, executor='slurm', threads=1, timeout_min=20, runs_dir=tmp_path/'runs', progress=False, poll_s=1)
    assert list(study.status().state) == ['done']*4, study.status().to_string()
    jobs = json.loads((study.folder/'jobs.json').read_text())
    stage1, stage2 = {j.split('_')[0] for k, j in jobs.items() if 'Stage_I-' in k}, {j.split('_')[0] for k, j in jobs.items() if 'Stage_II' in k}
    assert len(stage1) == len(stage2) == 1 and stage1 != stage2  # one array per wave, the second submitted with afterok on the first
    cfg = json.loads((tmp_path/'runs'/'deps-Stage_II-s1'/'config.json').read_text())
    assert cfg['method']['settings']['afa_from'] == str(tmp_path/'runs'/'deps-Stage_I-s1')
