"""`align run CHAIN.yaml`: the whole InstructGPT chain, pretrain -> sft -> rank -> reward -> ppo, then a report.

    align run recipes/tiny/chain.yaml
    align run recipes/tiny/chain.yaml --from reward          # rerun reward and ppo
    align run recipes/tiny/chain.yaml --only sft --sft.learning_rate 5e-4
    align run recipes/tiny/chain.yaml --report_only          # rebuild report.{md,html,json} from the stage dirs

A chain recipe sets shared keys once and lists the stages, each a stage recipe and/or inline keys:

    output_root: runs/tiny
    seed: 42                      # any other top-level key goes to every stage whose config has it
    stages:
      pretrain: recipes/tiny/pretrain.yaml
      sft: {recipe: recipes/tiny/sft.yaml, learning_rate: 1.0e-3}
      pretrain_lstm: {stage: pretrain, recipe: recipes/tiny/pretrain_lstm.yaml, optional: true}
    report: {examples: 6}         # prompts answered side by side by each model
    accelerate_config: recipes/accelerate_configs/ddp.yaml   # optional: each stage under `accelerate launch`

Every relative path (stage recipes, output_root, accelerate_config, and each stage's data, model, labeler and output
paths) is relative to the working directory, as for `align <stage>` (`align.config.PATH_RULE`); the stages run in
the same directory and get the paths unchanged, so the chain can live anywhere.

An entry named other than its stage is a variant run beside the chain (a baseline, an ablation): `stage:` says which
command runs, its output goes to `<output_root>/<name>`, its parents are wired as its stage's, and no later stage reads
it. `optional: true` runs an entry only when asked: `align run CHAIN --with pretrain_lstm`.

The runner sets each stage's `output_dir` to `<output_root>/<name>` and wires parents, as each stage record's
`parents` says (`align/stages/registry.py`): sft <- pretrain; rank policy <- sft; reward model <- sft, data <- rank;
ppo policy <- sft, reward_model_path <- reward. The resolved recipe of each stage is written to
`<output_root>/recipes/<stage>.yaml` (rerun one stage alone with `align <stage> --config` it).

Each stage runs as its own `python -m align <stage>` process (handed the stages registered in this one, a plugin's or
a test's: `registry.child_env`): its memory (models, optimizer, CUDA context) is returned
to the OS before the next stage, its logs and progress bar stream unchanged, and a kill leaves exactly what a killed
`align <stage>` leaves (checkpoints, no `align_stage.json`), which the next run resumes from. The price is one
interpreter start per stage (seconds).

Skipping: a stage is done when its `align_stage.json` exists, its recorded recipe equals the resolved one (paths
aside: `output_dir` and the wired parent keys say where, not what), and its parent is the one it was trained from
(`<output_root>/chain_state.json` keeps a hash of each parent's `align_stage.json`). Otherwise it runs; a stage dir
left by a different recipe is removed first, so no stale checkpoint is resumed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from align.config import PATH_RULE, config_class, did_you_mean, load_recipe, parse_config, recipe_dict
from align.errors import AlignError
from align.evaluation.report import check_options, write_report
from align.evaluation.stage_metrics import summary_line
from align.io import STAGE_FILE, atomic_write_json, atomic_write_text, output_lock, read_stage_info, recipe_sha256
from align.stages import registry

logger = logging.getLogger(__name__)

STATE_FILE = "chain_state.json"
CHAIN_KEYS = ("output_root", "stages", "report", "accelerate_config")
# Keys that say where a stage writes, not what it computes: left out of its fingerprint.
LOCATION_KEYS = ("output_dir", "logging_dir")


# ---------------------------------------------------------------------------------------------------------------------
# Chain recipe


@dataclass
class StagePlan:
    """One stage of a chain: its resolved recipe (stage file < shared keys < inline < command line < wiring)."""

    name: str  # the chain entry: its dir, its key in chain_state.json, what --from/--only/--NAME.key name
    stage: str  # the command that runs it: the name itself, or the `stage:` of a variant
    recipe: dict[str, Any]
    source: str  # where the stage's keys came from, for messages
    parents: list[str] = field(default_factory=list)

    @property
    def variant(self) -> bool:
        """Run beside the chain: no later stage is wired to it, so its rerun invalidates nothing."""
        return self.name != self.stage

    @property
    def output_dir(self) -> Path:
        return Path(self.recipe["output_dir"])


@dataclass
class Chain:
    path: Path
    output_root: Path
    stages: list[StagePlan]
    report: dict[str, Any]
    accelerate_config: Path | None = None  # each stage runs under `accelerate launch --config_file` this

    def plan(self, name: str) -> StagePlan:
        return next(p for p in self.stages if p.name == name)


def _config_fields(stage: str) -> set[str]:
    """The keys a stage's config accepts."""
    return {f.name for f in dataclasses.fields(config_class(stage)) if f.init}


