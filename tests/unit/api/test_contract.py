"""The task contract: argument lists checked by name, and request ids bound to a fingerprint.

Reuse sequences run on libvirt's in-process test driver and a fakeredis Store; the real
worker processes and KVM guests are in tests/integration/test_contract.py.
"""

from __future__ import annotations

from typing import Any

import libvirt
import pytest

from tests.unit.conftest import DomainFactory
from worker.api import contract
from worker.api.contract import Fingerprint
from worker.core.errors import InvalidInput
from worker.hypervisor import Hypervisor
from worker.store import keys
from worker.transition.context import Context, Request
from worker.transition.guards import Held, Reused, Store
from worker.transition.runner import run
from worker.transition.table import Action


@pytest.fixture
def ctx(hypervisor: Hypervisor, store: Store) -> Context:
    return Context(hypervisor=hypervisor, store=store, host="hv1", lock_wait=0.2,
                   verify_timeout=2.0)


# -- argument lists ---------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "args", "kwargs", "words"), [
    ("dormant.pause", [], {}, ["missing required argument 'instance'"]),
    ("dormant.pause", ["g"], {"reqest_id": "x"}, ["unknown argument 'reqest_id'",
                                                  "instance, request_id, max_seconds"]),
    ("dormant.pause", ["g"], {"target": "paused"}, ["unknown argument 'target'"]),
    ("dormant.pause", ["g", "r", 5, 6], {}, ["at most 3 positional", "got 4"]),
    ("dormant.unpause", ["g"], {"max_seconds": 5}, ["unknown argument 'max_seconds'"]),
    ("dormant.ensure", ["g"], {}, ["missing required argument 'target'"]),
    ("dormant.ensure", ["g", "running"], {"target": "paused"}, ["'target' given twice"]),
    ("dormant.status", ["a", "b"], {}, ["at most 1 positional"]),
    ("dormant.ping", [1], {}, ["at most 0 positional", "no arguments"]),
    ("dormant.sample", [], {"host": "x"}, ["unknown argument 'host'"]),
    ("dormant.reclaim", [], {"dry_run": "yes"}, ["dry_run must be true or false"]),
    ("dormant.reclaim", ["bad id!"], {}, ["malformed run id"]),
    ("dormant.run_item", ["r1"], {}, ["missing required argument 'instance'"]),
    ("dormant.restore", [], {}, ["missing required argument 'run_id'"]),
    ("dormant.drain", [], {"instances": "web-1"}, ["instances must be a non-empty list"]),
    ("dormant.drain", [], {"instances": ["../x"]}, ["malformed instance"]),
    ("dormant.sample_fleet", [], {"x": 1}, ["unknown argument 'x'"]),
    ("dormant.reclaim_fleet", [None], {}, ["at most 0 positional"]),
])
def test_a_malformed_call_names_the_argument(name: str, args: list[Any],
                                             kwargs: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(InvalidInput) as caught:
        contract.spec(name).bind(args, kwargs)
    for word in words:
        assert word in str(caught.value), str(caught.value)


def test_a_good_call_binds_by_name() -> None:
    assert contract.PAUSE.bind(["g"], {"max_seconds": 5}) == {"instance": "g", "max_seconds": 5}
    assert contract.DRAIN.bind([], {"instances": ["B"]}) == {"instances": ["B"]}
    assert contract.RECLAIM.bind([None, True], {}) == {"run_id": None, "dry_run": True}


def test_a_huge_value_is_quoted_short() -> None:
    with pytest.raises(InvalidInput) as caught:
        contract.PAUSE.bind(["g"], {"x" * 5000: 1})
    assert len(str(caught.value)) < 250


def test_every_task_of_the_app_is_in_the_contract() -> None:
    from tasks import app

    app.loader.import_default_modules()
    names = {n for n in app.tasks if n.startswith("dormant.")}
    assert names == set(contract.TASKS)


# -- fingerprints -----------------------------------------------------------------------------
def test_fingerprint_round_trip() -> None:
    fp = Fingerprint("pause", "u-1", "", 60)
    assert Fingerprint.parse(fp.key()) == Fingerprint("pause", "u-1", "", 60.0)
    assert fp.key() == Fingerprint("pause", "u-1", "", 60.0).key()
    assert "--max-seconds 60" in fp.describe("web")


def _journal_outcomes(store: Store, instance: str | None = None) -> list[str]:
    return [e["outcome"] for e in store.journal(instance)]


@pytest.mark.parametrize("spell", ["uuid", "name"])
def test_a_reused_request_id_is_refused_and_nothing_is_done(
        ctx: Context, store: Store, make_domain: DomainFactory, spell: str) -> None:
    g, h = make_domain(), make_domain()

    def ref(dom: libvirt.virDomain) -> str:
        return dom.UUIDString() if spell == "uuid" else dom.name()

    first = run(ctx, Request(action=Action.PAUSE, instance=ref(g), request_id="X"))
    assert first["outcome"] == "changed"
    for action, dom in ((Action.UNPAUSE, g), (Action.PAUSE, h)):
        with pytest.raises(InvalidInput) as caught:
            run(ctx, Request(action=action, instance=ref(dom), request_id="X"))
        message = str(caught.value)
        assert "'X'" in message and f"pause of {g.UUIDString()}" in message, message
    assert g.state()[0] == libvirt.VIR_DOMAIN_PAUSED
    assert h.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    # The refusals are journaled as rejected; nothing else was written for them.
    assert _journal_outcomes(store) == ["changed", "rejected", "rejected"]
    assert store.request("X")["fingerprint"] == f"pause|{g.UUIDString()}||"
    assert store.redis.get(keys.lock(h.UUIDString())) is None


def test_other_parameters_are_part_of_the_fingerprint(
        ctx: Context, store: Store, make_domain: DomainFactory) -> None:
    g = make_domain()
    run(ctx, Request(action=Action.PAUSE, instance=g.name(), request_id="P",
                     max_seconds=60))
    with pytest.raises(InvalidInput, match="--max-seconds 60"):
        run(ctx, Request(action=Action.PAUSE, instance=g.name(), request_id="P"))
    run(ctx, Request(action=Action.ENSURE, instance=g.name(), request_id="E", target="running"))
    with pytest.raises(InvalidInput, match="to running"):
        run(ctx, Request(action=Action.ENSURE, instance=g.name(), request_id="E",
                         target="suspended"))


def test_name_and_uuid_of_one_guest_are_the_same_instance(
        ctx: Context, store: Store, make_domain: DomainFactory) -> None:
    g = make_domain()
    first = run(ctx, Request(action=Action.SUSPEND, instance=g.name(), request_id="N"))
    again = run(ctx, Request(action=Action.SUSPEND, instance=g.UUIDString(), request_id="N"))
    third = run(ctx, Request(action=Action.SUSPEND, instance=g.name(), request_id="N"))
    assert first["outcome"] == "changed"
    assert again["outcome"] == third["outcome"] == "duplicate"
    assert _journal_outcomes(store) == ["changed"]


def test_an_id_in_flight_is_already_bound(store: Store) -> None:
    """A pending record carries the fingerprint: a concurrent reuse is refused too."""
    held = store.acquire("F", "u-1", wait=0, fingerprint="pause|u-1||")
    assert isinstance(held, Held)
    other = store.acquire("F", "u-2", wait=0, fingerprint="pause|u-2||")
    assert isinstance(other, Reused) and other.record["fingerprint"] == "pause|u-1||"
    assert store.redis.get(keys.lock("u-2")) is None
    store.record_intent(held, "F", {"state_before": "running", "fingerprint": "pause|u-1||"})
    assert isinstance(store.acquire("F", "u-2", wait=0, fingerprint="pause|u-2||"), Reused)


def test_a_binding_alone_is_not_a_started_request(store: Store) -> None:
    """Reclamation re-checks a guest unless its request already reached libvirt."""
    assert not store.started("S")
    held = store.acquire("S", "u-1", wait=0, fingerprint="suspend|u-1||")
    assert isinstance(held, Held)
    assert store.request("S") is not None and not store.started("S")
    store.record_intent(held, "S", {"state_before": "running", "fingerprint": "suspend|u-1||"})
    assert store.started("S")
