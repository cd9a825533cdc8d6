"""`align push`: the command line, and pushing a whole chain run or a stage a recipe just finished.

The single-stage push (plan, card, one commit, errors) lives in `upload.py`; this module finds a run's stages,
pushes them parents first, and parses `align push STAGE_OR_RUN_DIR (--repo_id NAME | --repo_prefix NAME) [...]`.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from align.errors import AlignError
from align.hub.lineage import resolve_parent_path
from align.hub.upload import (
    check_online,
    check_repo_id,
    check_revision,
    check_stage,
    hub_endpoint,
    push_stage,
    resolve_token,
)
from align.io import STAGE_FILE, read_stage_info
from align.stages import registry

logger = logging.getLogger(__name__)


def find_stages(run_dir: str | os.PathLike) -> list[Path]:
    """The finished stage dirs directly under `run_dir`, parents before children (InstructGPT order on ties)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = {p.resolve(): read_stage_info(p) for p in sorted(run_dir.iterdir()) if (p / STAGE_FILE).is_file()}
    order: list[Path] = []

    def parents(path: Path) -> list[Path]:
        info = found[path] or {}
        links = [info.get("parent")] + list(info.get("parents") or [])
        dirs = [resolve_parent_path(path, p) for p in links if isinstance(p, Mapping) and "path" in p]
        return [d.resolve() for d in dirs if d is not None and d.resolve() in found]

    def visit(path: Path, stack: tuple[Path, ...]) -> None:
        if path in order or path in stack:  # `in stack`: a cycle from hand-edited files; keep going, don't recurse
            return
        for parent in parents(path):
            visit(parent, (*stack, path))
        order.append(path)

    rank = {s: i for i, s in enumerate(registry.names())}
    for path in sorted(found, key=lambda p: (rank.get((found[p] or {}).get("stage"), 99), p.name)):
        visit(path, ())
    return order


def push_run(
    run_dir: str | os.PathLike,
    repo_prefix: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    dry_run_dir: str | os.PathLike | None = None,
) -> dict[str, str]:
    """Push every stage of a chain run, parents first, to `{repo_prefix}-{subdir}` (e.g. `me/tiny-sft`).

    Each card's `base_model` and lineage link to the repos pushed before it. Every stage is checked before the first
    upload; if one fails, the error lists the stages that landed.

    Returns:
        repo id -> commit URL (or dry-run dir, `dry_run_dir/<subdir>`), in push order.
    """
    run_dir = Path(run_dir)
    stages = find_stages(run_dir)
    if not stages:
        raise AlignError(
            f"{run_dir}: no finished align stages in it (subdirs with {STAGE_FILE}). Give a chain run's output dir, "
            "or push one stage with --repo_id."
        )
    check_repo_id(repo_prefix, "repo_prefix")
    repos = {}
    for path in stages:
        check_stage(path)
        repos[path] = f"{repo_prefix}-{path.name}"
        check_repo_id(repos[path], "repo_prefix")
    check_revision(revision)
    if dry_run_dir is None:
        token = resolve_token(token)
        check_online(hub_endpoint())
    pushed: dict[str, str] = {}
    done: dict[str, str] = {}
    for i, path in enumerate(stages):
        try:
            out = push_stage(
                path,
                repos[path],
                private=private,
                revision=revision,
                commit_message=commit_message,
                token=token,
                dry_run_dir=None if dry_run_dir is None else Path(dry_run_dir) / path.name,
                pushed=pushed,
            )
        except AlignError as e:
            landed = "; ".join(f"{r}: {u}" for r, u in done.items()) or "none"
            rest = ", ".join(p.name for p in stages[i + 1 :]) or "none"
            raise AlignError(
                f"{e} Pushed before this failure ({len(done)} of {len(stages)} stages): {landed}. Not attempted: "
                f"{rest}. Fix the cause and rerun: stages already pushed are committed again as new revisions."
            ) from None
        done[pushed.get(str(path.resolve()), repos[path])] = out
    return done


