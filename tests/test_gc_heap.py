from __future__ import annotations

import gc

from inferd.engine.gc_heap import freeze_start_up_heap


def test_start_up_objects_are_left_out_of_later_collections() -> None:
    kept = [{"built": i} for i in range(1000)]  # tracked containers, as a model's modules are
    try:
        frozen = freeze_start_up_heap()
        assert frozen == gc.get_freeze_count() >= len(kept)
        tracked = {id(obj) for obj in gc.get_objects()}
        assert not any(id(obj) in tracked for obj in kept)  # a full pass no longer walks them
    finally:
        gc.unfreeze()