def load_chain(
    path: str | os.PathLike,
    *,
    output_root: str | None = None,
    accelerate_config: str | None = None,
    shared: dict[str, Any] | None = None,
    per_stage: dict[str, dict[str, Any]] | None = None,
    check_keys: bool = True,
    with_optional: tuple[str, ...] = (),
) -> Chain:
    """Read a chain recipe and resolve every stage's recipe, the `optional` entries only when named in
    `with_optional`. Errors name the chain file and the key."""
    path = Path(path)
    data = load_recipe(path)
    entries, kind = _entries(path, data.get("stages"))
    names = _selected(path, entries, kind, with_optional, per_stage or {})
    root = Path(output_root or data.get("output_root") or "")
    if not str(root) or str(root) == ".":
        raise AlignError(f"{path}: 'output_root' is not set; add `output_root: runs/<name>` or pass --output_root.")
    report = data.get("report") or {}
    if not isinstance(report, dict):
        raise AlignError(f"{path}: 'report' is a {type(report).__name__}, expected a mapping like {{examples: 6}}.")
    check_options(report, str(path))
    shared_keys = {k: v for k, v in data.items() if k not in CHAIN_KEYS}
    shared_keys.update(shared or {})

    fields = {s: _config_fields(s) for s in set(kind.values())}
    used: set[str] = set()
    plans = []
    for name in names:
        recipe, source = _stage_recipe(path, name, entries[name], shared_keys, fields[kind[name]], used)
        recipe.update((per_stage or {}).get(name, {}))
        plans.append(_wire(path, name, kind, names, recipe, source, root, fields[kind[name]] if check_keys else None))
    if check_keys:
        _check_shared(path, shared_keys, used, fields)
    launch = accelerate_config or data.get("accelerate_config")
    if launch is not None:
        launch = Path(str(launch))
        if not launch.is_file():
            where = "command line" if accelerate_config else str(path)
            raise AlignError(f"{where}: accelerate_config {launch} does not exist{_path_fix(path, launch)}")
    return Chain(path=path, output_root=root, stages=plans, report=report, accelerate_config=launch)


