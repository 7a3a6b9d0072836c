r"""Class-conditional samples of a generator: a PNG grid and the ADM evaluator's .npz.

    python -m tokenizers_jax.sample --generator DIR [--tokenizer DIR] --num-samples 50000 \
        [--classes all | 207,360,388] [--cfg 1.45] [--sampling temperature=1.0 ...] \
        [--seed 0] [--batch-size 64] --output OUT

DIR is a generator's model directory or training workdir (its latest EMA params); --tokenizer
decodes its tokens (default: the tokenizer recorded by its token export). Sample i has class
classes[i % len(classes)] and its own random key, so the samples do not depend on the batch
size. --cfg and --sampling override fields of the generator's `sampler` config section for
this run. Writes OUT/samples.npz (arr_0 uint8 [N, H, W, 3], arr_1 labels) and OUT/grid.png;
re-running the same command resumes an interrupted run (see `tokenizers_jax.generation`).
Errors and exit statuses follow `tokenizers_jax.cli`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from tokenizers_jax import adm_npz, api, cli, generation


def parse_classes(text: str) -> list[int] | None:
    """'all' -> None (every class); '1,2,3' -> [1, 2, 3]."""
    if text.strip().lower() == "all":
        return None
    try:
        classes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'all' or comma-separated class ids such as 1,2,3, got {text!r}") from None
    if not classes:
        raise argparse.ArgumentTypeError("no class ids given")
    return classes


def parse_setting(text: str) -> tuple[str, Any]:
    """'KEY=VALUE' -> (KEY, VALUE as JSON: number, true/false, string otherwise)."""
    key, separator, value = text.partition("=")
    if not separator or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), {"True": True, "False": False}.get(value, value)


def add_sampling_arguments(parser: argparse.ArgumentParser, num_samples: int | None = None):
    """The generator and sampling flags shared with `evaluate_generation`."""
    parser.add_argument("--generator", required=True,
                        help="generator model directory or training workdir")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer that decodes its tokens (default: the one recorded by "
                             "its token export)")
    parser.add_argument("--num-samples", type=int, required=num_samples is None,
                        default=num_samples, help="number of samples N" + (
                            "" if num_samples is None else f" (default {num_samples})"))
    parser.add_argument("--classes", type=parse_classes, default=None,
                        help="'all' (default) or class ids 1,2,3; sample i has class "
                             "classes[i %% len(classes)]")
    parser.add_argument("--cfg", type=float, default=None,
                        help="classifier-free guidance scale (the sampler's `cfg`)")
    parser.add_argument("--sampling", type=parse_setting, action="append", default=[],
                        metavar="KEY=VALUE", help="override a field of the generator's sampler "
                                                  "(repeatable), e.g. temperature=1.0")
    parser.add_argument("--seed", type=int, default=0, help="sample i draws from "
                                                            "fold_in(PRNGKey(seed), i)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="samples per generator call (may change when resuming)")


def sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    sampling = dict(args.sampling)
    if len(sampling) != len(args.sampling):
        raise ValueError("a --sampling field is given twice")
    if args.cfg is not None:
        if "cfg" in sampling:
            raise ValueError("give the guidance scale once: --cfg or --sampling cfg=...")
        sampling["cfg"] = args.cfg
    return sampling


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenizers_jax.sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_arguments(parser)
    parser.add_argument("--output", required=True, help="output directory OUT (resumed)")
    args = parser.parse_args(argv)
    sampling = sampling_overrides(args)
    generator = api.load_generator(args.generator, tokenizer=args.tokenizer)
    path = generation.generate_samples(generator, args.output, args.num_samples, args.classes,
                                       seed=args.seed, batch_size=args.batch_size,
                                       sampling=sampling)
    shape, _ = adm_npz.array_shape(path)
    grid = os.path.join(os.path.dirname(path), generation.GRID_FILE)
    print(json.dumps(dict(samples=path, grid=grid, shape=list(shape))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli.call(main))
