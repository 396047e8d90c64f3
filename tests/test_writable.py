"""What an answer can carry back: the place of the first value it could not."""

from __future__ import annotations

from inferd.writable import first_unwritable, with_surrogates_escaped


def test_the_first_unwritable_place_is_named_in_document_order() -> None:
    """Walked with a stack: children pushed in order were popped last first, so the last place
    was named as the first."""
    assert first_unwritable({"a": float("nan"), "b": float("inf")}, "x") == "x.a"
    assert first_unwritable([float("nan"), 1, float("inf")], "x") == "x[0]"
    assert first_unwritable({"a": [1, {"b": "\ud800"}], "c": float("nan")}, "x") == "x.a[1].b"
    assert first_unwritable({"\ud800": 1}, "x") == "x"  # a key that cannot be named
    assert first_unwritable({"a": [1.5, "text", None, True]}, "x") is None


def test_a_lone_surrogate_is_written_as_its_escape() -> None:
    assert with_surrogates_escaped("a\ud800b") == "a\\ud800b"
