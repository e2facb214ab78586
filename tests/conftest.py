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
