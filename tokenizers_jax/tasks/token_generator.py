"""What every generator trained on a token export shares (MaskGIT, DetailFlow's GPT).

`TokenGeneratorTask` checks the data section (`data.name = "tokens"`, `data.path` set), checks
the manifest of each export the run reads (data.path and data.eval_path) with the subclass's
`check_export`, and finds the tokenizer that decodes the periodic evaluation's samples:
`eval.tokenizer`, else the one recorded in the export's manifest (only when the run evaluates,
eval.every > 0). The tokenizer is loaded on first use and checked with `check_tokenizer_model`.
"""

from __future__ import annotations

import abc
import os
from typing import Any

import ml_collections

from tokenizers_jax import api
from tokenizers_jax.data import tokens as token_data
from tokenizers_jax.tasks.base import Batch, Task


class TokenGeneratorTask(Task):
    """A class-conditional generator trained on exported tokens (see the module docstring).

    Subclasses set `title` (names the model in messages), build what `check_export` needs
    before calling `__init__`, and implement `check_export` and `check_tokenizer_model`.

    Attributes:
      manifests: export directory -> its manifest, for data.path and data.eval_path.
    """

    title = "this generator"

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        if config.data.name != "tokens":
            raise ValueError(f"{self.title} trains on a token export, not data.name="
                             f"{config.data.name!r}: set --config.data.name=tokens "
                             "--config.data.path=DIR (python -m tokenizers_jax.export_tokens)")
        if not config.data.path:
            raise ValueError(f"{self.title} trains on a token export: set "
                             "--config.data.path=DIR (written by python -m "
                             "tokenizers_jax.export_tokens)")
        self.manifests = {path: token_data.load_manifest(path)
                          for path in (config.data.path, config.data.eval_path) if path}
        for path, manifest in self.manifests.items():
            self.check_export(path, manifest)
        self._tokenizer_path = self._resolve_tokenizer() if config.eval.every > 0 else ""
        self._tokenizer: api.Tokenizer | None = None

    @abc.abstractmethod
    def check_export(self, path: str, manifest: dict[str, Any]) -> None:
        """Raises ValueError naming every mismatch unless the export fits the model."""

    @abc.abstractmethod
    def check_tokenizer_model(self, tokenizer_model: ml_collections.ConfigDict | dict,
                              what: str) -> None:
        """Raises ValueError unless a tokenizer's `model` config section makes this model's
        tokens; `what` names the tokenizer in the message."""

    def _resolve_tokenizer(self) -> str:
        """The tokenizer that decodes evaluation samples: eval.tokenizer, else the export's."""
        if self.config.eval.get("tokenizer"):
            return self.config.eval.tokenizer
        recorded = [m["tokenizer"]["path"] for m in self.manifests.values()]
        if recorded and os.path.isdir(recorded[0]):
            return recorded[0]
        where = f" (the token export names {recorded[0]}, which is gone)" if recorded else ""
        raise ValueError(f"the evaluation decodes samples with the tokenizer of the tokens, but "
                         f"none was found{where}: pass --config.eval.tokenizer=DIR, or "
                         "--config.eval.every=0 to train without evaluation")

    @property
    def evaluates(self) -> bool:
        """Whether the run decodes evaluation samples (it has a tokenizer for them)."""
        return bool(self._tokenizer_path)

    @property
    def tokenizer(self) -> api.Tokenizer:
        """The tokenizer of the evaluation (loaded once, checked against the config)."""
        if self._tokenizer is None:
            tokenizer = api.load_tokenizer(self._tokenizer_path)
            self.check_tokenizer_model(tokenizer.config.model,
                                       f"the tokenizer {self._tokenizer_path}")
            self._tokenizer = tokenizer
        return self._tokenizer

    @staticmethod
    def batch_images(batch: Batch) -> None:
        """Token batches have no input images (the grid rows come from `evaluate`)."""
        return None
