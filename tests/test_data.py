"""Datasets from files in each official format, real CIFAR-10 order, bad input, and the batch loader."""
import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robustbench_lab.core import ConfigError
from robustbench_lab.data import (DEBIAN_FASHION_DIR, ChecksumError, CropFlip, DataNotFoundError, Loader, channel_stats,
                                  dataset_info, load_arrays, num_classes)

rng = np.random.default_rng(0)


def _imgs(n, c=3, s=32):
    return rng.integers(0, 256, size=(n, c, s, s), dtype=np.uint8)


def _write_cifar_batch(path, x, labels, key):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'wb') as f:
        pickle.dump({'data': x.reshape(len(x), -1), key: list(labels), 'batch_label': b'fake'}, f)


def test_cifar10_pickle_batches_in_official_order(tmp_path):
    xs = [_imgs(3) for _ in range(5)]
    folder = tmp_path/'cifar10'/'cifar-10-batches-py'
    for i, x in enumerate(xs): _write_cifar_batch(folder/f'data_batch_{i + 1}', x, [i]*3, 'labels')
    xt = _imgs(4)
    _write_cifar_batch(folder/'test_batch', xt, [9, 8, 7, 6], 'labels')
    x, y = load_arrays('cifar10', 'train', data_dir=tmp_path, verify=False)
    assert x.shape == (15, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert torch.equal(x, torch.from_numpy(np.concatenate(xs))) and y.tolist() == [0]*3 + [1]*3 + [2]*3 + [3]*3 + [4]*3
    # a row of 3072 bytes is the R plane, then G, then B
    assert torch.equal(x[0, 1], torch.from_numpy(xs[0][0, 1]))
    x, y = load_arrays('cifar10', 'test', data_dir=tmp_path, verify=False)
    assert y.tolist() == [9, 8, 7, 6]
    with pytest.raises(ChecksumError, match='data_batch_1'):
        load_arrays('cifar10', 'train', data_dir=tmp_path, verify=True)


def test_cifar100_pickle_uses_fine_labels(tmp_path):
    folder = tmp_path/'cifar-100-python'  # torchvision's layout directly under the data dir
    x = _imgs(5)
    _write_cifar_batch(folder/'test', x, [99, 0, 50, 1, 2], 'fine_labels')
    xl, yl = load_arrays('cifar100', 'test', data_dir=tmp_path, verify=False)
    assert torch.equal(xl, torch.from_numpy(x)) and yl.tolist() == [99, 0, 50, 1, 2]


def test_npz_arrays_hwc(tmp_path):
    x = _imgs(6)
    (tmp_path/'cifar10').mkdir()
    np.savez(tmp_path/'cifar10'/'test.npz', x_test=x.transpose(0, 2, 3, 1), y_test=np.arange(6))
    xl, yl = load_arrays('cifar10', 'test', data_dir=tmp_path)
    assert torch.equal(xl, torch.from_numpy(x)) and yl.tolist() == list(range(6))


def test_svhn_mat_maps_label_10_to_0(tmp_path):
    from scipy.io import savemat
    x = _imgs(4)
    (tmp_path/'svhn').mkdir()
    savemat(tmp_path/'svhn'/'train_32x32.mat', {'X': x.transpose(2, 3, 1, 0), 'y': np.array([[10], [1], [5], [10]])})
    xl, yl = load_arrays('svhn', 'train', data_dir=tmp_path, verify=False)
    assert torch.equal(xl, torch.from_numpy(x)) and yl.tolist() == [0, 1, 5, 0]
    with pytest.raises(ChecksumError): load_arrays('svhn', 'train', data_dir=tmp_path)


def test_tinyimagenet_folder_layout_and_cache(tmp_path):
    from PIL import Image
    root = tmp_path/'tinyimagenet'/'tiny-imagenet-200'
    wnids = ['n02', 'n01']
    (root).mkdir(parents=True)
    (root/'wnids.txt').write_text('\n'.join(wnids))
    imgs = {}
    for w in wnids:
        d = root/'train'/w/'images'
        d.mkdir(parents=True)
        for i in (0, 2, 10):
            arr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(arr).save(d/f'{w}_{i}.JPEG', quality=100)
            imgs[(w, i)] = np.array(Image.open(d/f'{w}_{i}.JPEG').convert('RGB'))
    (root/'val'/'images').mkdir(parents=True)
    ann = []
    for i, w in [(1, 'n02'), (0, 'n01')]:
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root/'val'/'images'/f'val_{i}.JPEG')
        ann.append(f'val_{i}.JPEG\t{w}\t0\t0\t63\t63')
    (root/'val'/'val_annotations.txt').write_text('\n'.join(ann))
    x, y = load_arrays('tinyimagenet', 'train', data_dir=tmp_path)
    # labels index the sorted wnids; files in numeric order (2 before 10)
    assert y.tolist() == [0, 0, 0, 1, 1, 1] and x.shape == (6, 3, 64, 64)
    assert torch.equal(x[2], torch.from_numpy(imgs[('n01', 10)].transpose(2, 0, 1)))
    xv, yv = load_arrays('tinyimagenet', 'test', data_dir=tmp_path)
    assert yv.tolist() == [0, 1]  # val_0 (n01) first
    assert (tmp_path/'tinyimagenet'/'train.npz').is_file()
    import shutil; shutil.rmtree(root)
    x2, y2 = load_arrays('tinyimagenet', 'train', data_dir=tmp_path)  # served from the decoded cache
    assert torch.equal(x2, x) and torch.equal(y2, y)


