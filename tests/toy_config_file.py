"""A config file for command-line tests: `--config=tests/toy_config_file.py` trains the toy task
of `training_toy` (a linear autoencoder on 8x8 crops) in seconds."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from training_toy import toy_config  # noqa: E402  (registers the "toy" task)


def get_config(arg: str = ""):
    del arg
    return toy_config()