def _entries(path: Path, stages_raw: Any) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The `stages:` entries as mappings, and the stage each runs (its name, or a variant's `stage:`), checked against
    the registered stages and their order."""
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise AlignError(
            f"{path}: 'stages' is missing or empty. List stages as a mapping, e.g. `stages: {{pretrain: "
            "pretrain.yaml, sft: sft.yaml}}`."
        )
    entries = {name: _entry(path, name, raw) for name, raw in stages_raw.items()}
    kind = {name: str(entry.pop("stage", name)) for name, entry in entries.items()}
    stages = registry.names()
    for name, stage in kind.items():
        if stage not in stages:
            what = f"'stage: {stage}' of entry '{name}'" if stage != name else f"stage '{name}'"
            hint = did_you_mean(stage, list(stages))
            if "did you mean" not in hint:
                hint = f"; the stages are {', '.join(stages)}, and a variant's entry says its `stage:`."
            raise AlignError(f"{path}: unknown {what}{hint}")
    order = [s for s in stages if s in kind]
    listed = [s for s in kind if kind[s] == s]
    if listed != order:
        raise AlignError(f"{path}: stages are listed as {listed}; the chain runs in order {order}. Reorder them.")
    return entries, kind


def _selected(
    path: Path,
    entries: dict[str, dict[str, Any]],
    kind: dict[str, str],
    with_optional: tuple[str, ...],
    per_stage: dict[str, dict[str, Any]],
) -> list[str]:
    """The entries that run: all but the `optional` ones not named by `--with`; each after its parents."""
    for name in with_optional:
        if name not in entries:
            raise AlignError(f"--with {name}: not an entry of {path} (entries: {', '.join(entries)}).")
    optional = [n for n, e in entries.items() if e.pop("optional", False)]
    names = [n for n in entries if n not in optional or n in with_optional]
    for name in names:
        for parent in registry.get(kind[name]).parents.values():
            if parent in names and names.index(parent) > names.index(name):
                raise AlignError(f"{path}: '{name}' is listed before its parent '{parent}'. List it after.")
    for name in per_stage:
        if name not in names:
            skipped = f" It is optional: add --with {name}." if name in optional else ""
            raise AlignError(
                f"command line: stage '{name}' is not in {path} (stages: {', '.join(names)}).{skipped}"
                f"{'' if skipped else did_you_mean(name, names)}"
            )
    return names


def _stage_recipe(
    path: Path, name: str, entry: dict[str, Any], shared_keys: dict[str, Any], valid: set[str], used: set[str]
) -> tuple[dict[str, Any], str]:
    """An entry's recipe before command-line keys and wiring: its recipe file < the shared keys its stage has <
    its inline keys (never `output_dir`); and where the keys came from. Adds the shared keys it took to `used`."""
    recipe: dict[str, Any] = {}
    source = f"{path} (stages.{name})"
    if entry.get("recipe"):
        file = Path(str(entry.pop("recipe")))
        if not file.is_file():
            raise AlignError(f"{path}: stages.{name}: recipe {file} not found{_path_fix(path, file)}")
        recipe = load_recipe(file)
        source = str(file)
    entry.pop("recipe", None)
    for key, value in shared_keys.items():
        if key in valid:
            recipe[key] = value
            used.add(key)
    recipe.update(entry)
    for key in LOCATION_KEYS[:1]:
        if key in entry:
            raise AlignError(
                f"{path}: stages.{name} sets '{key}', but the chain puts each stage in <output_root>/<name>. "
                "Remove it, or change output_root."
            )
    return recipe, source


def _wire(
    path: Path,
    name: str,
    kind: dict[str, str],
    names: list[str],
    recipe: dict[str, Any],
    source: str,
    root: Path,
    valid: set[str] | None,
) -> StagePlan:
    """The entry's plan: output_dir `<root>/<name>`, parent keys wired to the chain's stages (the stage record's
    `parents`), and, when `valid` is given, every key checked against them."""
    stage = kind[name]
    recipe["output_dir"] = str(root / name)
    parents = []
    for key, parent in registry.get(stage).parents.items():
        if parent in names and kind[parent] == parent:
            recipe[key] = str(root / parent)
            if parent not in parents:
                parents.append(parent)
    if valid is not None:
        for key in recipe:
            if key not in valid:
                hint = did_you_mean(key, sorted(valid))
                raise AlignError(f"{source}: unknown key '{key}' for stage {stage}{hint}")
    return StagePlan(name, stage, recipe, source, parents)


def _check_shared(path: Path, shared_keys: dict[str, Any], used: set[str], fields: dict[str, set[str]]) -> None:
    """A shared key (top level or `--key`) that no stage of the chain has is an error naming the closest key."""
    unused = set(shared_keys) - used
    known = all(f is not None for f in fields.values())
    if unused and known:
        key = sorted(unused)[0]
        every = sorted(set().union(*[f for f in fields.values() if f]))
        raise AlignError(f"{path}: shared key '{key}' is not a key of any stage{did_you_mean(key, every)}")


def _entry(path: Path, name: str, raw: Any) -> dict[str, Any]:
    """A `stages:` entry as a mapping of its own: `{recipe: FILE, ...keys}` from a path, a mapping, or nothing."""
    if raw is None:
        return {}
    if isinstance(raw, str):
        return {"recipe": raw}
    if not isinstance(raw, dict):
        raise AlignError(f"{path}: stage '{name}' is a {type(raw).__name__}; give a recipe path or a mapping.")
    return dict(raw)


def _path_fix(chain: Path, missing: Path) -> str:
    """The fix for a missing path: the rule, and the path to write when it was meant relative to the chain file."""
    beside = chain.parent / missing
    if not missing.is_absolute() and beside.exists():
        return f" (relative paths are relative to the working directory, {Path.cwd()}); write {_rel(beside)}."
    return f" (relative paths are relative to the working directory, {Path.cwd()}). Fix the path."


def _rel(path: Path) -> Path:
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


# ---------------------------------------------------------------------------------------------------------------------
# Fingerprints and state


def _what(plan: StagePlan, recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe without the keys that only say where things are (output_dir, paths wired to parent stages)."""
    drop = set(LOCATION_KEYS) | {k for k, parent in registry.get(plan.stage).parents.items() if parent in plan.parents}
    return {k: v for k, v in recipe.items() if k not in drop}


def resolved_recipe(plan: StagePlan) -> dict[str, Any]:
    """The recipe as the stage will record it (`recipe_dict` after parsing: types and enums normalized)."""
    if _config_fields(plan.stage) is None:
        return json.loads(json.dumps(plan.recipe, default=str))
    cfg = parse_config(plan.stage, [], overrides=plan.recipe, source=f"{plan.source} (stage {plan.stage})")
    return recipe_dict(cfg)


def fingerprint(plan: StagePlan, recipe: dict[str, Any]) -> str:
    """What a stage computes, independent of where its dirs are (so a copied or moved run still skips)."""
    return recipe_sha256(_what(plan, recipe))


def _file_sha(path: Path) -> str | None:
    file = path / STAGE_FILE
    return hashlib.sha256(file.read_bytes()).hexdigest() if file.is_file() else None


def lineage(chain: Chain, plan: StagePlan) -> dict[str, str | None]:
    """Hashes of the parents' `align_stage.json`: a parent that reran (new weights, same recipe) changes them."""
    return {p: _file_sha(chain.plan(p).output_dir) for p in plan.parents}


def read_state(root: Path) -> dict[str, Any]:
    file = root / STATE_FILE
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        logger.warning("%s is not valid JSON; ignoring it (stages are re-checked from their align_stage.json).", file)
        return {}


def _diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    changed = [
        f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in keys if old.get(k) != new.get(k)
    ]
    return ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")


def done_reason(chain: Chain, plan: StagePlan, fp: str, state: dict[str, Any]) -> tuple[bool, str]:
    """(is the stage done and current, why not / why yes) for the log."""
    info = read_stage_info(plan.output_dir)
    if info is None:
        return False, "not finished" if plan.output_dir.exists() else "not run yet"
    if info.get("stage") != plan.stage:
        return False, f"{plan.output_dir} holds a '{info.get('stage')}' stage"
    recorded = info.get("recipe") or {}
    if fingerprint(plan, recorded) != fp:
        return False, f"recipe changed ({_diff(_what(plan, recorded), _what(plan, resolved_recipe(plan)))})"
    entry = state.get(plan.name) or {}
    if entry.get("lineage") is not None and entry.get("lineage") != lineage(chain, plan):
        changed = [p for p, h in lineage(chain, plan).items() if entry["lineage"].get(p) != h]
        return False, f"parent {', '.join(changed)} was rerun since"
    return True, "done, recipe unchanged"


# ---------------------------------------------------------------------------------------------------------------------
# Running


def _write_stage_recipe(chain: Chain, plan: StagePlan) -> Path:
    file = chain.output_root / "recipes" / f"{plan.name}.yaml"
    head = (
        f"# Resolved by `align run {_rel(chain.path)}` from {plan.source}.\n"
        f"# Relative paths are relative to the working directory: {Path.cwd()}\n"
        f"# Rerun this stage alone: align {plan.stage} --config {file}\n"
    )
    atomic_write_text(file, head + yaml.safe_dump(plan.recipe, sort_keys=False))
    return file


def _run_stage(chain: Chain, plan: StagePlan) -> None:
    """`python -m align <stage> --config <resolved recipe>`: output streams through, the last error line is kept."""
    recipe_file = _write_stage_recipe(chain, plan)
    cmd = stage_command(chain, plan, recipe_file)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, env=registry.child_env())  # with the stages registered here
    tail = b""
    try:
        assert proc.stderr is not None
        while True:
            chunk = os.read(proc.stderr.fileno(), 65536)
            if not chunk:
                break
            sys.stderr.buffer.write(chunk)
            sys.stderr.buffer.flush()
            tail = (tail + chunk)[-8192:]
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        raise
    if rc != 0:
        lines = [ln for ln in tail.decode("utf-8", "replace").splitlines() if ln.startswith("error: ")]
        why = lines[-1].removeprefix("error: ") if lines else f"exit code {rc}; see the traceback above"
        raise AlignError(f"chain stopped at stage {plan.name}: {why}. Fix it and rerun `align run` to resume.")


