"""The engine's collector settings hold only while an engine loop runs, nested or not."""

from __future__ import annotations

import gc

from batchprod._gc import ENGINE_THRESHOLDS, long_lived, settle


def test_thresholds_and_freezing_hold_only_inside_the_loop() -> None:
    before = gc.get_threshold()
    settle()  # outside a loop: nothing frozen
    assert gc.get_freeze_count() == 0
    with long_lived():
        assert gc.get_threshold() == ENGINE_THRESHOLDS
        kept = [object() for _ in range(10)]
        settle()
        assert gc.get_freeze_count() > 0
        with long_lived():  # (a campaign runner's dispatcher inside it)
            assert gc.get_threshold() == ENGINE_THRESHOLDS
        assert gc.get_threshold() == ENGINE_THRESHOLDS and gc.get_freeze_count() > 0
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
    del kept


def test_cycles_made_in_the_loop_are_still_collected() -> None:
    with long_lived():
        a: list[object] = []
        a.append(a)
        del a
        assert gc.collect() >= 1
