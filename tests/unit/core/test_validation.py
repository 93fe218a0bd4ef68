"""validation: every input a caller can send is checked, and each refusal names the problem."""

from __future__ import annotations

from typing import Any

import pytest

from worker.core import validation
from worker.core.errors import InvalidInput
from worker.core.states import Target

UUID = "4dea22b3-1d52-d8f3-2516-782e98ab3fa0"


# -- instance ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (UUID, UUID),
        (UUID.upper(), UUID),  # case folded to libvirt's canonical form
        ("4DEA22B3-1d52-D8F3-2516-782e98ab3fa0", UUID),
        ("web-1", "web-1"),
        ("demo_db.prod", "demo_db.prod"),
        ("a", "a"),
        ("x" * 128, "x" * 128),
        ("guest+backup:2@eu", "guest+backup:2@eu"),
        ("_private", "_private"),
    ],
)
def test_valid_instances(value: str, expected: str) -> None:
    assert validation.instance(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        None,
        42,
        4.5,
        ["web-1"],
        {"uuid": UUID},
        b"web-1",
        "../etc/passwd",
        "a/b",
        "/abs",
        "qemu:///system",  # a URI is never an instance
        "web 1",
        "-leading-dash",
        ".hidden",
        "x" * 129,
        "web-1\n",  # a trailing newline must not slip past the pattern
        "web-1\x00",
        "wéb",
        # near-UUIDs: a typo must not be taken for a domain name
        UUID[:-1],  # 35 characters
        UUID + "0",  # 37 characters
        "4dea22b31-d52-d8f3-2516-782e98ab3fa0",  # dash in the wrong place
        "4dea22b3-1d52-d8f3-2516782e98ab3fa0-",
        UUID.replace("-", ""),  # libvirt would read this as a UUID, dormant as a name
        "urn:uuid:" + UUID,
        "{" + UUID + "}",
        UUID + "\n",
    ],
)
def test_malformed_instances_are_refused(value: Any) -> None:
    with pytest.raises(InvalidInput) as info:
        validation.instance(value)
    assert "instance" in str(info.value)


def test_refusal_names_the_value() -> None:
    with pytest.raises(InvalidInput, match="a/b"):
        validation.instance("a/b")


def test_is_uuid_wants_the_canonical_form() -> None:
    assert validation.is_uuid(UUID)
    assert validation.is_uuid(UUID.upper())
    assert not validation.is_uuid(UUID.replace("-", ""))
    assert not validation.is_uuid("{" + UUID + "}")
    assert not validation.is_uuid("web-1")


# -- request_id --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value", ["r", "nightly-42", "a" * validation.MAX_REQUEST_ID, "svc/job:7@host+x=y.z_1"]
)
def test_valid_request_ids(value: str) -> None:
    assert validation.request_id(value) == value


def test_no_request_id_is_allowed() -> None:
    assert validation.request_id(None) is None


@pytest.mark.parametrize(
    "value",
    ["", "a" * (validation.MAX_REQUEST_ID + 1), "has space", "semi;colon", "new\nline",
     "trailing\n", "ünï", 7, 7.0, ["x"], b"abc", True],
)
def test_malformed_request_ids_are_refused(value: Any) -> None:
    with pytest.raises(InvalidInput, match="request_id"):
        validation.request_id(value)


# -- max_seconds -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), (1, 1.0), (0.5, 0.5), (validation.MAX_PAUSE_SECONDS,
                                          float(validation.MAX_PAUSE_SECONDS))],
)
def test_valid_max_seconds(value: Any, expected: float | None) -> None:
    assert validation.max_seconds(value) == expected


@pytest.mark.parametrize(
    "value",
    [0, -1, -0.5, validation.MAX_PAUSE_SECONDS + 1, float("nan"), float("inf"), True, False,
     "60", [60]],
)
def test_malformed_max_seconds_are_refused(value: Any) -> None:
    with pytest.raises(InvalidInput, match="max_seconds"):
        validation.max_seconds(value)


# -- target ------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["running", "paused", "suspended"])
def test_valid_targets(value: str) -> None:
    assert validation.target(value) is Target(value)


@pytest.mark.parametrize("value", ["Running", "shutoff", "missing", "", None, 1, ["paused"]])
def test_unknown_targets_are_refused(value: Any) -> None:
    with pytest.raises(InvalidInput) as info:
        validation.target(value)
    assert "running, paused, suspended" in str(info.value)
