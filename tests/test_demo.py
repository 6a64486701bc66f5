"""The offline demo (`python -m experiments.deit.demo`), in its --quick mode."""

import json

import numpy as np
import pytest
from PIL import Image

from experiments.deit import demo

PLOTS = ('learning_curves.png', 'accuracy.png', 'attention_maps.png',
         'bucket_maps.png')


def test_quick_demo_trains_every_variant_and_writes_its_outputs(tmp_path,
                                                                capsys):
  summary = demo.main(['--quick', '--out', str(tmp_path)])
  printed = capsys.readouterr().out
  variants = summary['variants']
  assert list(variants) == list(demo.VARIANTS)
  settings = demo.QUICK
  for name, result in variants.items():
    assert name in printed
    assert len(result['test_accuracy']) == settings.num_seeds
    assert all(0.0 <= a <= 1.0 for a in result['test_accuracy'])
    curves = np.asarray(result['curves']['train_loss'])
    assert curves.shape == (settings.num_seeds, settings.epochs)
    assert np.all(np.isfinite(curves))
    assert result['mean'] == np.mean(result['test_accuracy'])
  # The variants are what they say: pos_embed, then one table per block.
  dim, depth = settings.embed_dim, settings.depth
  tokens = 1 + (8 // settings.patch_size) ** 2
  head_dim, buckets = dim // settings.num_heads, 7 * 7 + 1
  count = {n: r['num_params'] for n, r in variants.items()}
  assert count['abs'] - count['none'] == tokens * dim
  assert count['irpe_k'] - count['abs'] == depth * head_dim * buckets
  assert count['irpe_qkv'] - count['abs'] == 3 * depth * head_dim * buckets
  assert 'Ordering by mean test accuracy' in printed
  # --quick says it is a smoke run, before and after its numbers.
  assert printed.count(demo.SMOKE_NOTE) == 2 and summary['smoke']
  assert '[4/4] irpe_qkv' in printed  # progress per variant.
  with open(tmp_path / 'results.json') as f:
    saved = json.load(f)
  assert saved['table'] == summary['table']
  assert set(saved['variants']) == set(demo.VARIANTS)
  for plot in PLOTS:
    with Image.open(tmp_path / plot) as image:
      assert image.size[0] > 200 and image.size[1] > 200


def test_shift_batch_translates_without_wrapping():
  images = np.zeros((2, 3, 4, 4, 1), np.float32)
  images[..., 1:3, 1:3, :] = 1.0
  shifted = demo.shift_batch(images, 1, np.random.default_rng(0))
  assert shifted.shape == images.shape
  # Every 2x2 blob survives whole, moved by at most one pixel.
  np.testing.assert_array_equal(shifted.sum(axis=(-3, -2, -1)), 4.0)
  assert np.any(shifted != images)


def test_figure5_writes_attention_by_offset_for_both_models(tmp_path,
                                                            monkeypatch,
                                                            capsys):
  from experiments.deit import figure5  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(figure5, 'SETTINGS', demo.dataclasses.replace(
      figure5.SETTINGS, embed_dim=8, depth=2, num_heads=2, mlp_ratio=1.0,
      batch_size=32, warmup_epochs=0, train_subset=64))
  out = figure5.main(['--out', str(tmp_path), '--epochs', '1',
                      '--eval_images', '4'])
  assert len(out['shares']) == 4  # two models x first and last block.
  assert all(0.0 < s <= 1.0 for s in out['shares'].values())
  # Uniform attention gives each of the 9 offsets 1/65 (64 patches + cls).
  assert out['uniform'] == pytest.approx(9 / 65)
  assert 'Share of attention within one patch' in capsys.readouterr().out
  with Image.open(out['path']) as image:
    assert image.size[0] > 400 and image.size[1] > 150