def stage_command(chain: Chain, plan: StagePlan, recipe_file: Path) -> list[str]:
    """`python -m align <stage> --config FILE`, under `accelerate launch` when the chain sets `accelerate_config`."""
    align = ["-m", "align", plan.stage, "--config", str(recipe_file)]
    if chain.accelerate_config is None:
        return [sys.executable, *align]
    launch = ["-m", "accelerate.commands.launch", "--config_file", str(chain.accelerate_config)]
    return [sys.executable, *launch, *align]


def _banner(text: str) -> None:
    logger.info("%s", "=" * 100)
    logger.info("%s", text)
    logger.info("%s", "=" * 100)


def run_chain(chain: Chain, *, start: str | None = None, only: str | None = None) -> list[dict[str, Any]]:
    """Run (or skip) each stage in order; returns one summary row per stage."""
    names = [p.name for p in chain.stages]
    for flag, value in (("--from", start), ("--only", only)):
        if value is not None and value not in names:
            raise AlignError(f"{flag} {value}: not a stage of {chain.path} (stages: {', '.join(names)}).")
    forced = set(names[names.index(start) :]) if start else set()
    selected = {only} if only else set(names)
    # Every stage's config is parsed (validated) before the first one runs: a bad ppo value fails now, not after
    # pretraining.
    fps = {plan.name: fingerprint(plan, resolved_recipe(plan)) for plan in chain.stages}
    chain.output_root.mkdir(parents=True, exist_ok=True)
    state = read_state(chain.output_root)
    summary: list[dict[str, Any]] = []
    invalidated_by: str | None = None
    for i, plan in enumerate(chain.stages, 1):
        fp = fps[plan.name]
        title = f"[{i}/{len(chain.stages)}] {plan.name}  ->  {plan.output_dir}"
        if plan.name not in selected:
            ok, why = done_reason(chain, plan, fp, state)
            status = "done" if ok else f"not run ({why})"
            summary.append({"stage": plan.name, "status": status, "seconds": 0.0, "dir": str(plan.output_dir)})
            continue
        for parent in plan.parents:
            if read_stage_info(chain.plan(parent).output_dir) is None:
                raise AlignError(
                    f"stage {plan.name} needs {parent} in {chain.plan(parent).output_dir}, which is not finished. "
                    f"Run `align run {_rel(chain.path)} --from {parent}`."
                )
        ok, why = done_reason(chain, plan, fp, state)
        if plan.name in forced:
            ok, why = False, f"rerun asked (--{'only' if only else 'from'})"
        elif invalidated_by is not None and ok and not plan.variant:
            ok, why = False, f"invalidated: {invalidated_by} ran again before it"
        if ok:
            _banner(f"{title}: skipped ({why})")
            info = read_stage_info(plan.output_dir) or {}
            state[plan.name] = {**state.get(plan.name, {}), "fingerprint": fp, "lineage": lineage(chain, plan)}
            atomic_write_json(chain.output_root / STATE_FILE, state)
            summary.append({"stage": plan.name, "status": "skipped", "seconds": 0.0, "dir": str(plan.output_dir),
                            "headline": summary_line(plan.stage, info.get("metrics") or {})})  # fmt: skip
            continue
        started = state.get(plan.name) or {}
        stale = plan.output_dir.exists() and (
            read_stage_info(plan.output_dir) is not None or started.get("fingerprint") not in (None, fp)
        )
        resuming = plan.output_dir.exists() and not stale
        if stale:
            logger.warning("%s: %s; removing %s so no stale checkpoint is resumed.", plan.name, why, plan.output_dir)
            later = [] if plan.variant else [p.name for p in chain.stages[i:] if not p.variant]
            if later:
                logger.warning("%s: later stages (%s) are invalidated and will rerun.", plan.name, ", ".join(later))
            with output_lock(plan.output_dir):  # not under a stage still writing there (e.g. left by a killed chain)
                shutil.rmtree(plan.output_dir)
        _banner(f"{title}: {'resuming' if resuming else 'running'} ({why})")
        state[plan.name] = {"fingerprint": fp, "lineage": lineage(chain, plan), "status": "running"}
        atomic_write_json(chain.output_root / STATE_FILE, state)
        t0 = time.perf_counter()
        _run_stage(chain, plan)
        seconds = time.perf_counter() - t0
        info = read_stage_info(plan.output_dir)
        if info is None:
            raise AlignError(f"stage {plan.name} exited without writing {plan.output_dir / STAGE_FILE}; see above.")
        state[plan.name] = {"fingerprint": fp, "lineage": lineage(chain, plan), "status": "done",
                             "seconds": round(seconds, 1), "stage_sha256": _file_sha(plan.output_dir)}  # fmt: skip
        atomic_write_json(chain.output_root / STATE_FILE, state)
        if not plan.variant:
            invalidated_by = invalidated_by or plan.name
        headline = summary_line(plan.stage, info.get("metrics") or {})
        peak = info.get("peak_rss_mib")
        logger.info("%s finished in %s%s: %s", plan.name, _clock(seconds),
                    f", peak RSS {peak / 1024:.2f} GiB" if peak else "", headline or "no metrics")  # fmt: skip
        summary.append({"stage": plan.name, "status": "resumed" if resuming else "ran", "seconds": seconds,
                        "dir": str(plan.output_dir), "headline": headline})  # fmt: skip
    return summary


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}:{s:02d}"


