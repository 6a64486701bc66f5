"""A folder's every file and sub-folder, to show that a reader left it as it was."""

import hashlib
import pathlib
from typing import Dict


def snapshot(root: pathlib.Path) -> Dict[str, str]:
  """`{relative path: sha256 of the file, or 'dir'}` of everything under root."""
  root = pathlib.Path(root)
  return {str(p.relative_to(root)): ('dir' if p.is_dir() else
                                     hashlib.sha256(p.read_bytes()).hexdigest())
          for p in sorted(root.rglob('*'))}
