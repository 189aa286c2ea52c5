"""Real people in the loop: a labelling web page on SQLite, active queries, simulated annotators.

* :mod:`~egalitarian_rl.labelling.store` -- :class:`AnswerStore`, one SQLite file per campaign.
* :mod:`~egalitarian_rl.labelling.pool` -- segments people can look at (GIF clips, texts).
* :mod:`~egalitarian_rl.labelling.queries` -- which pair to ask next (random, members' disagreement).
* :mod:`~egalitarian_rl.labelling.simulate` -- simulated users answering through the same rules.
* :mod:`~egalitarian_rl.labelling.app` / :mod:`~egalitarian_rl.labelling.campaign` -- the web app and
  ``label_main`` (``egalitarian-rl label CONFIG``); imported lazily (they need starlette / uvicorn).
"""

from egalitarian_rl.labelling.pool import SegmentPool, control_pool, text_pool
from egalitarian_rl.labelling.queries import DisagreementRule, QueryRule, RandomRule, make_rule
from egalitarian_rl.labelling.simulate import SimulatedCampaign
from egalitarian_rl.labelling.store import CHOICES, AnswerReceipt, AnswerStore, StoreError, User

__all__ = [
    "CHOICES",
    "AnswerReceipt",
    "AnswerStore",
    "DisagreementRule",
    "QueryRule",
    "RandomRule",
    "SegmentPool",
    "SimulatedCampaign",
    "StoreError",
    "User",
    "control_pool",
    "make_rule",
    "text_pool",
]
