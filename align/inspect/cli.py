"""`align inspect <what> MODEL ...`: look inside a stage's model. Subcommands are imported lazily, like `align.cli`.

    align inspect attention runs/tiny/sft --prompt "write a story about tom ." --response "tom has a red ball ."
    align inspect attention runs/tiny/reward --prompt P --response R     # which tokens the score reads
    align inspect embeddings runs/tiny/pretrain --word2vec --random_init  # what the input embeddings learned

Each subcommand module exposes `main(argv) -> int` and writes its files under `--output_dir`.
"""

from __future__ import annotations

import difflib
import importlib

from align.errors import AlignError

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "attention": (
        "align.inspect.attention",
        "attention heatmaps per layer/head, entropy, and how well attention ranks tokens as gradients do",
    ),
    "embeddings": (
        "align.inspect.embeddings",
        "input embeddings: neighbours, analogies, a 2-D map, class grouping; beside word2vec and random weights",
    ),
}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: align inspect <what> MODEL [options]", "", __doc__.strip().split("\n")[0], "", "what:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "`align inspect <what> --help` describes its options and outputs."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        hint = difflib.get_close_matches(name, list(SUBCOMMANDS), n=1)
        fix = f"did you mean '{hint[0]}'?" if hint else f"choose one of: {', '.join(SUBCOMMANDS)}."
        raise AlignError(f"align inspect: unknown subcommand '{name}'; {fix}")
    return int(importlib.import_module(SUBCOMMANDS[name][0]).main(rest) or 0)
