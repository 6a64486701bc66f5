"""DETR's matching and losses against the release (golden `detr_model`).

The predictions are the golden's own `pred_logits`/`pred_boxes`/`auxJ/*`,
so no model runs here. Targets are padded to a fixed count, as the training
step feeds them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from irpe_jax.models import detr_criterion
from irpe_jax.models import detr_matcher
import golden

CASE, ARRAYS = golden.cases('detr_model')[0]
PAD_TO = 5
CRITERION = jax.jit(detr_criterion.set_criterion)
ASSIGN = jax.jit(detr_matcher.assign)


def golden_outputs():
  aux = [{'pred_logits': ARRAYS[f'aux{j}/pred_logits'],
          'pred_boxes': ARRAYS[f'aux{j}/pred_boxes']}
         for j in range(CASE['dec_layers'] - 1)]
  return {'pred_logits': ARRAYS['pred_logits'],
          'pred_boxes': ARRAYS['pred_boxes'], 'aux_outputs': aux}


def golden_targets(pad_to=PAD_TO):
  batch = ARRAYS['pred_logits'].shape[0]
  labels = np.zeros((batch, pad_to), np.int32)
  boxes = np.zeros((batch, pad_to, 4), np.float32)
  valid = np.zeros((batch, pad_to), bool)
  for b in range(batch):
    lab = ARRAYS[f'target{b}/labels']
    labels[b, :len(lab)] = lab
    boxes[b, :len(lab)] = ARRAYS[f'target{b}/boxes_cxcywh']
    valid[b, :len(lab)] = True
  return {'labels': labels, 'boxes': boxes, 'valid': valid}


@pytest.fixture(scope='module')
def losses():
  return jax.device_get(CRITERION(golden_outputs(), golden_targets()))


def test_matches_are_the_release_matches(losses):
  for b in range(ARRAYS['pred_logits'].shape[0]):
    pred_idx = ARRAYS[f'match{b}/pred_idx']
    target_idx = ARRAYS[f'match{b}/target_idx']
    np.testing.assert_array_equal(losses['matches'][b, target_idx], pred_idx)


@pytest.mark.parametrize('name', sorted(CASE['losses']))
def test_losses_are_the_release_losses(losses, name):
  np.testing.assert_allclose(losses[name], CASE['losses'][name], rtol=1e-5,
                             atol=1e-6)


def test_only_the_release_losses_and_the_total_come_back(losses):
  assert set(losses) == set(CASE['losses']) | {'loss', 'matches'}
  expected = sum(CASE['losses'][f'loss_ce{s}'] + 5 * CASE['losses'][
      f'loss_bbox{s}'] + 2 * CASE['losses'][f'loss_giou{s}']
                 for s in [''] + [f'_{j}' for j in range(5)])
  np.testing.assert_allclose(losses['loss'], expected, rtol=1e-5)


def test_padding_more_does_not_change_the_losses(losses):
  more = jax.device_get(jax.jit(detr_criterion.set_criterion)(
      golden_outputs(), golden_targets(pad_to=9)))
  for name in CASE['losses']:
    np.testing.assert_allclose(more[name], losses[name], rtol=1e-6)


def test_images_without_targets_give_finite_losses_and_gradients():
  outputs = {k: jnp.asarray(v) for k, v in golden_outputs().items()
             if k != 'aux_outputs'}
  targets = {k: np.zeros_like(v) for k, v in golden_targets().items()}

  def loss(outputs):
    return detr_criterion.set_criterion(outputs, targets)['loss']
  value, grads = jax.value_and_grad(loss)(outputs)
  assert np.isfinite(value)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  # Every query should then say no-object: only the CE has a gradient.
  assert np.abs(grads['pred_boxes']).max() == 0


def test_box_count_is_summed_over_devices():
  targets = golden_targets()
  count = jax.vmap(lambda t: detr_criterion.num_boxes(t, 'd'),
                   axis_name='d')(jax.tree.map(lambda x: x[:, None],
                                               targets))
  np.testing.assert_array_equal(count, [5, 5])


@pytest.mark.parametrize('seed', range(6))
def test_assignment_is_scipy_linear_sum_assignment(seed):
  rng = np.random.default_rng(seed)
  targets, queries = [(1, 7), (4, 7), (7, 7), (3, 12), (5, 12), (12, 12)][seed]
  valid_count = rng.integers(0, targets + 1)
  cost = rng.normal(size=(targets, queries)).astype(np.float32)
  valid = np.arange(targets) < valid_count
  # Padded rows hold garbage the assignment must ignore.
  cost[~valid] = rng.normal(size=cost[~valid].shape) * 100
  got = np.asarray(ASSIGN(cost, valid))
  assert len(set(got.tolist())) == targets
  rows, cols = optimize.linear_sum_assignment(cost[valid])
  np.testing.assert_array_equal(got[rows], cols)


def test_more_targets_than_queries_is_refused():
  outputs = {'pred_logits': np.zeros((1, 3, 5)), 'pred_boxes':
             np.full((1, 3, 4), 0.5)}
  targets = {'labels': np.zeros((1, 4), int), 'boxes': np.full((1, 4, 4), .5),
             'valid': np.ones((1, 4), bool)}
  with pytest.raises(ValueError, match=r'T=4 .* Q=3'):
    detr_matcher.hungarian_match(outputs, targets)


def test_generalized_iou_of_known_boxes():
  a = np.array([[0., 0., 2., 2.]])
  b = np.array([[0., 0., 2., 2.], [1., 1., 3., 3.], [3., 0., 4., 1.]])
  np.testing.assert_allclose(
      detr_matcher.generalized_box_iou(a, b),
      [[1.0, 1 / 7 - (9 - 7) / 9, 0 - (8 - 5) / 8]], rtol=1e-6)
