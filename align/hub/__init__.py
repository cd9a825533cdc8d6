"""The Hugging Face Hub side of align: push stage dirs and whole runs with model cards that carry the chain's lineage.

    push.py     `align push` (the command), `push_run` (every stage of a chain run, parents first) and
                `push_after_stage` (the stage a recipe just finished, `push_to_hub: true`)
    upload.py   one stage dir: plan (what is uploaded, the card), dry run, one commit, errors that say what landed
    card.py     model and dataset cards from `align_stage.json`: metadata, metrics, curves, samples, lineage (pure)
    lineage.py  a stage's parents across the chain, the Hub repos they went to, `base_model`; `is_hub_id`

Each layer imports only the ones below it: push -> upload -> card -> lineage.
"""

from align.hub.card import build_dataset_card, build_model_card
from align.hub.lineage import is_hub_id
from align.hub.push import find_stages, push_after_stage, push_run
from align.hub.upload import push_stage

__all__ = ["build_dataset_card", "build_model_card", "find_stages", "is_hub_id", "push_after_stage", "push_run",
           "push_stage"]  # fmt: skip
