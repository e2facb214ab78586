"""A study on a real single-node Slurm cluster (tests/conftest.py starts it): a 2-cell x 2-seed study submitted through
submitit as a job array; one job requeued with `scontrol requeue` while it trains stops at a checkpointed step, runs
again and ends with weights bit-identical to an uninterrupted run."""
import json
import subprocess
import time

import torch

from robustbench_lab.learner import load_checkpoint
from robustbench_lab.study import Study, run_study
from robustbench_lab.train import train

SPEC = dict(name='sl', base=dict(dataset='digits', arch='small_cnn', width=16, n_train=1024, epochs=5, batch_size=64, lr=0.05,
                                 n_eval=64, n_report=64, hider_n=32, steps=5),
            grid=dict(objective=['pgdat', 'trades']), seeds=[0, 1], evaluate=[dict(tag='pgd', suite='monitor', n=100)])


def _epochs(run_dir):
    try: return [json.loads(l) for l in (run_dir/'metrics.jsonl').read_text().splitlines() if l.strip()]
    except FileNotFoundError: return []


def test_slurm_job_array_with_a_requeued_job_resumes_bit_identically(tmp_path, slurm_cluster):
    runs = tmp_path/'runs'
    study = run_study(SPEC, executor='slurm', parallel=4, threads=1, timeout_min=20, wait=False, runs_dir=runs, progress=False)
    jobs = json.loads((study.folder/'jobs.json').read_text())
    assert len(jobs) == 4 and len({j.split('_')[0] for j in jobs.values()}) == 1  # one array
    # requeue the first run seen part-way through training (an epoch recorded, not finished)
    victim, t0 = None, time.time()
    while victim is None and time.time() - t0 < 300:
        for r in study.runs:
            recs = _epochs(runs/r.name)
            if 1 <= len(recs) < 4 and not (runs/r.name/'report.json').exists(): victim = r; break
        time.sleep(0.2)
    assert victim is not None, study.status().to_string()
    job = jobs[victim.name]
    assert subprocess.run(['scontrol', 'requeue', job], capture_output=True, text=True).returncode == 0
    t0 = time.time()
    while not any(x.get('interrupted') for x in _epochs(runs/victim.name)) and time.time() - t0 < 120: time.sleep(0.5)
    stop = [x for x in _epochs(runs/victim.name) if x.get('interrupted')]
    assert stop and stop[0]['signal'] == 'SIGTERM', _epochs(runs/victim.name)
    # a requeued job waits ~2 minutes (BeginTime); let it start now
    for _ in range(20):
        subprocess.run(['scontrol', 'update', f'JobId={job}', 'StartTime=now'], capture_output=True)
        time.sleep(1)
        if (runs/victim.name/'report.json').exists(): break
    st = study.wait(timeout_s=600, poll_s=1, progress=False)
    assert list(st.state) == ['done']*4, st.to_string()
    reference = train(**{**victim.params, 'run_name': 'reference', 'progress': False})
    a, b = load_checkpoint(runs/victim.name/'checkpoints'/'last.pt')['model'], load_checkpoint(reference.dir/'checkpoints'/'last.pt')['model']
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert Study(SPEC, runs_dir=runs).results().shape[0] == 4
