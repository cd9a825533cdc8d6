"""`align <command>`: the stages of the registry (`align/stages/registry.py`) and the tools, imported lazily so
`align --help` is instant.

Each command module (a stage record's `entry`, a tool's module) exposes `main(argv: list[str]) -> int`. A user
mistake anywhere raises `AlignError`, printed here as one `error: ...` line with exit code 2; anything else is our bug
and keeps its traceback.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import sys

from align import __version__
from align.errors import AlignError
from align.stages import registry

# The commands that are no stage: (module with `main(argv) -> int`, one-line help). The stages come from the
# registry (`align/stages/registry.py`), listed first, in chain order.
TOOLS: dict[str, tuple[str, str]] = {
    "run": ("align.chain", "run a whole chain recipe: pretrain -> sft -> rank -> reward -> ppo"),
    "generate": ("align.generation.generate", "sample text or chat replies from a model dir or Hub id"),
    "score": ("align.evaluation.score", "score prompt/response pairs with a reward model or a gold labeler"),
    "push": ("align.hub.push", "push a stage (or a whole run) to the Hugging Face Hub with a model card"),
    "inspect": ("align.inspect.cli", "look inside a model: attention heatmaps per layer/head vs gradient attribution"),
}


def commands() -> dict[str, str]:
    """Every command and its one-line help: the registered stages, then the tools."""
    return {**{s.name: s.help for s in registry.stages()}, **{name: help_ for name, (_, help_) in TOOLS.items()}}


def _usage() -> str:
    lines = [
        f"align {__version__}: the InstructGPT recipe on Hugging Face.",
        "",
        "usage: align <command> [--config RECIPE.yaml] [--key value ...]",
        "       accelerate launch --config_file accelerate_config.yaml -m align <command> ...",
        "",
        "commands:",
    ]
    listed = commands()
    width = max(map(len, listed))
    for name, help_ in listed.items():
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
    known = list(commands())
    if name not in known:
        hint = difflib.get_close_matches(name, known, n=1)
        fix = f"did you mean '{hint[0]}'?" if hint else f"choose one of: {', '.join(known)}."
        print(f"error: unknown command '{name}'; {fix}", file=sys.stderr)
        return 2
    _setup_logging()
    try:
        stage = registry.find(name)
        if stage is not None:
            return stage.main(rest)
        return int(importlib.import_module(TOOLS[name][0]).main(rest) or 0)
    except AlignError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted. Rerun the same command to resume from the last checkpoint.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
