"""`align <command>`: a registry of commands, imported lazily so `align --help` is instant.

Each command module exposes `main(argv: list[str]) -> int`. A user mistake anywhere raises `AlignError`, printed here
as one `error: ...` line with exit code 2; anything else is our bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

from align import __version__
from align.errors import AlignError

# command -> (module, one-line help). Order = the InstructGPT chain, then tools.
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("align.stages.pretrain", "GPT-style generative pretraining (from scratch or continued)"),
    "sft": ("align.stages.sft", "supervised fine-tuning on demonstrations (InstructGPT step 1)"),
    "rank": ("align.stages.rank", "sample K responses per prompt and rank them (InstructGPT step 2, data)"),
    "reward": ("align.stages.reward", "train a reward model from rankings (InstructGPT step 2)"),
    "ppo": ("align.stages.ppo", "optimize the policy against the reward model with PPO (InstructGPT step 3)"),
    "classify": ("align.stages.classify", "GPT-1 discriminative fine-tuning: a causal LM becomes a text classifier"),
    "run": ("align.chain", "run a whole chain recipe: pretrain -> sft -> rank -> reward -> ppo"),
    "generate": ("align.generate", "sample text or chat replies from a model dir or Hub id"),
    "score": ("align.score", "score prompt/response pairs with a reward model or the tiny-world gold labeler"),
    "push": ("align.hub.push", "push a stage (or a whole run) to the Hugging Face Hub with a model card"),
    "inspect": ("align.inspect", "look inside a model: attention heatmaps per layer/head vs gradient attribution"),
}


def _usage() -> str:
    lines = [
        f"align {__version__}: the InstructGPT recipe on Hugging Face.",
        "",
        "usage: align <command> [--config RECIPE.yaml] [--key value ...]",
        "       accelerate launch --config_file accelerate_config.yaml -m align <command> ...",
        "",
        "commands:",
    ]
    width = max(map(len, COMMANDS))
    for name, (_, help_) in COMMANDS.items():
        lines.append(f"  {name:<{width}}  {help_}")
    lines += ["", "`align <command> --help` lists every key of that command's recipe."]
    return "\n".join(lines)


def _setup_logging() -> None:
    # Only the main process talks; accelerate sets RANK/LOCAL_RANK for the others.
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=level)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        hint = difflib.get_close_matches(name, list(COMMANDS), n=1)
        fix = f"did you mean '{hint[0]}'?" if hint else f"choose one of: {', '.join(COMMANDS)}."
        print(f"error: unknown command '{name}'; {fix}", file=sys.stderr)
        return 2
    _setup_logging()
    try:
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.main(rest) or 0)
    except AlignError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted. Rerun the same command to resume from the last checkpoint.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
