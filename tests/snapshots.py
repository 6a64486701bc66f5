"""A folder's every file and sub-folder, to show that a reader left it as it was.

The one definition lives with the hostile-input replay, which checks the same.
"""

from experiments.hostile_inputs import snapshot  # pylint: disable=unused-import