def push_after_stage(
    output_dir: str | os.PathLike, hub_model_id: str | None, *, private: bool, revision: str | None
) -> str:
    """`push_to_hub: true` in a stage recipe: push the finished stage (main process only). Returns the commit URL.

    With no `hub_model_id`, the repo is named after the output dir, as `transformers.Trainer` does.
    """
    repo_id = hub_model_id or Path(output_dir).resolve().name
    if not hub_model_id:
        logger.info("push_to_hub: no hub_model_id; pushing to %r (the output dir's name), as Trainer does.", repo_id)
    try:
        return push_stage(output_dir, repo_id, private=private, revision=revision)
    except AlignError as e:
        raise AlignError(
            f"{e} The stage itself finished: its output is in {output_dir}; push it later with "
            f"`align push {output_dir} --repo_id {repo_id}`."
        ) from None


# CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one AlignError line instead of argparse's usage dump + exit 2
        raise AlignError(f"align push: {message}. See `align push --help`.")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="align push",
        description=(
            "Push a finished stage dir, or every stage of a chain run, to the Hugging Face Hub with a model card\n"
            "(metadata, metrics, training curves, samples, lineage). Rank dirs go to dataset repos. Each stage is\n"
            "one commit. The token comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT selects another Hub."
        ),
        epilog=(
            "examples:\n"
            "  align push runs/tiny/sft --repo_id me/tiny-sft\n"
            "  align push runs/tiny --repo_prefix me/tiny        # me/tiny-pretrain, me/tiny-sft, ...\n"
            "  align push runs/tiny --repo_prefix me/tiny --dry_run /tmp/preview   # no network"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", metavar="STAGE_OR_RUN_DIR", help="a stage output dir, or a chain run dir of stage subdirs")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--repo_id", metavar="NAME", help="Hub repo for one stage dir, e.g. me/tiny-sft")
    target.add_argument(
        "--repo_prefix",
        metavar="NAME",
        help="for a run dir: each stage goes to NAME-<subdir>, parents first, cards linked",
    )
    p.add_argument("--private", action="store_true", help="create new repos private (existing ones keep theirs)")
    p.add_argument("--revision", metavar="BRANCH", help="commit to this branch (created from main if missing)")
    p.add_argument("--commit_message", metavar="MSG", help="commit title (default: 'align: push the <stage> stage')")
    p.add_argument(
        "--dry_run",
        metavar="DIR",
        help="write the exact folder(s) that would be uploaded into DIR and list them; no network",
    )
    return p


def _listing(root: Path) -> list[str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return [f"  {p.relative_to(root).as_posix():<48} {p.stat().st_size / 1e3:>10.1f} kB" for p in files]


def main(argv: list[str] | None = None) -> int:
    """`align push STAGE_OR_RUN_DIR (--repo_id NAME | --repo_prefix NAME) [...]`; returns the exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    path = Path(args.path)
    if not path.is_dir():
        raise AlignError(f"{path}: no such directory. Give a stage output dir or a chain run dir.")
    info = read_stage_info(path)
    kw = dict(private=args.private, revision=args.revision, commit_message=args.commit_message)
    if args.repo_id is not None:
        if info is None and find_stages(path):
            names = ", ".join(p.name for p in find_stages(path))
            raise AlignError(
                f"{path}: a run dir with stages {names}; push it with --repo_prefix NAME "
                "(repos NAME-<stage>), or give one stage dir with --repo_id."
            )
        results = {args.repo_id: push_stage(path, args.repo_id, dry_run_dir=args.dry_run, **kw)}
    else:
        if info is not None:
            stage = info.get("stage")
            raise AlignError(f"{path}: a single {stage} stage, not a run dir; push it with --repo_id NAME.")
        results = push_run(path, args.repo_prefix, dry_run_dir=args.dry_run, **kw)
    endpoint = hub_endpoint()
    for repo_id, out in results.items():
        if args.dry_run is not None:
            stage = registry.find((read_stage_info(out) or {}).get("stage"))
            prefix = "datasets/" if stage is not None and stage.repo_type == "dataset" else ""
            print(
                f"would push to {endpoint}/{prefix}{repo_id} ({'private' if args.private else 'public'}, "
                f"{args.revision or 'main'}); the folder is {out}:"
            )
            print("\n".join(_listing(Path(out))))
        else:
            print(f"{repo_id}: {out}")
    return 0
