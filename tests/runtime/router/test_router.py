"""``hetserve route`` against stand-in backends on 127.0.0.1: the plan's routing, ejection and
re-admission, retries before the first token, streams relayed as they are, P/D's two steps, its metrics,
and the mistakes a user can make on its command line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from hetserve.runtime.api.metrics import parse_prometheus  # noqa: E402
from hetserve.runtime.api.server import BackgroundServer  # noqa: E402
from hetserve.runtime.router.app import RouterSettings, check_backend, create_router_app  # noqa: E402
from hetserve.runtime.router.backends import backends_for  # noqa: E402

from .fakes import Fake, closed_port_url, plan_of  # noqa: E402

SLOW_CHECKS = RouterSettings(health_interval=3600)  # only the first check runs: tests drive the rest


@contextlib.contextmanager
def serving(*fakes: Fake):
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(BackgroundServer(f.app)).url for f in fakes]


@contextlib.contextmanager
def router(plan, urls: dict[str, str], settings=SLOW_CHECKS):
    backends = backends_for(plan, urls)
    with BackgroundServer(create_router_app(plan, backends, settings)) as srv:
        yield srv.url, {b.name: b for b in backends}


def complete(url, stream=False, chat=False, **extra):
    body = {"model": "m", "max_tokens": 3, "stream": stream, **extra}
    if chat:
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "hi"
    path = "/v1/chat/completions" if chat else "/v1/completions"
    return httpx.post(url + path, json=body, timeout=30)


def replicas(n=2, **routing):
    return plan_of([{"name": f"r{k}", "role": "mixed", "max_batch_size": 8} for k in range(n)], routing)


def test_least_work_shares_idle_replicas_in_turn():
    fakes = [Fake("a"), Fake("b")]
    with serving(*fakes) as urls, router(replicas(), {"r0": urls[0], "r1": urls[1]}) as (url, _):
        for _ in range(6):
            r = complete(url)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == "abc"
    assert [len(f.received) for f in fakes] == [3, 3]


def test_weighted_routing_follows_the_plans_weights():
    fakes = [Fake("a"), Fake("b")]
    plan = replicas(policy="weighted", weights={"r0": 3, "r1": 1})
    with serving(*fakes) as urls, router(plan, {"r0": urls[0], "r1": urls[1]}) as (url, _):
        for _ in range(8):
            assert complete(url).status_code == 200
    assert [len(f.received) for f in fakes] == [6, 2]


def test_a_dead_backend_is_ejected_and_its_requests_served_elsewhere():
    """r0 passes the router's first health check, then its server goes away: the next request sent there
    fails to connect, is tried on r1, and r0 is ejected; every request is answered."""
    dying, live = Fake("a"), Fake("b")
    with serving(live) as (live_url,):
        first = BackgroundServer(dying.app).__enter__()
        with router(replicas(), {"r0": first.url, "r1": live_url}) as (url, bs):
            assert complete(url).status_code == 200 and bs["r0"].healthy
            first.__exit__(None, None, None)
            answers = [complete(url, stream=k % 2 == 1) for k in range(6)]
            assert all(r.status_code == 200 for r in answers)
            assert not bs["r0"].healthy and bs["r1"].healthy
            assert len(dying.received) + len(live.received) == 7
            health = httpx.get(url + "/health").json()
            assert health["status"] == "ok" and "r0" in health["down"]
            m = parse_prometheus(httpx.get(url + "/metrics").text)
            assert m['hetserve_router_backend_up{backend="r0"}'] == 0
            assert m['hetserve_router_ejections_total{backend="r0"}'] == 1
            assert m["hetserve_router_retries_total"] == 1  # one request found r0 gone, then none was sent


def test_no_backend_up_is_a_503_that_names_them_and_health_says_so():
    plan = replicas()
    with router(plan, {"r0": closed_port_url(), "r1": closed_port_url()}) as (url, _):
        r = complete(url)
        assert r.status_code == 503 and "r0" in r.json()["error"]["message"]
        h = httpx.get(url + "/health")
        assert h.status_code == 503 and "no entry backend is up" in h.json()["message"]


def test_a_5xx_is_retried_elsewhere_but_a_4xx_is_the_clients_answer():
    bad, good = Fake("a"), Fake("b")
    bad.mode = "http500"
    with serving(bad, good) as urls, router(replicas(), {"r0": urls[0], "r1": urls[1]}) as (url, bs):
        assert all(complete(url).status_code == 200 for _ in range(4))
        assert bs["r0"].healthy  # an engine error is not a dead server
        bad.mode = good.mode = "http400"
        r = complete(url)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        # least recently chosen first: r0 took every first try (and failed over to r1), then the 400,
        # which was not tried again
        assert (len(bad.received), len(good.received)) == (5, 4)


def events(r) -> list[str]:
    return [line for line in r.text.splitlines() if line.startswith("data:")]


def settled(bs, looks: int = 500) -> bool:
    """Whether every backend's in-flight count returns to 0 within ``looks`` looks 10 ms apart: a stream
    releases its backend after the client has its last event, so the count may lag that event."""
    for _ in range(looks):
        if all(b.in_flight == 0 for b in bs.values()):
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("chat", [False, True])
def test_streams_are_relayed_as_the_backend_sent_them(chat):
    fake = Fake("a")
    with serving(fake) as (u,), router(replicas(1), {"r0": u}) as (url, bs):
        r = complete(url, stream=True, chat=chat)
        direct = complete(u, stream=True, chat=chat)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert events(r) == events(direct) and events(r)[-1] == "data: [DONE]"
        assert settled(bs)


def test_a_stream_that_dies_before_a_token_is_retried_and_after_one_ends_with_an_error():
    dying, good = Fake("a"), Fake("b", tokens=("x", "y", "z"))
    dying.mode = "die-before-token"
    plan = replicas(policy="weighted", weights={"r0": 1000, "r1": 1})  # r0 first
    with serving(dying, good) as urls, router(plan, {"r0": urls[0], "r1": urls[1]}) as (url, bs):
        r = complete(url, stream=True, chat=True)
        texts = [json.loads(e[5:])["choices"][0]["delta"].get("content") for e in events(r)[:-1]]
        assert "".join(t for t in texts if t) == "xyz"  # all from the second backend, nothing doubled
        assert texts.count(None) == 2  # one role event and one end event: the first backend's was never sent
        assert len(dying.received) == 1 and len(good.received) == 1
        bs["r0"].admit()
        dying.mode = "die-after-token"
        r = complete(url, stream=True)
        evs = events(r)
        assert json.loads(evs[0][5:])["choices"][0]["text"] == "a"
        assert "error" in json.loads(evs[-2][5:]) and evs[-1] == "data: [DONE]"
        assert len(good.received) == 1  # a stream under way is not started again elsewhere
        assert settled(bs)


def pd_plan(decoders=1, **routing):
    instances = [{"name": "p0", "role": "prefill", "max_batch_size": 8}]
    instances += [{"name": f"d{k}", "role": "decode", "max_batch_size": 8} for k in range(decoders)]
    return plan_of(instances, routing)


@pytest.mark.parametrize("stream", [False, True])
def test_pd_plans_prefill_then_decode_with_the_kv_transfer_params(stream):
    pre, dec = Fake("p"), Fake("d")
    with serving(pre, dec) as urls, router(pd_plan(), {"p0": urls[0], "d0": urls[1]}) as (url, _):
        r = complete(url, stream=stream, max_tokens=3, temperature=0)
        assert r.status_code == 200
    (first,) = pre.received
    assert first["max_tokens"] == 1 and first["stream"] is False
    assert first["kv_transfer_params"]["do_remote_decode"] is True
    assert "stream_options" not in first
    (second,) = dec.received
    assert second["max_tokens"] == 3 and second["stream"] is stream
    assert second["kv_transfer_params"] == {"do_remote_prefill": True, "remote_engine_id": "p"}


def test_pd_handoff_follows_the_plans_handoff_weights_and_skips_a_dead_decoder():
    pre, d0, d1 = Fake("p"), Fake("d0"), Fake("d1")
    plan = pd_plan(3, handoff="weighted", handoff_weights={"p0": {"d0": 1, "d1": 3, "d2": 0}})
    with serving(pre, d0, d1) as (p, u0, u1):
        with router(plan, {"p0": p, "d0": u0, "d1": u1, "d2": closed_port_url()}) as (url, bs):
            assert all(complete(url).status_code == 200 for _ in range(8))
    assert (len(d0.received), len(d1.received)) == (2, 6)
    with serving(pre, d0) as (p, u0):
        plan = pd_plan(2, handoff="weighted", handoff_weights={"p0": {"d0": 1, "d1": 9}})
        with router(plan, {"p0": p, "d0": u0, "d1": closed_port_url()}) as (url, bs):
            assert all(complete(url, stream=True).status_code == 200 for _ in range(3))
            assert not bs["d1"].healthy


def test_health_checks_eject_and_readmit():
    fake = Fake("a")
    fake.running = 5
    with serving(fake) as (u,):
        (b,) = backends_for(replicas(1), {"r0": u})

        async def check():
            async with httpx.AsyncClient() as client:
                await check_backend(b, client, 2.0)

        asyncio.run(check())
        assert b.healthy and b.reported == 5  # the backend's own count of running requests
        fake.healthy = False
        asyncio.run(check())
        assert not b.healthy and "503" in b.last_error
        fake.healthy = True
        asyncio.run(check())
        assert b.healthy and b.last_error == ""


def test_jffc_holds_a_request_until_a_chain_has_a_free_slot():
    fake = Fake("a")
    fake.delay = 0.3
    plan = plan_of([{"name": "c0", "role": "mixed", "max_batch_size": 1}], {"policy": "jffc"})
    with serving(fake) as (u,), router(plan, {"c0": u}) as (url, bs):
        out = []
        threads = [threading.Thread(target=lambda: out.append(complete(url).status_code)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert out == [200, 200, 200] and fake.most_at_once == 1 and settled(bs)


def test_models_and_bad_bodies():
    fake = Fake("a")
    with serving(fake) as (u,), router(replicas(1), {"r0": u}) as (url, _):
        assert httpx.get(url + "/v1/models").json()["data"][0]["owned_by"] == "a"
        r = httpx.post(
            url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = httpx.post(url + "/v1/completions", content=b"x", headers={"content-type": "text/plain"})
        assert r.status_code == 415
    assert fake.received == []


def test_command_line_mistakes(run_cli, tmp_path):
    plan = "examples/serve/smollm2-pd.yaml"
    code, _, err = run_cli("route", "--plan", plan)
    assert code == 2 and "prefill=URL" in err and "decode=URL" in err
    code, _, err = run_cli(
        "route", "--plan", plan, "--backend", "prefill=http://127.0.0.1:1", "--backend", "x=http://h"
    )
    assert code == 2 and "x is not an instance" in err and "no --backend for decode" in err
    code, _, err = run_cli("route", "--plan", plan, "--backend", "prefill")
    assert code == 2 and "NAME=URL" in err
    code, _, err = run_cli("route", "--plan", tmp_path / "none.yaml", "--backend", "a=http://h")
    assert code == 2 and "none.yaml" in err
