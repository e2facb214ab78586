"""torch.distributed, two processes on this CPU (gloo, loopback): synchronised BatchNorm equals BatchNorm on the concatenated
batch; nproc = 2 with sync_bn trains the single-process computation (up to float summation order); a killed job resumes
bit-identically and a killed rank ends the job with a clear error; sharded evaluation gives the single-process per-sample results."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from robustbench_lab import distributed
from robustbench_lab.core import ConfigError
from robustbench_lab.learner import load_checkpoint
from robustbench_lab.train import resolve_config, train

REPO = Path(__file__).resolve().parent.parent
TINY = dict(dataset='digits', arch='small_cnn', width=8, epochs=1, batch_size=64, n_train=192, n_eval=64, n_report=64, seed=0,
            progress=False, eps=0.1, alpha=0.025, steps=2, channels_last=False)


def _bn_worker():
    "Each of two processes holds half of a float64 batch: forward, backward and running statistics vs one BatchNorm (and one dual BN)."
    import copy
    import torch.nn.functional as F
    r, w = distributed.join_group()
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 5, dtype=torch.float64)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 2)).double()
    ref, syn = copy.deepcopy(net), distributed.sync_batchnorm(copy.deepcopy(net))
    z_ref = ref(x)
    F.cross_entropy(z_ref, torch.arange(8) % 2).backward()
    rows = slice(4*r, 4*r + 4)
    with distributed.batch_share(4, 8):
        out = syn(x[rows]); distributed.scale_loss(F.cross_entropy(out, (torch.arange(8) % 2)[rows])).backward()
    distributed.reduce_grads_(list(syn.parameters()))
    # OAT's per-sample routing through a dual BN: process 0 holds no row of branch 1 and still takes part in its statistics;
    # then (OAT's adversarial forward) no process holds a row of branch 0, whose statistics must stay as they are
    from robustbench_lab.models import MultiBN
    dual = nn.Sequential(nn.Conv2d(3, 4, 3), MultiBN(4, K=2), nn.Flatten(), nn.Linear(36, 2)).double()
    dref, dsyn = copy.deepcopy(dual), distributed.sync_batchnorm(copy.deepcopy(dual))
    pairs = [(out, z_ref[rows])]
    for route in (torch.tensor([0, 0, 0, 0, 1, 0, 1, 1]), torch.ones(8, dtype=torch.long)):
        dref[1].set_route(route); dsyn[1].set_route(route[rows])
        zd_ref = dref(x)
        F.cross_entropy(zd_ref, torch.arange(8) % 2).backward()
        with distributed.batch_share(4, 8):
            zd = dsyn(x[rows]); distributed.scale_loss(F.cross_entropy(zd, (torch.arange(8) % 2)[rows])).backward()
        pairs.append((zd, zd_ref[rows]))
    distributed.reduce_grads_(list(dsyn.parameters()))
    params = [*zip(syn.parameters(), ref.parameters()), *zip(dsyn.parameters(), dref.parameters())]
    buffers = [*zip(syn.buffers(), ref.buffers()), *zip(dsyn.buffers(), dref.buffers())]
    return dict(out=max((a - b).abs().max().item() for a, b in pairs),
                grad=max((a.grad - b.grad).abs().max().item() for a, b in params),
                stats=max((a - b).abs().max().item() for a, b in buffers if a.is_floating_point()))


def _unshared_folder_worker(folder):
    "Rank 0 writes a run folder's config.json that rank 1 cannot see, as on two nodes without a shared filesystem."
    r, _ = distributed.join_group()
    mine = Path(folder)/f'node{r}'
    mine.mkdir()
    if r == 0: (mine/'config.json').write_text('{}')
    try: distributed.check_shared(mine/'config.json', wait_s=0.2)
    except ConfigError as e: return str(e)


def test_a_run_folder_other_processes_cannot_see_is_refused_by_all(tmp_path):
    import tests.test_distributed as me
    msg = distributed.launch(me._unshared_folder_worker, (str(tmp_path),), nproc=2)
    assert msg and 'process(es) [1] do not see' in msg and 'shares' in msg, msg  # rank 0 raises too: no process runs on alone


def _uneven_worker():
    "Two processes meeting after work of uneven length, each wait longer than the group's timeout: dealt-out batches, rank 0's files."
    from datetime import timedelta
    from torch.distributed.distributed_c10d import _set_pg_timeout
    distributed.join_group('gloo')  # (joined with the usual timeout: the workers start at somewhat different times)
    _set_pg_timeout(timedelta(seconds=1))  # the default group's collectives now give up after 1 s
    slow_batch_1 = lambda s: (time.sleep(3) if s.start == 1 else None, s.start)[1]  # batch 1 is rank 1's
    got = distributed.map_batches(slow_batch_1, [slice(0, 1), slice(1, 2)])
    if distributed.is_main(): time.sleep(3)
    distributed.barrier()
    return got


def test_processes_wait_for_uneven_work_past_the_groups_timeout():
    import tests.test_distributed as me
    assert distributed.launch(me._uneven_worker, nproc=2) == [0, 1]


def test_synchronised_batchnorm_is_batchnorm_on_the_whole_batch():
    import signal
    import tests.test_distributed as me
    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
    got = distributed.launch(me._bn_worker, nproc=2)
    assert got['out'] < 1e-12 and got['grad'] < 1e-12 and got['stats'] < 1e-12, got
    # the elastic launcher's own handlers (SIGTERM raising its exception anywhere later) do not outlive the launch
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)] == handlers


# Tolerance: float32 weights after one epoch (3 steps) differ only by the order of floating-point sums (gradients summed over
# two processes, BN statistics reduced across them, convolutions on 32 rows instead of 64): ~1e-7 relative. TRADES' inner
# attack starts at x + 0.001·N(0, I), where the KL gradient is ~1e-6 and its sign flips for a few pixels under that rounding,
# so its weights agree to ~1e-4.
@pytest.mark.parametrize('name,params,tol', [
    ('pgdat', dict(), 1e-5), ('trades', dict(objective='trades'), 1e-3), ('awp', dict(method='awp'), 1e-5),
    ('hfat', dict(method='hfat', hfat_steps_s=2), 1e-5), ('dynat', dict(method='dynat'), 1e-5),
    ('afa', dict(method='afa', afa_K=3, afa_attack_steps=2), 1e-5), ('oat', dict(method='oat'), 1e-5)])
def test_two_processes_with_sync_bn_train_the_single_process_computation(tmp_path, name, params, tol):
    one = train(run_name='one', runs_dir=str(tmp_path), **TINY, **params)
    two = train(run_name='two', runs_dir=str(tmp_path), nproc=2, sync_bn=True, **TINY, **params)
    a, b = (load_checkpoint(r.dir/'checkpoints'/'last.pt') for r in (one, two))
    for x, y in [(a['model'], b['model'])] + [(a['extra'][k], b['extra'][k]) for k in a['extra']]:
        for k in x:
            if x[k].is_floating_point(): assert torch.allclose(x[k], y[k], rtol=0, atol=tol), (name, k, (x[k] - y[k]).abs().max().item())
    cfg = json.loads((two.dir/'config.json').read_text())['run']
    assert cfg['nproc'] == 2 and cfg['backend'] == 'gloo' and cfg['sync_bn'] is True
    assert two.report.n == one.report.n and two.net is not None


def _script(tmp_path, name, **extra):
    params = {**TINY, **dict(epochs=3, n_train=256, checkpoint_every=2, runs_dir=str(tmp_path), run_name=name, nproc=2, sync_bn=True), **extra}
    return [sys.executable, '-c', f'from robustbench_lab.train import train\nif __name__ == "__main__": train(**{params!r})']


def _workers(marker):
    "PIDs of the worker processes whose command line mentions `marker` (the launcher starts `python -m robustbench_lab.distributed`)."
    out = []
    for p in Path('/proc').iterdir():
        if not p.name.isdigit(): continue
        try: cmd = (p/'cmdline').read_bytes().replace(b'\0', b' ').decode()
        except OSError: continue
        if 'robustbench_lab.distributed' in cmd and marker in cmd: out.append(int(p.name))
    return out


def test_killed_two_process_run_resumes_bit_identically(tmp_path):
    ref = train(**dict(TINY, epochs=3, n_train=256, checkpoint_every=2, runs_dir=str(tmp_path), run_name='ref', nproc=2, sync_bn=True))
    proc = subprocess.Popen(_script(tmp_path, 'killed'), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt, deadline = tmp_path/'killed'/'checkpoints'/'last.pt', time.time() + 300
    while not ckpt.exists():
        assert proc.poll() is None and time.time() < deadline, 'the 2-process run ended before its first checkpoint'
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers at once
    proc.wait()
    assert load_checkpoint(ckpt)['step'] < 12
    # a rank-0 worker that outlived its launcher still holds the run folder (and would still write into it): end it first
    from robustbench_lab.core import FolderLock
    t0 = time.time()
    while (holder := FolderLock.holder(tmp_path/'killed')) is not None and time.time() - t0 < 60:
        if holder.get('pid') and time.time() - t0 > 2:
            try: os.kill(holder['pid'], signal.SIGKILL)
            except ProcessLookupError: pass
        time.sleep(0.1)
    resumed = train(**dict(TINY, epochs=3, n_train=256, checkpoint_every=2, runs_dir=str(tmp_path), run_name='killed', nproc=2,
                           sync_bn=True, resume=True))
    a, b = (load_checkpoint(r.dir/'checkpoints'/'last.pt')['model'] for r in (ref, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(l)['step'] for l in (resumed.dir/'steps.jsonl').read_text().splitlines()]
    assert steps == list(range(12))


def test_a_killed_rank_ends_the_job_with_a_clear_error_in_bounded_time(tmp_path):
    proc = subprocess.Popen(_script(tmp_path, 'victim', epochs=20), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    ckpt, deadline = tmp_path/'victim'/'checkpoints'/'last.pt', time.time() + 300
    while not ckpt.exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    workers = _workers('payload')
    assert len(workers) == 2
    os.kill(max(workers), signal.SIGKILL)  # one rank only
    t0 = time.time()
    try: out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError('the job hung after one rank was killed')
    assert proc.returncode != 0 and time.time() - t0 < 90
    assert 'WorkerFailed' in err and 'signal SIGKILL' in err and 'rank' in err, err[-2000:]
    assert load_checkpoint(ckpt)['format']  # the last complete checkpoint is intact


def test_sharded_evaluation_gives_the_single_process_per_sample_results(digits_model, digits_test):
    from robustbench_lab.evaluate import AA, evaluate
    x, y = digits_test
    suite = ['FGSM', 'PGD-20', 'CW', AA(0.1, 'custom', ['apgd-ce', 'apgd-t'], n_iter=3, n_target_classes=2, name='AA')]
    one = evaluate(digits_model, x, y, suite, n=200, eps=0.1, batch_size=48, checks=False)
    two = evaluate(digits_model, x, y, suite, n=200, eps=0.1, batch_size=48, checks=False, nproc=2)
    assert torch.equal(one.clean, two.clean) and two.meta['nproc'] == 2
    for k in one.robust: assert torch.equal(one.robust[k], two.robust[k]), k


def test_process_settings_are_refused_before_any_process_starts(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match='nproc'): resolve_config(nproc=0)
    with pytest.raises(ConfigError, match='split evenly'): resolve_config(nproc=2, batch_size=63)
    with pytest.raises(ConfigError, match='last batch'): resolve_config(nproc=4, batch_size=64, n_train=65)
    # F²AT's MI bound contrasts rows within each process's share of a batch: two at least, also alone and in the last batch
    with pytest.raises(ConfigError, match='last batch would hold 1 .* at least 2'): resolve_config(method='f2at', batch_size=64, n_train=129)
    with pytest.raises(ConfigError, match='last batch would hold 3 .* 4 for nproc = 2'): resolve_config(method='f2at', nproc=2, batch_size=64, n_train=131)
    with pytest.raises(ConfigError, match='batch_size = 2: .* 4 for nproc = 2'): resolve_config(method='f2at', nproc=2, batch_size=2)
    resolve_config(method='f2at', nproc=2, batch_size=64, n_train=132)
    with pytest.raises(ConfigError, match='nccl'): resolve_config(nproc=2, backend='nccl')
    import robustbench_lab.runs as R
    monkeypatch.setattr(R, 'build_model', lambda cfg, *a, **k: nn.Linear(2, 2))
    with pytest.raises(ConfigError, match='no BatchNorm'): resolve_config(nproc=2, sync_bn=True)
    assert not any(tmp_path.iterdir())


def test_torchrun_trains_from_a_config_json_made_with_another_process_count(tmp_path):
    # a run's config.json records how many processes made it; under torchrun the group's size decides
    cfg = tmp_path/'config.json'
    cfg.write_text(json.dumps(dict(TINY, n_train=128, n_report=32, nproc=4, run_name='tr', runs_dir=str(tmp_path/'runs'))))
    out = subprocess.run([str(Path(sys.executable).parent/'torchrun'), '--standalone', '--nproc_per_node', '2', '-m',
                          'robustbench_lab.train', str(cfg)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert out.returncode == 0, (out.stdout + out.stderr)[-2000:]
    made = json.loads((tmp_path/'runs'/'tr'/'config.json').read_text())['run']
    assert made['nproc'] == 2 and (tmp_path/'runs'/'tr'/'report.json').exists()


def test_papermill_with_two_processes_leaves_one_run_folder(tmp_path):
    runs = tmp_path/'runs'
    out = subprocess.run([str(Path(sys.executable).parent/'papermill'), str(REPO/'nbs'/'train.ipynb'), str(tmp_path/'o.ipynb'),
                          '-p', 'nproc', '2', '-p', 'epochs', '1', '-p', 'n_train', '256', '-p', 'n_report', '64',
                          '-p', 'runs_dir', str(runs), '-p', 'progress', 'False'], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    folders = list(runs.iterdir())
    assert len(folders) == 1 and (folders[0]/'report.json').exists() and json.loads((folders[0]/'config.json').read_text())['run']['nproc'] == 2


def test_a_launched_process_on_cuda_makes_its_own_gpu_current_whatever_the_backend(monkeypatch):
    from unittest.mock import patch
    local_device = distributed.local_device
    monkeypatch.setenv('RANK', '1'); monkeypatch.setenv('WORLD_SIZE', '2'); monkeypatch.setenv('LOCAL_RANK', '1')
    made_current = []
    with patch('torch.cuda.device_count', return_value=2), patch('torch.cuda.set_device', made_current.append):
        assert local_device('cuda') == torch.device('cuda', 1) and made_current == [torch.device('cuda', 1)]
        assert local_device('cpu') == torch.device('cpu') and len(made_current) == 1
    with patch('torch.cuda.device_count', return_value=1), pytest.raises(ConfigError, match='LOCAL_RANK = 1: only 1 CUDA device'):
        local_device('cuda')
