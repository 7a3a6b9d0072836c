r"""Generation evaluation entry point: FID, sFID, IS, precision and recall of a generator.

    python -m tokenizers_jax.evaluate_generation --generator DIR [--tokenizer DIR] \
        --reference VIRTUAL_imagenet256_labeled.npz --output OUT [--num-samples 50000] \
        [--classes all] [--cfg 1.45] [--sampling KEY=VALUE ...] [--seed 0] [--batch-size 64]
    python -m tokenizers_jax.evaluate_generation reference \
        --config=configs/generation_reference.py[:variant] [--config.data.data_dir=DIR ...] \
        --output REFERENCE.npz

The first samples N class-balanced images (resumable, into OUT/samples) and scores them
against a reference batch: ADM's (see `tokenizers_jax.generation_evaluation`) or one written
by the second form from any image source of the data pipeline. Results go to OUT/metrics.json,
OUT/metrics.jsonl and OUT/tensorboard. Both need the converted Inception (--inception, default
~/.cache/tokenizers_jax/inception_fid); --allow-random-init-inception runs without it for
smoke tests and marks every output RANDOM_INIT. Errors and exit statuses follow
`tokenizers_jax.cli`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import ml_collections

from tokenizers_jax import api, cli, generation_evaluation, sample
from tokenizers_jax.config_file import load_config

_CONFIG_OVERRIDE = re.compile(r"--config\.([\w.]+)=(.*)", re.DOTALL)


def add_inception_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--inception", default=None,
                        help="converted FID Inception directory (default "
                             "~/.cache/tokenizers_jax/inception_fid or $TOKENIZERS_JAX_WEIGHTS)")
    parser.add_argument("--allow-random-init-inception", action="store_true",
                        help="random Inception weights if they are missing: every metric is "
                             "meaningless and marked RANDOM_INIT (smoke tests only)")
    parser.add_argument("--inception-batch-size", type=int, default=200,
                        help="images per Inception step")


def extractor(args: argparse.Namespace) -> generation_evaluation.InceptionExtractor:
    return generation_evaluation.InceptionExtractor.load(
        args.inception, allow_random_init=args.allow_random_init_inception,
        batch_size=args.inception_batch_size)


def with_overrides(config: ml_collections.ConfigDict, overrides: list[str],
                   parser: argparse.ArgumentParser) -> ml_collections.ConfigDict:
    """`config` with --config.a.b=VALUE overrides applied (VALUE as in --sampling)."""
    config = ml_collections.ConfigDict(config.to_dict())
    for item in overrides:
        match = _CONFIG_OVERRIDE.fullmatch(item)
        if not match:
            parser.error(f"unrecognized arguments: {item}")
        *parents, name = match[1].split(".")
        section = config
        for part in parents:
            section = section.get(part)
            if not isinstance(section, ml_collections.ConfigDict):
                parser.error(f"{item}: the config has no section {match[1].rsplit('.', 1)[0]!r}")
        if name not in section:
            parser.error(f"{item}: the config has no field {match[1]!r}")
        value = sample.parse_setting(f"{name}={match[2]}")[1]
        if isinstance(section[name], str):
            value = match[2]
        elif isinstance(section[name], float) and isinstance(value, int):
            value = float(value)
        if type(value) is not type(section[name]):
            parser.error(f"{item}: {match[1]} takes a {type(section[name]).__name__} value")
        section[name] = value
    return config


def reference_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tokenizers_jax.evaluate_generation reference",
        description="Writes a reference batch (ADM .npz format) from config.data's images.")
    parser.add_argument("--config", required=True,
                        help="configs/generation_reference.py[:variant]; override fields with "
                             "--config.a.b=VALUE")
    parser.add_argument("--output", required=True, help="the .npz to write")
    add_inception_arguments(parser)
    args, overrides = parser.parse_known_args(argv)
    try:
        config = load_config(args.config)
    except (OSError, ValueError) as e:
        parser.error(f"--config={args.config}: {e}")
    config = with_overrides(config, overrides, parser)
    summary = generation_evaluation.write_reference(config, args.output, extractor(args))
    print(json.dumps(summary), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["reference"]:
        return reference_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m tokenizers_jax.evaluate_generation",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sample.add_sampling_arguments(parser, num_samples=50_000)
    parser.add_argument("--reference", required=True, help="reference batch .npz")
    parser.add_argument("--output", required=True, help="output directory OUT (resumed)")
    parser.add_argument("--is-split-size", type=int, default=5000,
                        help="samples per Inception Score part (ADM: 5000)")
    parser.add_argument("--k", type=int, default=3, help="precision/recall neighbourhood")
    add_inception_arguments(parser)
    args = parser.parse_args(argv)
    sampling = sample.sampling_overrides(args)
    inception = extractor(args)  # fails here, before any sampling, without the weights
    generation_evaluation.read_reference(args.reference, inception.spatial_dim())  # checked
    generator = api.load_generator(args.generator, tokenizer=args.tokenizer)
    generation_evaluation.evaluate_generation(
        generator, args.reference, args.output, num_samples=args.num_samples,
        classes=args.classes, seed=args.seed, batch_size=args.batch_size, sampling=sampling,
        extractor=inception, is_split_size=args.is_split_size, k=args.k)
    return 0


if __name__ == "__main__":
    sys.exit(cli.call(main))
