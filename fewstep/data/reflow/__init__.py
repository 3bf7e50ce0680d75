"""Reflow pipeline pieces shared by the ``reflow`` and ``instaflow`` objectives: pair generation
(``generate_pairs``, ``pairs_for_recipe``), the pair dataset and the straightness measure of a learned flow."""

from fewstep.data.reflow.pairs import PairDataset, generate_pairs
from fewstep.data.reflow.straightness import one_step_error, straightness

__all__ = ["PairDataset", "generate_pairs", "one_step_error", "straightness"]
