"""The Publish sequencing rule, as a pure function."""

from __future__ import annotations

import pytest

from llmesh.prefix_cache.index import Action, decide


@pytest.mark.parametrize(("stored", "incoming", "action", "purge", "reason"), [
    ((None, None), (1, 0, False), Action.RESET_AND_APPLY, True, "new_instance"),
    ((None, None), (1, 4, False), Action.RESYNC, False, "unknown_state"),
    ((None, None), (1, 4, True), Action.RESET_AND_APPLY, True, "snapshot"),
    ((1, 3), (1, 4, False), Action.APPLY, False, "in_order"),
    ((1, 3), (1, 3, False), Action.IGNORE, False, "duplicate"),
    ((1, 3), (1, 6, False), Action.RESYNC, False, "gap"),
    ((1, 3), (1, 6, True), Action.RESET_AND_APPLY, True, "snapshot"),
    ((1, 3), (2, 0, False), Action.RESET_AND_APPLY, True, "new_epoch"),
    ((1, 3), (2, 5, False), Action.RESYNC, True, "new_epoch_gap"),
    ((2, 3), (1, 4, False), Action.IGNORE, False, "stale_epoch"),
])
def test_decide(stored, incoming, action, purge, reason):
    d = decide(*stored, *incoming)
    assert (d.action, d.purge_first, d.reason) == (action, purge, reason)
