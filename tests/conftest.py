"""Shared fixtures: the real CIFAR-10 arrays (through RBLAB_DATA) and the pyautoattack reference ResNet-18."""
import os
from pathlib import Path

import pytest
import torch

from robustbench_lab.data import DataNotFoundError, load_arrays
from robustbench_lab.models import reference_resnet18

REPO = Path(__file__).resolve().parent.parent


def _cifar_or_skip(split):
    """The CIFAR-10 split; skipped when RBLAB_DATA is unset, an error when it is set but holds no CIFAR-10."""
    if not os.environ.get('RBLAB_DATA'):
        pytest.skip('RBLAB_DATA is not set: real-CIFAR-10 checks need ../shared/data')
    try:
        return load_arrays('cifar10', split)
    except DataNotFoundError as e:
        raise AssertionError(f'RBLAB_DATA is set but CIFAR-10 is missing: {e}')


@pytest.fixture(scope='session')
def cifar_test():
    x, y = _cifar_or_skip('test')
    return x, y


@pytest.fixture(scope='session')
def cifar_train():
    return _cifar_or_skip('train')


@pytest.fixture(scope='session')
def reference_model():
    torch.manual_seed(0)
    return reference_resnet18()


@pytest.fixture(scope='session')
def digits_model():
    """A small_cnn trained for a few seconds on the 8x8 digits (about 95% clean): real decision boundaries, CPU-cheap."""
    import torch.nn.functional as F
    from robustbench_lab.data import Loader
    from robustbench_lab.models import create_model
    torch.manual_seed(0)
    model = create_model('small_cnn', 'digits', width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(4):
        for xb, yb in Loader(*load_arrays('digits', 'train'), batch_size=64, shuffle=True, seed=epoch):
            opt.zero_grad(); F.cross_entropy(model(xb), yb).backward(); opt.step()
    return model.eval()


@pytest.fixture(scope='session')
def digits_test():
    x, y = load_arrays('digits', 'test')
    return x.float()/255, y


SLURM_CONF = """\
ClusterName=rblab-test
SlurmctldHost={host}
SlurmctldPort=6917
SlurmdPort=6918
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
KillWait=30
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
NodeName={host} CPUs={cpus} RealMemory=8000 State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _sh(cmd, timeout=60, **kw):
    import subprocess
    return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope='session')
def slurm_cluster(tmp_path_factory):
    """A single-node Slurm cluster on this machine (slurmctld + slurmd, munge), installed from Debian's packages when
    missing (root); skipped with the reason where it cannot be installed or started. Yields the slurm.conf path, set in
    SLURM_CONF for the client commands (sbatch, squeue, scontrol) this process and its children run."""
    import shutil, socket, time
    if not shutil.which('sbatch') or not shutil.which('munged'):
        if os.geteuid() != 0 or not shutil.which('apt-get'):
            pytest.skip('Slurm is not installed and cannot be installed here (needs root and apt-get: apt-get install slurm-wlm munge)')
        r = _sh('apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge', timeout=900)
        if r.returncode or not shutil.which('sbatch'):
            pytest.skip(f'Slurm could not be installed (apt-get install slurm-wlm munge): {(r.stderr or r.stdout)[-500:]}')
    started_munge = False
    if _sh('munge -n | unmunge').returncode:
        started_munge = True
        _sh('mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge')
        if not os.path.exists('/etc/munge/munge.key'):
            _sh('mungekey --create || (dd if=/dev/urandom bs=1 count=1024 > /etc/munge/munge.key); chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key')
        r = _sh('su -s /bin/sh munge -c /usr/sbin/munged')
        time.sleep(1)
        if _sh('munge -n | unmunge').returncode: pytest.skip(f'munged does not start here: {r.stderr[-500:]}')
    d = tmp_path_factory.mktemp('slurm')
    for sub in ('state', 'spool'): (d/sub).mkdir()
    host = socket.gethostname().split('.')[0]
    conf = d/'slurm.conf'
    conf.write_text(SLURM_CONF.format(host=host, d=d, cpus=os.cpu_count() or 2))
    old = os.environ.get('SLURM_CONF')
    os.environ['SLURM_CONF'] = str(conf)
    started = [_sh(f'slurmctld -f {conf}'), _sh(f'slurmd -f {conf}')]
    try:
        for _ in range(60):
            if _sh('sinfo -h -o %T').stdout.strip() == 'idle': break
            time.sleep(0.5)
        else:
            logs = ''.join(f'{p.name}: {p.read_text()[-800:]}' for p in d.glob('*.log'))
            pytest.skip(f'the single-node Slurm cluster did not come up: {[s.stderr for s in started]} {logs}')
        yield conf
    finally:
        _sh('scancel --full --quiet $(squeue -h -o %i)')  # every job of this test cluster, whoever submitted it
        for pid_file in [d/'slurmd.pid', d/'slurmctld.pid'] + ([Path('/run/munge/munged.pid')] if started_munge else []):
            try: os.kill(int(pid_file.read_text()), 15)
            except (OSError, ValueError): pass
        if old is None: os.environ.pop('SLURM_CONF', None)
        else: os.environ['SLURM_CONF'] = old
