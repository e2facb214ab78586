"""Prepare the GPU call of `benchmarks/device_run.sh` here: what it needs that the device machine lacks, in `.devdata/`.

    python benchmarks/prepare_device.py          # then: device run, command `bash benchmarks/device_run.sh`, carry ['.devdata']

The device machine has PyTorch but neither the data nor `pyautoattack`, and it cannot download either. This writes
- `.devdata/cifar10/{train,test}.npz`: the first `--n-train` training and `--n-test` test images of CIFAR-10 (from
  RBLAB_DATA), enough for every section of `device_check.py` (3,072 training images: 24 batches of 128; 1,000 test points
  for AutoAttack);
- `.devdata/site/pyautoattack/`: the installed package, with the ResNet-18 weights it ships (AutoAttack's reference model);
and checks that the working tree plus `.devdata/` stays under the device tool's 64 MiB for what travels.
"""
import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TRAVEL_LIMIT = 64*2**20  # bytes the device tool carries: the working tree and the carried folders together


def write_subset(data_dir:Path, out:Path, n_train:int, n_test:int):
    "The first images of each CIFAR-10 split, with the official files' array names."
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (('train', n_train), ('test', n_test)):
        with np.load(data_dir/'cifar10'/f'{split}.npz') as d:
            x, y = d[f'x_{split}'], d[f'y_{split}']
        if n > len(x): raise SystemExit(f'--n-{split}: {n} asked, {len(x)} available')
        np.savez(out/f'{split}.npz', **{f'x_{split}': x[:n], f'y_{split}': y[:n]})


def copy_pyautoattack(site:Path):
    import pyautoattack
    src = Path(pyautoattack.__file__).parent
    dst = site/'pyautoattack'
    if dst.exists(): shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns('__pycache__'))


def travelling_bytes() -> int:
    "Tracked files, untracked files git does not ignore, and `.devdata/`: what a device call sends."
    files = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split('\0')
    size = sum((REPO/f).stat().st_size for f in files if f and (REPO/f).is_file())
    return size + sum(p.stat().st_size for p in (REPO/'.devdata').rglob('*') if p.is_file())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data', default=None, help='the data folder holding cifar10/{train,test}.npz (default: RBLAB_DATA)')
    p.add_argument('--n-train', type=int, default=3072)
    p.add_argument('--n-test', type=int, default=1000)
    a = p.parse_args(argv)
    from robustbench_lab.core import settings
    data_dir = Path(a.data) if a.data else settings().data_dir
    if not (data_dir/'cifar10'/'train.npz').exists():
        p.error(f'--data: no cifar10/train.npz under {data_dir} (set RBLAB_DATA or pass --data)')
    write_subset(data_dir, REPO/'.devdata'/'cifar10', a.n_train, a.n_test)
    copy_pyautoattack(REPO/'.devdata'/'site')
    size = travelling_bytes()
    print(f'.devdata ready: CIFAR-10 {a.n_train} train / {a.n_test} test images, pyautoattack; '
          f'{size/2**20:.1f} MiB travel (limit {TRAVEL_LIMIT/2**20:.0f} MiB)')
    if size > TRAVEL_LIMIT:
        print('too much would travel: lower --n-train / --n-test, or remove untracked files', file=sys.stderr); return 1
    print("device call: command 'bash benchmarks/device_run.sh', carry ['.devdata'], timeout_s 590")
    return 0


if __name__ == '__main__':
    sys.exit(main())
