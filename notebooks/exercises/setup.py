"""The exercises' set-up: their first cell is `from setup import check, omoe, torch`.

It runs the learning path's set-up, ../setup.py (the project's folder on sys.path, any missing
package named), then puts this folder on sys.path too, so that check.py is found from here and
from solutions/, whose own setup.py runs this one.
"""
import os
import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = runpy.run_path(str(HERE.parent / "setup.py"))["ROOT"]
sys.path.insert(0, str(HERE))

import torch  # noqa: E402  (after the set-up has named any missing package)

import check  # noqa: E402  (check.py: it compares your functions with the project's omoe.py)
import omoe  # noqa: E402

__all__ = ["ROOT", "check", "omoe", "torch"]

torch.set_num_threads(1)  # tiny tensors: one thread is fastest
print("comparing with", os.path.relpath(omoe.__file__), "| torch", torch.__version__)
