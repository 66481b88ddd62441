"""Mining, in one place: which database images a query's triplets take.

- ``vpr.steps.mining.positives``: positives from UTM distance (hard ≤ ``train_positive_m``, soft ≤
  ``test_positive_m``), once per split, as the ``mine@{split}`` stage (``vpr mine``).
- ``vpr.steps.mining.negatives``: hard negatives from descriptor distance, refreshed during training
  (``full`` / ``partial`` / ``random``); training imports it, the mine stage does not (it needs no model).
"""

from vpr.steps.mining.positives import (
    QUERY_CHUNK,
    facing_filter,
    heading_difference,
    mine_all,
    mine_batches,
    mine_split,
    radius_neighbours,
    utm_positives,
    write_mining_batches,
)

__all__ = [
    "QUERY_CHUNK",
    "facing_filter",
    "heading_difference",
    "mine_all",
    "mine_batches",
    "mine_split",
    "radius_neighbours",
    "utm_positives",
    "write_mining_batches",
]
