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
    "generate": ("align.generation.generate", "sample text or chat replies from a model dir or Hub id"),
    "score": ("align.evaluation.score", "score prompt/response pairs with a reward model or a gold labeler"),
    "push": ("align.hub.push", "push a stage (or a whole run) to the Hugging Face Hub with a model card"),
    "inspect": ("align.inspect.cli", "look inside a model: attention heatmaps per layer/head vs gradient attribution"),
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
        if name == "ppo":
            _huge_pages_for_mapped_heap(rest)
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.main(rest) or 0)
    except AlignError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted. Rerun the same command to resume from the last checkpoint.", file=sys.stderr)
        return 130


def _huge_pages_for_mapped_heap(argv: list[str]) -> None:
    """Set THP_MEM_ALLOC_ENABLE=1 (PyTorch's transparent huge pages for CPU tensors of 2 MB or more) when a PPO run
    sets `malloc_mmap_threshold` and the environment does not choose: mapped blocks are faulted in and zeroed
    afresh, and huge pages make that cheap (SmolLM2-135M PPO, 2-core AMD EPYC: 1.34x slower per epoch without them,
    0.9x the default heap's time with them). PyTorch reads the variable at its first allocation, so it must be set
    before torch loads: here, not in the trainer. THP_MEM_ALLOC_ENABLE=0 opts out."""
    if "THP_MEM_ALLOC_ENABLE" in os.environ or not sys.platform.startswith("linux"):
        return
    threshold = None
    for i, arg in enumerate(argv):
        if arg.startswith("--malloc_mmap_threshold="):
            threshold = arg.split("=", 1)[1]
        elif arg == "--malloc_mmap_threshold" and i + 1 < len(argv):
            threshold = argv[i + 1]
    if threshold is None:
        from align.config import find_config, load_recipe  # neither loads torch

        try:
            config = find_config(argv)
            threshold = load_recipe(config).get("malloc_mmap_threshold") if config is not None else None
        except AlignError:
            return  # the stage reports a bad command line or recipe with its file and line
    if threshold in (None, "", "null", "None"):
        return
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    logging.getLogger("align.cli").info(
        "ppo: THP_MEM_ALLOC_ENABLE=1 (PyTorch's huge pages for CPU tensors of 2 MB or more): malloc_mmap_threshold "
        "maps blocks afresh and huge pages make that cheap. Set THP_MEM_ALLOC_ENABLE=0 to opt out."
    )


if __name__ == "__main__":
    sys.exit(main())
