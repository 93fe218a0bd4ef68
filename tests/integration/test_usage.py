"""``dormant usage`` on a real redis-server after a real worker did some work: every key is
in a family, counted, measured; and what dormant sends itself leaves no Celery result."""

from __future__ import annotations

import json
import random

import pytest

from tests.integration.test_cli import _ok, dormant
from tests.support.services import wait_until
from worker.reclaim import sampling
from worker.store import keys
from worker.store import usage as measuring

pytestmark = pytest.mark.integration


def test_usage_accounts_for_every_key_a_worker_writes(start_worker, client_app, dormant_env,
                                                      redis_clean, host_name):  # type: ignore[no-untyped-def]
    start_worker(pool="threads", concurrency=2,
                 env={"DORMANT_LIBVIRT_URI": "test:///default", "DORMANT_EVENTS": "false"})
    for action in ("dormant.pause", "dormant.unpause"):
        result = client_app.send_task(action, args=["test"], queue=f"dormant.{host_name}",
                                      kwargs={"request_id": f"usage-{action}"})
        assert result.get(timeout=60)["outcome"] in {"changed", "already"}
    # What beat sends: the fan-out, then one dormant.sample per host, neither keeping a result.
    client_app.send_task("dormant.sample_fleet", queue="dormant.control").forget()
    state = redis_clean.client(2)
    wait_until(lambda: sampling.sampled(state, host_name, since=0), timeout=60,
               message="the fan-out's sample stored")

    report = json.loads(_ok(dormant(dormant_env, "usage", "--json", "--sample", "0")).stdout)
    found = {(f["store"], f["family"]): f for f in report["families"]}
    assert not [f for f in report["families"] if f["family"] == "other"], found
    assert found[("results", "results")]["keys"] == 2  # the two transitions; no sample's
    assert found[("state", "idempotency records")]["keys"] == 2
    assert found[("state", "journals")]["keys"] == 2  # the guest's and the fleet's
    assert found[("state", "journals")]["items"] == 4
    assert found[("state", "samples")]["keys"] >= 3  # record, host times, host index
    assert found.get(("broker", "unacked"), {"items": 0})["items"] == 0  # all acknowledged
    for family in report["families"]:
        assert family["bytes"] > 0 and not family["estimated"], family
    samples = found[("state", "samples")]
    exact = sum(state.memory_usage(k) for k in state.scan_iter(match="dormant:*")
                if keys.family(k).name == "samples")
    assert samples["bytes"] == exact
    assert {s["store"] for s in report["servers"]} == {"broker", "results", "state"}
    table = _ok(dormant(dormant_env, "usage")).stdout
    assert "idempotency records" in table and "DORMANT_RESULT_TTL" in table


def test_a_sampled_family_is_estimated_from_a_few_keys(redis_clean):  # type: ignore[no-untyped-def]
    client = redis_clean.client(2)
    rng = random.Random(7)
    with client.pipeline(transaction=False) as pipe:
        for i in range(3000):
            pipe.set(keys.request(f"r{i}"), "x" * rng.randrange(100, 300))
        pipe.execute()
    exact = {f.family: f for f in measuring.scan(client, "state", sample=0)}
    estimate = {f.family: f for f in measuring.scan(client, "state", sample=300, rng=rng)}
    records = "idempotency records"
    assert estimate[records].keys == exact[records].keys == 3000
    assert estimate[records].measured == 300 and exact[records].measured == 3000
    assert estimate[records].bytes == pytest.approx(exact[records].bytes, rel=0.05)


def test_a_family_of_small_keys_and_a_few_large_ones_is_estimated_by_kind(redis_clean):  # type: ignore[no-untyped-def]
    """The registry: a key per guest (~100 B) and a hash per host (~60 KB). A sample of the
    family as a whole would mostly miss the hashes or, hitting one, multiply it by thousands."""
    client = redis_clean.client(2)
    with client.pipeline(transaction=False) as pipe:
        for i in range(5000):
            pipe.set(keys.where(f"{i:08x}-0000-4000-8000-{i:012x}"), f"h{i % 5}")
        for h in range(5):
            pipe.hset(keys.host_instances(f"h{h}"),
                      mapping={f"{i:08x}-0000-4000-8000-{i:012x}": f"guest-{i}"
                               for i in range(1000)})
        pipe.execute()
    exact = {f.family: f for f in measuring.scan(client, "state", sample=0)}["registry"]
    for seed in range(5):
        estimate = {f.family: f for f in measuring.scan(client, "state", sample=100,
                                                         rng=random.Random(seed))}["registry"]
        assert estimate.measured == 105  # 100 of the small kind, all 5 of the large
        assert estimate.bytes == pytest.approx(exact.bytes, rel=0.05)
