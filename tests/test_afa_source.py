"""AFA Stage II on a separately trained source model's examples (issue 29): `afa_samples='transfer'` trains the weight
generator on PGD examples of the `afa_source` run's model, the mechanism probe logs W1(eps) on that model's examples as a
third curve (flagged when flat), and a missing, untrained or incompatible source is a clear error before any training."""
import json
import shutil

import pytest

from robustbench_lab.core import ConfigError
from robustbench_lab.train import train

TINY = dict(dataset='digits', arch='small_cnn', width=8, n_train=256, epochs=1, batch_size=64, n_eval=32, n_report=32, hider_n=32,
            steps=2, progress=False)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp('afa-source')
    source = train(**TINY, runs_dir=str(d), run_name='source', method='standard', objective='clean')
    stage1 = train(**TINY, runs_dir=str(d), run_name='stage1', method='afa', afa_K=2, afa_stage=1)
    return d, source, stage1


def test_stage2_on_transfer_examples_logs_the_source_curve(runs):
    d, source, stage1 = runs
    s2 = train(**TINY, runs_dir=str(d), run_name='s2-transfer', method='afa', afa_K=2, afa_stage=2, afa_from=str(stage1.dir),
               afa_samples='transfer', afa_source=str(source.dir), probe_n=16)
    last = s2.metrics[-1]
    assert len(last['probe_w1_source_mean']) == len(last['probe_eps']) == 9 and 'probe_rho_source' in last
    assert isinstance(last['probe_flat_source'], bool)
    codes = [f['code'] for f in s2.report.flags]
    assert ('weight_generator_flat_on_source' in codes) == last['probe_flat_source']
    cfg = json.loads((s2.dir/'config.json').read_text())['method']['settings']
    assert cfg['afa_samples'] == 'transfer' and cfg['afa_source'] == str(source.dir)
    # a source with the white-box samples: the third curve is logged all the same
    s2b = train(**TINY, runs_dir=str(d), run_name='s2-fused', method='afa', afa_K=2, afa_stage=2, afa_from=str(stage1.dir),
                afa_source=str(source.dir), probe_n=16)
    assert 'probe_w1_source_mean' in s2b.metrics[-1]


def test_a_missing_untrained_or_incompatible_source_is_refused_before_training(runs, tmp_path):
    d, source, stage1 = runs
    s2 = dict(TINY, runs_dir=str(tmp_path), method='afa', afa_K=2, afa_stage=2, afa_from=str(stage1.dir), afa_samples='transfer')
    with pytest.raises(ConfigError, match="afa_source='<run name or folder>'"): train(**s2, run_name='a')
    with pytest.raises(ConfigError, match="afa_source = 'nowhere': no run folder"): train(**s2, afa_source='nowhere', run_name='b')
    other = tmp_path/'other'
    shutil.copytree(source.dir, other)
    cfg = json.loads((other/'config.json').read_text()); cfg['run']['dataset'] = 'fashionmnist'
    (other/'config.json').write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="trained on 'fashionmnist'; this run is on 'digits'"): train(**s2, afa_source=str(other), run_name='c')
    untrained = tmp_path/'untrained'
    untrained.mkdir(); shutil.copy(source.dir/'config.json', untrained/'config.json')
    with pytest.raises(ConfigError, match='holds no trained model'): train(**s2, afa_source=str(untrained), run_name='d')
    with pytest.raises(ConfigError, match='only Stage II'): train(**dict(s2, afa_stage=1, afa_samples='fused'), afa_source=str(source.dir), run_name='e')
    assert not any((tmp_path/n).exists() for n in 'abcde')