def summary_table(rows: list[dict[str, Any]]) -> str:
    head = ("stage", "status", "time", "dir", "metrics")
    body = [(r["stage"], r["status"], _clock(r["seconds"]), r["dir"], r.get("headline", "")) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip() for row in (head, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise AlignError(f"align run: {message}. See `align run --help`.")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="align run",
        description="Run a chain recipe (pretrain -> sft -> rank -> reward -> ppo), resumably, then write the report.",
        epilog="Any other --key VALUE sets a shared key for every stage that has it (e.g. --seed 1); "
        "--STAGE.key VALUE sets one stage's key (e.g. --ppo.max_steps 20). Values are YAML (1e-3, true, [a, b]). "
        + PATH_RULE,
    )
    p.add_argument("chain", help="Chain recipe, e.g. recipes/tiny/chain.yaml.")
    p.add_argument("--from", dest="start", metavar="STAGE", help="Rerun this stage and every later one.")
    p.add_argument("--only", metavar="STAGE", help="Run only this stage (its parents must be finished).")
    p.add_argument("--with", dest="with_optional", metavar="NAME", action="append", default=[],
                   help="Also run the chain's `optional: true` entry NAME (repeatable), e.g. --with pretrain_lstm.")
    p.add_argument("--output_root", help="Where the stage dirs and the report go (default: the chain's).")
    p.add_argument("--accelerate_config", help="Run each stage under `accelerate launch --config_file` this file.")
    p.add_argument("--report_only", action="store_true", help="Rebuild the report from the stage dirs; train nothing.")
    p.add_argument("--no_report", action="store_true", help="Run the stages but do not write the report.")
    return p


def _split_overrides(rest: list[str]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    shared: dict[str, Any] = {}
    per_stage: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--") or arg == "--":
            raise AlignError(f"align run: unexpected argument {arg!r}; keys are passed as --key VALUE.")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(rest) or rest[i + 1].startswith("--"):
                raise AlignError(f"align run: --{key} needs a value (e.g. --{key} 1 or --{key} true).")
            value = rest[i + 1]
            i += 1
        i += 1
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        if "." in key:  # the entry is checked against the chain's (load_chain)
            name, _, k = key.partition(".")
            per_stage.setdefault(name, {})[k] = parsed
        else:
            shared[key] = parsed
    return shared, per_stage


def main(argv: list[str] | None = None) -> int:
    args, rest = _parser().parse_known_args(argv)
    if args.start and args.only:
        raise AlignError("align run: --from and --only conflict; use --from STAGE (it and later) or --only STAGE.")
    shared, per_stage = _split_overrides(rest)
    chain = load_chain(args.chain, output_root=args.output_root, accelerate_config=args.accelerate_config,
                       shared=shared, per_stage=per_stage, with_optional=tuple(args.with_optional))  # fmt: skip
    t0 = time.perf_counter()
    # One `align run` per output_root (chain_state.json, the report). Each stage, a child process, locks its own dir
    # below it, so the two never wait on each other.
    with output_lock(chain.output_root):
        if not args.report_only:
            rows = run_chain(chain, start=args.start, only=args.only)
            logger.info("Chain %s finished in %s:\n%s", _rel(chain.path), _clock(time.perf_counter() - t0),
                        summary_table(rows))  # fmt: skip
        if not args.no_report:
            files = write_report(chain.output_root, chain.report)
            logger.info("Report: %s", ", ".join(str(f) for f in files))
    return 0
