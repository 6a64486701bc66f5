"""The hostile-input replay (experiments.hostile_inputs): every case answered.

A minute or more of subprocesses on 2 cores, so marked slow; each of its
cases is also a unit test elsewhere (test_bad_images, test_coco_validation,
test_cli_errors, test_evaluate, test_grid_checks).
"""

import pytest

from experiments import hostile_inputs


@pytest.mark.slow
def test_every_hostile_input_gets_a_clear_answer(tmp_path, capsys):
  assert hostile_inputs.main(['--out', str(tmp_path / 'hostile')]) == 0
  out = capsys.readouterr().out
  assert 'FAILED' not in out
  assert '22 of 22 hostile inputs answered clearly.' in out
