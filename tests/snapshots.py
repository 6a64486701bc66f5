"""A folder's every file and sub-folder, to show a reader left it as it was.

The one definition lives with the hostile-input replay, which checks the same;
`flip_a_byte` damages a checkpoint step the way a bad disk would.
"""

import pathlib

# Re-exported: the tests call `snapshots.snapshot`.
from experiments.hostile_inputs import snapshot  # noqa: F401


def flip_a_byte(step_dir: pathlib.Path) -> None:
  """Inverts one byte in the middle of the largest file under `step_dir`."""
  biggest = max((p for p in step_dir.rglob('*') if p.is_file()),
                key=lambda p: p.stat().st_size)
  data = bytearray(biggest.read_bytes())
  data[len(data) // 2] ^= 0xFF
  biggest.write_bytes(bytes(data))
