"""Architectures: published sizes, shapes, the feature hook, MultiBN routing, and the real-weights fixture."""
from functools import partial

import pytest
import torch
import torch.nn as nn

from robustbench_lab.core import ConfigError
from robustbench_lab.data import channel_stats
from robustbench_lab.models import (MultiBN, Normalize, bn_branch, count_parameters, create_model, multibn_layers,
                                    set_bn_branch)

# Published sizes (CIFAR-10 heads): PreActResNet-18 11.17M (with the Rice et al. final BN), ResNet-18 11.17M,
# ResNet-34 21.28M, ResNet-50 23.52M, WRN-34-10 46.16M, WRN-28-10 36.48M, WRN-16-8 10.96M, VGG-16-BN 14.73M.
PUBLISHED = {'preact_resnet18': 11_172_170, 'resnet18': 11_173_962, 'resnet34': 21_282_122, 'resnet50': 23_520_842,
             'wrn-34-10': 46_160_474, 'wrn-28-10': 36_479_194, 'wrn-16-8': 10_961_370, 'vgg16': 14_728_266}


@pytest.mark.parametrize('arch', sorted(PUBLISHED))
def test_parameter_counts_match_published(arch):
    assert count_parameters(create_model(arch)) == PUBLISHED[arch]


@pytest.mark.parametrize('arch,dataset', [('small_cnn', 'digits'), ('preact_resnet18', 'cifar100'), ('resnet50', 'svhn'),
                                          ('wrn-16-2', 'fashionmnist'), ('vgg16', 'cifar10'), ('resnet18', 'tinyimagenet')])
def test_shapes_and_feature_hook(arch, dataset):
    from robustbench_lab.data import dataset_info
    info = dataset_info(dataset)
    m = create_model(arch, dataset).eval()
    x = torch.rand(2, info.channels, info.size, info.size)
    f = m.forward_features(x)
    assert f.shape == (2, m.feature_dim) and torch.allclose(m.forward_head(f), m(x))
    assert m(x).shape == (2, info.num_classes)


def test_normalize_is_the_first_layer():
    torch.manual_seed(0)
    raw = create_model('small_cnn', 'cifar10', normalize=False).eval()
    norm = create_model('small_cnn', 'cifar10').eval()
    norm.load_state_dict(raw.state_dict())  # Normalize's buffers are not part of the state dict
    x = torch.rand(3, 3, 32, 32)
    mean, std = channel_stats('cifar10')
    assert torch.allclose(norm(x), raw(Normalize(mean, std)(x)), atol=1e-5)


@pytest.mark.parametrize('arch', ['small_cnn', 'preact_resnet18', 'resnet18', 'wrn-16-2', 'vgg16'])
def test_multibn_replaces_every_batchnorm(arch):
    plain = create_model(arch)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    m = create_model(arch, norm_layer=partial(MultiBN, K=3))
    assert len(multibn_layers(m)) == n_bn
    m.train()
    x = torch.rand(4, 3, 32, 32)
    stats = lambda k: torch.cat([l.bns[k].running_mean for l in multibn_layers(m)])
    before = [stats(k).clone() for k in range(3)]
    with bn_branch(m, 1): m(x)
    assert torch.equal(stats(0), before[0]) and torch.equal(stats(2), before[2]) and not torch.equal(stats(1), before[1])


def test_bad_input():
    with pytest.raises(ConfigError, match="arch = 'resnet9'.*preact_resnet18"): create_model('resnet9')
    with pytest.raises(ConfigError, match='K = 0'): MultiBN(8, K=0)
    with pytest.raises(ConfigError, match='dataset'): create_model('resnet18', 'imagenet')
    with pytest.raises(ConfigError, match='no MultiBN'): set_bn_branch(create_model('small_cnn'), 1)
    with pytest.raises(ConfigError, match='branch = 2'): MultiBN(4, K=2).set_branch(2)


def test_reference_resnet18_accuracy_on_first_500(reference_model, cifar_test):
    x, y = cifar_test
    with torch.no_grad():
        pred = torch.cat([reference_model(x[i:i + 250].float()/255).argmax(1) for i in (0, 250)])
    acc = (pred == y[:500]).float().mean().item()
    assert acc >= 0.94, acc
