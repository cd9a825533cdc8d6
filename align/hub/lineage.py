"""Lineage of a stage dir across the chain: its parents, the Hub repos they were pushed to, and the base model.

A stage's `parent` is `{"stage", "path"}` (an align stage dir) or `{"model": <hub id or path>}` (a base
model, with `"hub_id"` when the recipe's `model_hub_id` says which Hub repo a local copy came from); ppo also lists
`parents` (policy + reward model). We follow `parent` links through each dir's
`align_stage.json` up to the base model, and link every stage we know a Hub repo for (pushed in this run, passed by the
caller, or recorded in the stage's `align_hub.json` by an earlier push). Used by the cards (`align/hub/card.py`) and
the push (`align/hub/upload.py`, `align/hub/push.py`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.data.hub_id import hub_id_problem, is_hub_id  # noqa: F401 - re-exported: align.hub's name for them
from align.errors import AlignError
from align.io import STAGE_FILE, read_stage_info

HUB_RECORD = "align_hub.json"  # written into a stage dir after a successful push: {"repo_id", "repo_type", ...}


@dataclass(frozen=True)
class Link:
    """One step of a lineage: an align stage (`stage`, `path`) or a base model (`model`); `repo_id` if on the Hub."""

    stage: str | None = None
    path: Path | None = None
    model: str | None = None
    repo_id: str | None = None
    found: bool = True


def hub_record(path: Path, endpoint: str) -> dict[str, Any] | None:
    """What an earlier push of `path` recorded (`align_hub.json`), if it went to the same endpoint."""
    file = Path(path) / HUB_RECORD
    if not file.is_file():
        return None
    try:
        rec = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(rec, dict) or rec.get("endpoint", "").rstrip("/") != endpoint.rstrip("/"):
        return None
    return rec


def known_repo(path: Path | None, pushed: Mapping[str, str], endpoint: str) -> str | None:
    """The Hub repo of a local stage dir: pushed in this session (`pushed`: resolved path -> repo id) or recorded."""
    if path is None:
        return None
    key = str(Path(path).resolve())
    if key in pushed:
        return pushed[key]
    rec = hub_record(Path(path), endpoint)
    return rec.get("repo_id") if rec else None


def resolve_parent_path(child_dir: Path, parent: Mapping[str, Any]) -> Path | None:
    """The dir of an align parent stage: its recorded path, or a sibling of the same name (run dir moved)."""
    recorded = Path(str(parent.get("path", "")))
    if (recorded / STAGE_FILE).is_file():
        return recorded
    sibling = Path(child_dir).resolve().parent / recorded.name
    if recorded.name and (sibling / STAGE_FILE).is_file():
        info = read_stage_info(sibling)
        if info is not None and info.get("stage") == parent.get("stage"):
            return sibling
    return None


def lineage(
    stage_dir: Path, pushed: Mapping[str, str], endpoint: str, *, parent_repo_id: str | None = None
) -> list[Link]:
    """The chain that led to `stage_dir`, oldest first, ending with the stage itself.

    Follows `parent` (for ppo: the policy), reading each parent's `align_stage.json`. `parent_repo_id` overrides the
    Hub repo of the immediate parent.
    """
    chain: list[Link] = []
    seen: set[str] = set()
    here: Path | None = Path(stage_dir)
    while here is not None and len(chain) < 64:
        info = read_stage_info(here)
        key = str(here.resolve())
        if info is None or key in seen:  # a cycle can only come from hand-edited files: stop, don't loop
            break
        seen.add(key)
        is_parent = len(chain) == 1
        repo = parent_repo_id if is_parent and parent_repo_id else known_repo(here, pushed, endpoint)
        chain.append(Link(stage=info.get("stage"), path=here, repo_id=repo))
        override = parent_repo_id if len(chain) == 1 else None  # the next link is the immediate parent
        parent, here = info.get("parent"), None
        if isinstance(parent, Mapping) and "path" in parent:
            here = resolve_parent_path(chain[-1].path, parent)
            if here is None:
                missing = Path(str(parent["path"]))
                chain.append(Link(stage=parent.get("stage"), path=missing, repo_id=override, found=False))
        elif isinstance(parent, Mapping) and parent.get("model"):
            chain.append(model_link(parent, override))
    chain.reverse()
    return chain


def model_link(parent: Mapping[str, Any], repo_id: str | None = None) -> Link:
    """The link of a base-model parent `{"model", "hub_id"?}`: its Hub repo is `repo_id` if given, else the recorded
    `hub_id` (a local or GGUF copy of that repo), else the model itself when it is a Hub id."""
    model = str(parent.get("model"))
    hub_id = parent.get("hub_id")
    hub_id = hub_id if isinstance(hub_id, str) and hub_id else None
    return Link(model=model, repo_id=repo_id or hub_id or (model if is_hub_id(model) else None))


def base_model_of(chain: list[Link]) -> str | None:
    """The Hub id `base_model` should name: the nearest ancestor on the Hub (the parent when pushed), else None.

    None means trained from scratch, or from local models nobody pushed: the card then has no `base_model`.
    """
    for link in reversed(chain[:-1]):
        if link.repo_id:
            return link.repo_id
    return None


def adapter_base(stage_dir: Path) -> str | None:
    """`base_model_name_or_path` of a PEFT adapter dir, or None."""
    file = Path(stage_dir) / "adapter_config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except json.JSONDecodeError as e:
        raise AlignError(f"{file}: not valid JSON ({e.msg} at line {e.lineno}). Re-save the adapter.") from None
