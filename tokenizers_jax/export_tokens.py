"""Token export entry point: encode a dataset once, for training generators on the tokens.

    python -m tokenizers_jax.export_tokens --tokenizer=DIR --config=configs/export_tokens.py \
        --output=OUT [--config.data.data_dir=... --config.export.batch_size=256 ...]

DIR is a model directory or a training workdir (its latest EMA params). --config chooses the
images (`data`, as for training) and the export options (`export`); a config without an
`export` section (e.g. the tokenizer's own training config) gets the defaults. Re-running the
same command resumes an interrupted export. On several processes add --distributed (or the
explicit flags); each process encodes its share of the shards. Train on the result with
--config.data.name=tokens --config.data.path=OUT. See `tokenizers_jax.token_export`. Errors
and exit statuses follow `tokenizers_jax.cli`.
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from tokenizers_jax import cli, distributed, token_export

_TOKENIZER = flags.DEFINE_string("tokenizer", None, "model directory or training workdir")
_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/export_tokens.py[:variant]",
                                          lock_config=True)
_OUTPUT = flags.DEFINE_string("output", None, "directory of the export (created; resumed)")
flags.adopt_module_key_flags(distributed)
flags.adopt_module_key_flags(cli)
flags.mark_flags_as_required(["tokenizer", "config", "output"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    distributed.initialize_from_flags()
    manifest = token_export.export_tokens(_TOKENIZER.value, _CONFIG.value, _OUTPUT.value)
    if manifest is not None:
        summary = {k: manifest[k] for k in ("kind", "num_examples", "token_shape", "dtype",
                                            "codebook_size", "num_classes")}
        print(json.dumps(dict(output=_OUTPUT.value, **summary)), flush=True)


if __name__ == "__main__":
    cli.run(main)
