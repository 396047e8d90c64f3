from __future__ import annotations

import gc

from inferd.engine.gc_heap import freeze_start_up_heap


def test_start_up_objects_are_left_out_of_later_collections() -> None:
    kept = [{"built": i} for i in range(1000)]  # tracked containers, as a model's modules are
    try:
        frozen = freeze_start_up_heap()
        # Frozen objects that die leave the count (another test's thread may free some between the
        # two reads: a CI run saw 4 go), and none join it: at most what was frozen, never more.
        assert len(kept) <= gc.get_freeze_count() <= frozen
        tracked = {id(obj) for obj in gc.get_objects()}
        assert not any(id(obj) in tracked for obj in kept)  # a full pass no longer walks them
    finally:
        gc.unfreeze()
