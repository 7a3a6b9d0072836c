"""Import released PyTorch / Hugging Face weights into tokenizers_jax model directories.

  python -m tokenizers_jax.convert flowmo --checkpoint flowmo_lo.pth \
      --config configs/flowmo.py:lo --output DIR
  python -m tokenizers_jax.convert lpips|resnet50|inception|detailflow|detailflow_gpt|siglip2|dino ...

Each subcommand lives in its own module, which defines `add_arguments(parser)` and
`main(args)`; modules are imported only when their subcommand runs. Errors and exit statuses
follow `tokenizers_jax.cli` (`--verbose` anywhere shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tokenizers_jax import cli

SUBCOMMANDS = {
    "flowmo": ("tokenizers_jax.convert.flowmo", "FlowMo flowmo_lo.pth / flowmo_hi.pth"),
    "lpips": ("tokenizers_jax.convert.lpips", "LPIPS-VGG16 v0.1 (torchvision vgg16 + lpips heads)"),
    "resnet50": ("tokenizers_jax.convert.resnet50", "torchvision ResNet-50 IMAGENET1K_V1"),
    "inception": ("tokenizers_jax.convert.inception", "pytorch-fid InceptionV3 (FID)"),
    "detailflow": ("tokenizers_jax.convert.detailflow", "DetailFlow tokenizer 128/256/512.pt"),
    "detailflow_gpt": ("tokenizers_jax.convert.detailflow_gpt",
                       "DetailFlow GPT-L generator (its ema weights)"),
    "siglip2": ("tokenizers_jax.convert.siglip2", "Hugging Face SigLIP2 so400m safetensors"),
    "dino": ("tokenizers_jax.convert.dino", "DINO ViT-S/16 dino_deitsmall16_pretrain.pth"),
}


def usage() -> str:
    lines = ["usage: python -m tokenizers_jax.convert MODEL [options]", "", "MODEL is one of:"]
    lines += [f"  {name:<11} {help_text}" for name, (_, help_text) in SUBCOMMANDS.items()]
    lines += ["", "python -m tokenizers_jax.convert MODEL --help shows that converter's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"unknown model {argv[0]!r}\n", file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    parser = argparse.ArgumentParser(
        prog=f"python -m tokenizers_jax.convert {argv[0]}",
        description=module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    module.main(parser.parse_args(argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(cli.call(main))