def _write_idx(path, arr, gz):
    header = bytes([0, 0, 8, arr.ndim]) + b''.join(int(s).to_bytes(4, 'big') for s in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize('gz', [True, False])
def test_fashionmnist_idx(tmp_path, gz):
    d = tmp_path/'fashionmnist'; d.mkdir()
    x = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    ext = '.gz' if gz else ''
    _write_idx(d/f't10k-images-idx3-ubyte{ext}', x, gz)
    _write_idx(d/f't10k-labels-idx1-ubyte{ext}', np.array([3, 1, 4, 1, 5]), gz)
    xl, yl = load_arrays('fashionmnist', 'test', data_dir=tmp_path, verify=False)
    assert xl.shape == (5, 1, 28, 28) and torch.equal(xl[:, 0], torch.from_numpy(x)) and yl.tolist() == [3, 1, 4, 1, 5]
    with pytest.raises(ChecksumError): load_arrays('fashionmnist', 'test', data_dir=tmp_path)


@pytest.mark.skipif(not (DEBIAN_FASHION_DIR/'t10k-labels-idx1-ubyte.gz').exists(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashionmnist_from_debian_package(tmp_path):
    x, y = load_arrays('fashionmnist', 'test', data_dir=tmp_path)  # nothing under tmp_path: falls back to Debian's copy
    assert x.shape == (10000, 1, 28, 28) and y[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]


def test_digits_embedded_split():
    x, y = load_arrays('digits', 'train')
    xt, yt = load_arrays('digits', 'test')
    assert x.shape == (1437, 1, 8, 8) and xt.shape == (360, 1, 8, 8) and x.max() == 255
    assert torch.bincount(yt).tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
    mean, std = channel_stats('digits')
    xf = x.float()/255
    assert abs(xf.mean().item() - mean[0]) < 5e-4 and abs(xf.std().item() - std[0]) < 5e-4
    x2, _ = load_arrays('digits', 'train')
    x2[0] = 0  # callers get copies: mutating one does not change what the next caller sees
    assert x[0].sum() > 0 and torch.equal(load_arrays('digits', 'train')[0][0], x[0])


def test_real_cifar10_official_order(cifar_test, cifar_train):
    x, y = cifar_test
    assert x.shape == (10000, 3, 32, 32) and y[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    import os
    raw = np.load(Path(os.environ['RBLAB_DATA'])/'cifar10'/'test.npz')['x_test'][:100]
    assert torch.equal(x[:100], torch.from_numpy(raw.transpose(0, 3, 1, 2)))
    xtr, ytr = cifar_train
    assert ytr[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3] and torch.bincount(ytr).tolist() == [5000]*10
    mean, std = channel_stats('cifar10')
    xf = xtr[:10000].float()/255
    assert np.allclose(xf.mean((0, 2, 3)).numpy(), mean, atol=3e-3) and np.allclose(xf.std((0, 2, 3)).numpy(), std, atol=3e-3)


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="dataset = 'imagenet'.*cifar10"): load_arrays('imagenet', 'train')
    with pytest.raises(ConfigError, match="split = 'val'"): load_arrays('cifar10', 'val')
    with pytest.raises(DataNotFoundError) as e: load_arrays('cifar100', 'train', data_dir=tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and 'cifar-100-python' in msg and 'cifar-100-python.tar.gz' in msg and 'RBLAB_DATA' in msg
    with pytest.raises(ConfigError): num_classes('mnist')


def test_cropflip_is_a_shifted_window_of_the_padded_image():
    x = torch.rand(16, 3, 10, 10)
    for mode in ('constant', 'reflect'):
        aug = CropFlip(padding=3, mode=mode)
        out = aug(x, torch.Generator().manual_seed(5))
        oy, ox, fl = aug.params(16, torch.Generator().manual_seed(5)).unbind(1)
        xp = F.pad(x, (3, 3, 3, 3), mode=mode)
        for i in range(16):
            win = xp[i, :, oy[i]:oy[i]+10, ox[i]:ox[i]+10]
            assert torch.equal(out[i], win.flip(-1) if fl[i] else win)
        assert 0 < fl.sum() < 16 and len(set(oy.tolist())) > 1


def test_loader_resume_subset_and_layout():
    x, y = load_arrays('digits', 'train')
    dl = Loader(x, y, batch_size=64, shuffle=True, augment=CropFlip(1, False), seed=3, n=1000, channels_last=True)
    assert len(dl) == 16
    dl.set_epoch(2)
    full = list(dl)
    resumed = list(dl.batches(2, start=7))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[7:], resumed))
    assert sorted(torch.cat([b[1] for b in full]).tolist()) == sorted(y[:1000].tolist())  # each point once per epoch
    assert full[0][0].is_contiguous(memory_format=torch.channels_last)
    same_seed = Loader(x, y, batch_size=64, shuffle=True, augment=CropFlip(1, False), seed=3, n=1000)
    assert torch.equal(next(same_seed.batches(2))[0], full[0][0])
    with pytest.raises(ConfigError, match='n = 5000'): Loader(x, y, n=5000)
    with pytest.raises(ConfigError, match='batch_size'): Loader(x, y, batch_size=0)
    with pytest.raises(ConfigError, match='device'): Loader(x, y, device='gpu')


def test_dataset_infos_are_consistent():
    for name in ('cifar10', 'cifar100', 'svhn', 'tinyimagenet', 'fashionmnist', 'digits'):
        info = dataset_info(name)
        assert len(info.mean) == len(info.std) == info.channels
