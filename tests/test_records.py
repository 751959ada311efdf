"""records.record behaves as collections.namedtuple does, for everything the code uses."""

from __future__ import annotations

import pickle
from collections import namedtuple
from typing import Any

import pytest

from git_credential_codestore.records import record
from git_credential_codestore.vocab import TokenRequest

FIELDS = "repo scopes ephemeral ttl"
DEFAULTS = (False, None)

# Through Any: the tests below make calls the type checker would rightly refuse.
make_ours: Any = record
make_theirs: Any = namedtuple
Ours = make_ours("Point", FIELDS, defaults=DEFAULTS)
Theirs = make_theirs("Point", FIELDS, defaults=DEFAULTS)  # the yardstick

CALLS: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
    (("a", ("git:read",)), {}),
    (("a", ("git:read",), True, 60), {}),
    (("a",), {"scopes": ("x",), "ttl": 5}),
    ((), {"repo": "a", "scopes": (), "ephemeral": True}),
]
BAD_CALLS: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
    ((), {}),  # required fields missing
    (("a",), {}),
    (("a", (), True, 1, "extra"), {}),  # too many
    (("a", ()), {"repo": "b"}),  # given twice
    (("a", ()), {"colour": "red"}),  # no such field
]


@pytest.mark.parametrize(("args", "kwargs"), CALLS)
def test_a_record_is_built_and_read_as_a_namedtuple_is(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    ours, theirs = Ours(*args, **kwargs), Theirs(*args, **kwargs)
    assert ours == theirs and tuple(ours) == tuple(theirs) and hash(ours) == hash(theirs)
    assert [getattr(ours, f) for f in ours._fields] == [getattr(theirs, f) for f in theirs._fields]
    assert repr(ours) == repr(theirs)
    assert ours._replace(ttl=9, repo="b") == theirs._replace(ttl=9, repo="b")
    assert type(ours._replace(ttl=9)) is Ours
    assert Ours.__module__ == __name__
    assert pickle.loads(pickle.dumps(TokenRequest("team/app", ("git:read",)))) == TokenRequest("team/app", ("git:read",))
    assert ours._field_defaults == theirs._field_defaults


@pytest.mark.parametrize(("args", "kwargs"), BAD_CALLS)
def test_a_bad_call_is_refused_as_a_namedtuple_refuses_it(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    with pytest.raises(TypeError):
        Theirs(*args, **kwargs)
    with pytest.raises(TypeError):
        Ours(*args, **kwargs)


def test_replace_refuses_an_unknown_field() -> None:
    with pytest.raises(ValueError, match="colour"):
        Ours("a", ())._replace(colour="red")


def test_a_subclass_keeps_its_methods_and_its_type_through_replace() -> None:
    request = TokenRequest("team/app", ("git:read",))
    checked = request.checked()
    assert type(checked) is TokenRequest and checked.ephemeral is False and checked.purpose == "cli"
    repo, scopes, *_ = checked
    assert (repo, scopes) == ("team/app", ("git:read",))
    with pytest.raises(AttributeError):
        checked.colour = "red"  # type: ignore[attr-defined]  # slots: no stray attributes


def test_field_names_must_be_plain_and_distinct() -> None:
    for names in ("a a", "a _b", "a 1b"):
        with pytest.raises(ValueError):
            record("Bad", names)
    with pytest.raises(TypeError):
        record("Bad", "a", defaults=(1, 2))
