from __future__ import annotations

import pytest

from batchprod.errors import QueryError
from batchprod.graph import DataQuery


@pytest.mark.parametrize(
    ("text", "data_id", "expected"),
    [
        ("visit IN (1..10) AND detector != 3", {"visit": 5, "detector": 2}, True),
        ("visit IN (1..10) AND detector != 3", {"visit": 5, "detector": 3}, False),
        ("visit IN (1..10) AND detector != 3", {"visit": 11, "detector": 2}, False),
        ("visit IN (1..9:2)", {"visit": 3}, True),
        ("visit IN (1..9:2)", {"visit": 4}, False),
        ("visit NOT IN (1, 2, 5..6)", {"visit": 5}, False),
        ("visit NOT IN (1, 2, 5..6)", {"visit": 7}, True),
        ("visit = 1 OR visit = 2", {"visit": 2}, True),
        ("NOT (visit >= 3)", {"visit": 2}, True),
        ("visit > 1 and visit <= 3 or detector = 9", {"visit": 4, "detector": 9}, True),
        ("band = 'r'", {"band": "r"}, True),
        ('band = "g"', {"band": "r"}, False),
        ("visit <> 4", {"visit": 4}, False),
        ("", {"visit": 4}, True),
    ],
)
def test_evaluate(text: str, data_id: dict, expected: bool) -> None:
    assert DataQuery(text).accepts(data_id) is expected


def test_and_binds_tighter_than_or() -> None:
    q = DataQuery("visit = 1 OR visit = 2 AND detector = 0")
    assert q.accepts({"visit": 1, "detector": 5})
    assert not q.accepts({"visit": 2, "detector": 5})


def test_missing_dimension_is_unknown_not_false() -> None:
    q = DataQuery("visit IN (1..10) AND detector != 3")
    assert q.evaluate({"tract": 0, "patch": 1}) is None
    assert q.accepts({"tract": 0, "patch": 1})
    # ... but a definite false on a present dimension still rejects
    assert not q.accepts({"detector": 3})
    assert DataQuery("NOT visit = 1").evaluate({"tract": 0}) is None


def test_unknown_dimension_is_rejected_when_dimensions_are_known() -> None:
    with pytest.raises(QueryError, match="unknown dimension 'visti'"):
        DataQuery("visti = 1", known_dimensions={"visit", "detector"})


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('touch /tmp/pwned')",
        "visit = 1; DROP TABLE dataset",
        "visit = 1 AND",
        "visit == ",
        "(visit = 1",
        "visit = 1)",
        "visit IN 1, 2",
        "visit IN (1..)",
        "visit IN (5..1)",
        "visit IN (1..10:0)",
        "visit IN (0..999999999999)",
        "visit = os.system",
        "lambda: 1",
        "visit = 1 OR OR visit = 2",
        "(" * 500 + "visit = 1" + ")" * 500,
        "NOT " * 500 + "visit = 1",
        "visit = `id`",
        "x" * 200_000,
    ],
)
def test_bad_and_malicious_queries_raise_query_error(text: str, tmp_path) -> None:
    with pytest.raises(QueryError):
        DataQuery(text)


def test_strings_are_data_not_code() -> None:
    q = DataQuery("band = '__import__(\"os\")'")
    assert q.accepts({"band": '__import__("os")'})
    assert not q.accepts({"band": "r"})
