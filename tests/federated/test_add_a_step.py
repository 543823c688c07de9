"""docs/architecture.md, "How to add a federated step", followed once: a new message kind declared in
the protocol's style, its site function registered with @site_step, asked through the coordinator's
Exchange over the in-process transport (each site answers with protocol.answer, as its worker does)."""

from __future__ import annotations

from typing import Literal

import pytest

from medmerge.federated import protocol
from medmerge.federated.coordinator import Exchange
from medmerge.federated.protocol import Name, Reply, Request, site_step
from medmerge.federated.site import Site
from tests.federated.common import study


class EchoRequest(Request):
    KIND = "echo_test"
    word: Name


class EchoReply(Reply):
    KIND = "echo_test"
    word: Name
    role: Literal["expert", "evaluate"]


@pytest.fixture
def echo_step():
    @site_step(EchoRequest, EchoReply)
    def echo(site: Site, request: EchoRequest) -> EchoReply:
        return EchoReply(site=site.name, word=request.word[::-1], role=site.role)

    yield echo
    protocol.STEPS.pop(EchoRequest.KIND)


def test_a_new_step_is_asked_and_answered_through_the_exchange(tmp_path, tiny_llama, echo_step):
    config = study(tmp_path, tiny_llama)
    names = [s.name for s in config.sites]
    sites = {n: Site(n, config.for_party(n), tmp_path / n) for n in names}

    def send(payload, to: list[str]):  # the in-process transport: keys are the sites it called
        return {n: protocol.answer(sites[n], payload) for n in to}

    exchange = Exchange(send=send, sites=names, min_sites=1, run="0" * 32)
    replies = exchange.ask(EchoRequest, "echo_test", word="abc")
    assert {n: (r.site, r.word, r.role) for n, r in replies.items()} == {
        n: (n, "cba", "expert") for n in names
    }
    with pytest.raises(ValueError, match="registered twice"):
        site_step(EchoRequest, EchoReply)(echo_step)
    bad = EchoRequest.model_construct(run="0" * 32, word="../x").payload()  # a name that would touch a path
    reply = protocol.decode(protocol.answer(sites[names[0]], bad), EchoReply, sender=names[0])
    assert reply.KIND == "error" and reply.code == "bad_request"
