"""PyTorch re-statements of the original models: the numerical references of the parity tests
and the eager-PyTorch side of `python -m tokenizers_jax.benchmark ... --compare-torch`.

  flowmo      FlowMo (written from the behavioural spec, original module and key names).
  detailflow  the DetailFlow forward on a state dict with the original key names.
  detailflow_gpt  DetailFlow's GPT: forward, guided generation logits and sampling.

They need PyTorch (`pip install -e ".[test]"`, CPU build is enough). Importing this package
does not import torch; importing a submodule does (`import_torch` gives a clear error).
"""

from __future__ import annotations

import importlib
from types import ModuleType


def import_torch() -> ModuleType:
    """`torch`, or an ImportError that says how to install it."""
    try:
        return importlib.import_module("torch")
    except ImportError as error:
        raise ImportError(
            "the PyTorch references need torch: pip install torch --index-url "
            "https://download.pytorch.org/whl/cpu (or pip install -e '.[test]')") from error
