"""COCO box AP of DETR's detections, with pycocotools (as the release).

`coco_ap` scores detections `(image_id, category_id, x0, y0, x1, y1,
score)` in pixels of the original images against an `instances_*.json`,
and returns the twelve numbers of `COCOeval.summarize()` by name.
"""

import contextlib
import io
from typing import Dict, Iterable, List, Mapping

import numpy as np

# The order of `COCOeval.stats` for boxes.
STAT_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10',
              'AR100', 'ARs', 'ARm', 'ARl')


def detections_of(predictions: Mapping[str, np.ndarray],
                  image_ids: np.ndarray, valid: np.ndarray = None
                  ) -> List[Dict]:
  """COCO result records of a batch of `post_process` outputs.

  Args:
    predictions: `scores (B, Q)`, `labels (B, Q)` (category ids), `boxes
      (B, Q, 4)` `(x0, y0, x1, y1)` in pixels.
    image_ids: `(B,)` COCO image ids.
    valid: `(B,)` bool, False on batch padding; default all.

  Returns:
    `{'image_id', 'category_id', 'bbox': [x, y, w, h], 'score'}` records.
  """
  records = []
  for b, image_id in enumerate(np.asarray(image_ids)):
    if valid is not None and not valid[b]:
      continue
    boxes = np.asarray(predictions['boxes'][b], np.float64)
    for score, label, (x0, y0, x1, y1) in zip(predictions['scores'][b],
                                              predictions['labels'][b],
                                              boxes):
      records.append({'image_id': int(image_id), 'category_id': int(label),
                      'bbox': [x0, y0, x1 - x0, y1 - y0],
                      'score': float(score)})
  return records


def coco_ap(ann_file: str, detections: Iterable[Dict],
            verbose: bool = False) -> Dict[str, float]:
  """pycocotools' box metrics of `detections` on the images of `ann_file`.

  Only images that have detections are scored (a subset run scores its
  subset); with none at all every metric is 0.

  Returns:
    `{'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', ...}` in [0, 1]
    (-1 where pycocotools finds no object of that size).
  """
  from pycocotools import coco  # pylint: disable=g-import-not-at-top
  from pycocotools import cocoeval  # pylint: disable=g-import-not-at-top
  detections = list(detections)
  if not detections:
    return {name: 0.0 for name in STAT_NAMES}
  quiet = (contextlib.nullcontext() if verbose
           else contextlib.redirect_stdout(io.StringIO()))
  with quiet:
    truth = coco.COCO(ann_file)
    result = truth.loadRes(detections)
    evaluator = cocoeval.COCOeval(truth, result, 'bbox')
    evaluator.params.imgIds = sorted({d['image_id'] for d in detections})
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  return dict(zip(STAT_NAMES, map(float, evaluator.stats)))
