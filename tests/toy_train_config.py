"""A --config file for command-line tests: the toy task of `training_toy` on 8x8 photo crops.

Loading it registers the toy task in the process that loads it (the trainer), so
`python -m tokenizers_jax.train --config=tests/toy_train_config.py` trains in seconds. Needs
tests/ on PYTHONPATH.
"""

import training_toy


def get_config(arg: str = ""):
    del arg
    return training_toy.toy_config(num_steps=4)
