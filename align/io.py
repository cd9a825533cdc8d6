"""Atomic writes, the `align_stage.json` lineage file, checkpoint lookup, and the one-writer lock of an output dir.

Every stage output dir is a Hugging Face model dir plus `align_stage.json`, written last and atomically: its
presence means "this stage finished". The next stage, the chain runner and the Hub model card read it. While a stage
runs, `.align.lock` in its dir names the process writing there (`output_lock`); a run killed with -9 leaves it
behind, and the next run on that host takes it over.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from align.errors import AlignError

try:  # Unix only: the output lock (fcntl) and peak memory (resource); io still imports on Windows
    import fcntl
    import resource
except ImportError:
    fcntl = resource = None

logger = logging.getLogger(__name__)

STAGE_FILE = "align_stage.json"
LOCK_FILE = ".align.lock"  # hidden: `align push` skips dotfiles, and it is no part of the model
_VERSIONED = ("align", "torch", "transformers", "trl", "datasets", "accelerate", "peft", "tokenizers")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half of either."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file 0600; give it the mode a plain open() would (or the replaced file's), so reports
        # and model files stay readable by whoever could read them before.
        os.fchmod(fd, _mode_for(path))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # fsync the directory so the rename itself survives a power cut.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _mode_for(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)  # reading the umask means setting it; restored at once
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape a stage's result, for lineage."""
    out = {}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def recipe_sha256(recipe: dict[str, Any]) -> str:
    """Fingerprint of a resolved recipe: sorted-key JSON, so key order in the YAML does not matter."""
    blob = json.dumps(recipe, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def peak_rss_mib() -> float | None:
    """This process's peak resident memory so far in MiB (`getrusage`), or None where there is no such call. A stage
    run under accelerate records its main process's."""
    if resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def write_stage_info(
    output_dir: str | os.PathLike,
    stage: str,
    *,
    parent: dict[str, Any] | None,
    recipe: dict[str, Any],
    data: dict[str, Any] | None,
    metrics: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """Write `align_stage.json` (last, atomically) and return what was written.

    Args:
        parent: `{"stage": ..., "path": ...}` for an align stage, or `{"model": <hub id or path>}` for a base model
            (plus `"hub_id"` when the recipe's `model_hub_id` names the Hub repo a local copy came from).
        recipe: the resolved config as a plain dict (see `align.config.recipe_dict`).
        data: `{"name", "fingerprint", "rows"}` of the training data.
        metrics: numbers, e.g. `eval_loss` (nats per token), `perplexity`, `entropy_floor`.
        extra: stage-specific fields (e.g. `samples`, `log_history`).

    `peak_rss_mib` (`peak_rss_mib()`) records the stage process's peak memory, which the chain logs per stage.

    The finished dir keeps no pickle: Trainer's `training_args.bin` is removed here, also from `adapter/` (the
    resolved recipe is in this file), so what is pushed or shared loads without unpickling. Checkpoints keep theirs
    for resuming.
    """
    info = {
        "stage": stage,
        "parent": parent,
        "recipe": recipe,
        "recipe_sha256": recipe_sha256(recipe),
        "data": data,
        "versions": package_versions(),
        "metrics": metrics,
        "peak_rss_mib": peak_rss_mib(),
        **extra,
    }
    for where in (Path(output_dir), Path(output_dir) / "adapter"):  # a merged LoRA stage keeps its adapter there
        (where / "training_args.bin").unlink(missing_ok=True)
    atomic_write_json(Path(output_dir) / STAGE_FILE, info)
    return info


def read_stage_info(path: str | os.PathLike) -> dict[str, Any] | None:
    """The `align_stage.json` of a stage dir, or None when `path` is not a finished align stage (e.g. a Hub id)."""
    file = Path(path) / STAGE_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        msg = f"{file}: not valid JSON ({e.msg} at line {e.lineno}). Delete the file and rerun the stage."
        raise AlignError(msg) from None


def same_path(a: Any, b: Any) -> bool:
    """Whether two paths (str or Path, None for none) name the same file or dir once resolved."""
    return a is not None and b is not None and Path(str(a)).resolve() == Path(str(b)).resolve()


def parent_of(model_name_or_path: str, hub_id: str | None = None) -> dict[str, Any]:
    """The `parent` entry for a stage trained from `model_name_or_path` (stage dir, model dir, `.gguf` file or Hub id).

    `hub_id` (the stage's `model_hub_id`): the Hub repo a base model is a copy of, recorded beside it so the Hub cards
    name it as `base_model`. An align stage parent has its own lineage, so it is not recorded there.
    """
    info = read_stage_info(model_name_or_path)
    if info is not None:
        return {"stage": info["stage"], "path": str(Path(model_name_or_path).resolve())}
    model = str(Path(model_name_or_path).resolve()) if Path(model_name_or_path).exists() else model_name_or_path
    return {"model": model, "hub_id": hub_id} if hub_id else {"model": model}


_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete `checkpoint-N` dir in `output_dir` (Trainer's layout), or None.

    A checkpoint is complete when its `trainer_state.json` exists and parses: Trainer writes that file last, and
    not atomically, so a run killed mid-save leaves a dir without it or with a truncated one. Such a dir is skipped
    (and said so in the log) rather than resumed from.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = []
    for child in root.iterdir():
        m = _CHECKPOINT_RE.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    for _, child in sorted(found, reverse=True):
        if _checkpoint_complete(child):
            return child
        logger.warning("Skipping incomplete checkpoint %s (interrupted while saving).", child)
    return None


def _checkpoint_complete(path: Path) -> bool:
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and "global_step" in state


def save_trained(trainer, output_dir: str | os.PathLike, *, merge_adapter: bool) -> None:
    """`trainer`'s model in `output_dir`; with `merge_adapter`, its PEFT adapter in `output_dir/adapter` and the merged
    model (loadable without peft) in `output_dir`."""
    if not merge_adapter:
        trainer.save_model(str(output_dir))
        return
    trainer.save_model(str(Path(output_dir) / "adapter"))
    if trainer.is_world_process_zero():
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        merged.save_pretrained(output_dir, safe_serialization=True)


def resume_checkpoint(args) -> str | None:
    """Where a Trainer run resumes: `args.resume_from_checkpoint` if set, else the newest complete checkpoint in
    `args.output_dir` (logged, so a rerun says it continued), else None for a fresh start."""
    if args.resume_from_checkpoint:
        return str(args.resume_from_checkpoint)
    found = last_checkpoint(args.output_dir)
    if found is not None:
        logger.info("Resuming from %s (found in output_dir).", found)
    return str(found) if found else None


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file under `path` and the dirs themselves, so a dir renamed into place after it survives a power
    cut whole (`os.replace` orders the rename, not the data of files written by others, e.g. safetensors)."""
    for dirpath, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


def _fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------------------
# One writer per output dir, and a stage's start


_HELD: dict[str, int] = {}  # resolved dir -> how deeply this process holds its lock (output_lock is re-entrant)


def is_main_process() -> bool:
    """Whether this is rank 0 of an `accelerate launch` / torchrun job, or a plain process. Read from the environment,
    as `align.cli` does for logging, not from accelerate's PartialState: the lock is taken before a stage sets up its
    distributed state, which must keep the stage's own options (the rank stage passes `cpu=True`)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def _command() -> str:
    argv = sys.argv
    if argv and Path(argv[0]).name in ("__main__.py", "align"):  # `python -m align ...` or the console script
        return shlex.join(["align", *argv[1:]])
    if argv and argv[0] in ("-c", "-", ""):  # python -c / stdin
        return shlex.join(["python", *argv])
    return shlex.join(argv)


def _read_lock(fd: int) -> dict[str, Any]:
    try:
        body = json.loads(os.pread(fd, 65536, 0) or b"{}")
    except ValueError:  # killed between creating the file and writing it
        return {}
    return body if isinstance(body, dict) else {}


def describe_holder(holder: dict[str, Any]) -> str:
    """`pid 123 on host (align sft --config x) since 2025-01-02 10:11:12 +0000`, from a lock file's body."""
    if not holder.get("pid"):
        return "a process that is starting (its lock file is still empty)"
    return f"pid {holder['pid']} on {holder.get('host')} ({holder.get('command')}) since {holder.get('since')}"


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _busy(shown: Path, lock: Path, holder: dict[str, Any]) -> AlignError:
    return AlignError(
        f"{shown}: in use by {describe_holder(holder)}. One process writes an output dir at a time: wait for that "
        f"run to end, stop it, or use another output_dir (lock file {lock})."
    )


def _acquire(lock: Path, shown: Path) -> int:
    """Open and flock `lock`, or raise AlignError naming its holder; take over a stale one; write our own body."""
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # its creator removed the dir, empty, as it released the lock: make it again
            lock.parent.mkdir(parents=True, exist_ok=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            flocked = True
        except BlockingIOError:
            holder = _read_lock(fd)
            os.close(fd)
            raise _busy(shown, lock, holder) from None
        except OSError as e:  # a file system without flock (some NFS mounts): the pid in the file is all we have
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            flocked = False
        # The holder unlinks the file before closing it: if it did so between our open and flock, we hold a lock on
        # a file no one else will open. Try again with the one at the path now.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    previous = _read_lock(fd)
    if previous.get("pid"):
        host = socket.gethostname()
        if previous.get("host") != host:
            # flock may not reach across hosts (NFS mounted with local locks): a lock from elsewhere is not ours to
            # judge stale.
            os.close(fd)
            raise AlignError(
                f"{shown}: locked by {describe_holder(previous)}, another host, whose processes this one cannot see. "
                f"If that run is over (killed, crashed), delete {lock} and rerun."
            )
        if not flocked and previous["pid"] != os.getpid() and _alive(previous["pid"]):
            os.close(fd)
            raise _busy(shown, lock, previous)
        # The kernel dropped the flock when that process died (kill -9, OOM, power cut): the lock is stale.
        logger.warning(
            "%s: taking over the lock left by %s: that process is gone, so what it wrote here is unfinished (a "
            "Trainer stage resumes from its last complete checkpoint; the rest starts over).",
            shown,
            describe_holder(previous),
        )
    body = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %z")}  # fmt: skip
    data = (json.dumps(body) + "\n").encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)
    return fd


@contextlib.contextmanager
def output_lock(output_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold `output_dir/.align.lock` (created with the dir) while writing there; yields the lock file's path.

    A second `align <stage>` or `align run` on the same dir raises AlignError at once, naming the holder's pid, host,
    command and start time. The lock is an `fcntl.flock`, which the kernel drops when its process dies (kill -9
    included), so a lock file left behind by a dead process on this host is taken over, with a warning; one left by
    another host is refused (its process cannot be checked from here). Re-entrant within one process, so code that
    holds the lock may call a stage's `run` on the same dir.
    """
    shown = Path(output_dir)
    key = str(shown.resolve())
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield shown / LOCK_FILE
        finally:
            _HELD[key] -= 1
        return
    created = not shown.exists()
    shown.mkdir(parents=True, exist_ok=True)
    lock = shown / LOCK_FILE
    fd = _acquire(lock, shown)
    _HELD[key] = 1
    try:
        yield lock
    finally:
        del _HELD[key]
        lock.unlink(missing_ok=True)  # before the close, which releases the flock: see the retry in _acquire
        os.close(fd)
        if created:  # a run that failed before writing (bad data) leaves no empty dir behind
            with contextlib.suppress(OSError):
                shown.rmdir()


PREVIOUS_STAGE_FILE = ".align_stage.previous.json"  # an earlier run's marker, set aside while a rerun works


def clear_stage_info(output_dir: str | os.PathLike) -> Path | None:
    """Set aside the `align_stage.json` of an earlier run before this one writes anything: killed halfway, a rerun
    must leave a dir that reads as unfinished, not the old marker beside half-new weights. Returns where it went
    (`restore_stage_info` puts it back when the rerun fails before writing), or None when there was none."""
    file = Path(output_dir) / STAGE_FILE
    if not file.is_file():
        return None
    aside = file.with_name(PREVIOUS_STAGE_FILE)
    os.replace(file, aside)
    _fsync_dir(file.parent)
    logger.info("%s: set aside the %s of an earlier run; the dir counts as unfinished until this run ends.",
                output_dir, STAGE_FILE)  # fmt: skip
    return aside


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under `root` but the lock and the set-aside marker: did a run write anything?"""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name in (LOCK_FILE, PREVIOUS_STAGE_FILE):
                continue
            path = os.path.join(dirpath, name)
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(path)
                out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
    return out


def unfinished_stage(path: str | os.PathLike) -> str | None:
    """Why `path` is an align stage dir that is being written or was killed (its lock file, no align_stage.json), or
    None when it is not (a finished stage, a plain model dir, a Hub id, a file)."""
    lock = Path(path) / LOCK_FILE
    if not lock.is_file() or (Path(path) / STAGE_FILE).is_file():
        return None
    try:
        holder = json.loads(lock.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        holder = {}
    return f"no {STAGE_FILE}, and its {LOCK_FILE} names {describe_holder(holder if isinstance(holder, dict) else {})}"


# Recipe keys that point at another stage's output.
INPUT_KEYS = ("model_name_or_path", "reward_model_path", "value_model_path", "dataset_name")


def _check_inputs(cfg, output_dir: Path) -> None:
    for key in INPUT_KEYS:
        value = getattr(cfg, key, None)
        if not isinstance(value, str) or not value or Path(value).resolve() == output_dir.resolve():
            continue
        why = unfinished_stage(value)
        if why is not None:
            raise AlignError(
                f"{key} {value}: that stage is still running or was interrupted ({why}). Let it finish, or rerun it "
                "to the end, then rerun this one."
            )


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


_NO_SPACE = ("No space left on device", "Disk quota exceeded", "StorageFull", "os error 28")


def no_space_left(exc: BaseException, where: str | os.PathLike | None = None) -> bool:
    """Whether `exc` comes from a full disk (or quota): OSError ENOSPC/EDQUOT, safetensors' wrapped io error, or
    torch.save's errno-less "file write failed" when the disk of `where` is (nearly) full."""
    for e in _exception_chain(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if any(s in text for s in _NO_SPACE):
            return True
        if "file write failed" in text and where is not None:
            try:
                if shutil.disk_usage(where).free < 64 * 2**20:
                    return True
            except OSError:
                pass
    return False


def _incomplete_checkpoints(root: Path) -> list[Path]:
    """`checkpoint-N` dirs newer than the newest complete one: what a save that failed or was killed left."""
    if not root.is_dir():
        return []
    done = last_checkpoint(root)
    newest = int(_CHECKPOINT_RE.match(done.name).group(1)) if done is not None else -1
    out = []
    for child in root.iterdir():
        m = _CHECKPOINT_RE.match(child.name)
        if m and child.is_dir() and int(m.group(1)) > newest:
            out.append(child)
    return sorted(out)


def no_space_error(exc: BaseException, output_dir: str | os.PathLike) -> AlignError:
    """One line for a full disk while a stage wrote `output_dir`: the file (or checkpoint), that the last complete
    checkpoint is kept, and the fix. Partial checkpoints are removed (main process), to give back their space."""
    root = Path(output_dir)
    partial = _incomplete_checkpoints(root)
    if is_main_process():
        for path in partial:
            shutil.rmtree(path, ignore_errors=True)
    named = next((e.filename for e in _exception_chain(exc) if isinstance(e, OSError) and e.filename), None)
    where = named or (partial[-1] if partial else root)
    kept = last_checkpoint(root)
    removed = f"; the partial {', '.join(p.name for p in partial)} was removed" if partial else ""
    return AlignError(
        f"{where}: no space left on device. {root} is not marked done; the last complete checkpoint "
        f"({kept.name if kept else 'none yet'}) is intact{removed}. Free space on that disk (or lower "
        "save_total_limit, or point output_dir at a bigger disk) and rerun the same command: it resumes from there."
    )


def stage_lifecycle(run: Callable[[Any], Path]) -> Callable[[Any], Path]:
    """Decorate a stage's `run(cfg)` with the start every stage shares. On the main process: lock `cfg.output_dir`
    (`output_lock`), refuse an input that is an unfinished stage dir, and set aside an earlier run's
    align_stage.json (back in place if this run fails before writing anything); the other processes of an
    `accelerate launch` only run. On every process a full disk becomes one line (`no_space_error`). The stage itself
    writes align_stage.json last, as before."""

    @functools.wraps(run)
    def wrapper(cfg) -> Path:
        output_dir = Path(cfg.output_dir)
        main = is_main_process()
        with output_lock(output_dir) if main else contextlib.nullcontext():
            aside = before = None
            if main:
                _check_inputs(cfg, output_dir)
                aside = clear_stage_info(output_dir)
                before = _snapshot(output_dir)
            try:
                out = run(cfg)
            except BaseException as e:
                if aside is not None and aside.is_file() and _snapshot(output_dir) == before:
                    # failed before writing anything (bad data, a bad labeler): the earlier run's output stands
                    os.replace(aside, output_dir / STAGE_FILE)
                    logger.info("%s: nothing was written; the earlier run's %s is back.", output_dir, STAGE_FILE)
                if isinstance(e, Exception) and not isinstance(e, AlignError) and no_space_left(e, output_dir):
                    raise no_space_error(e, output_dir) from e
                raise
            if main:
                (output_dir / PREVIOUS_STAGE_FILE).unlink(missing_ok=True)
            return out

    return wrapper
