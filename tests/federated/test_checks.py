"""The coordinator refuses an adapter for another base or with wrong shapes, in one line naming the site;
the objective aggregates site numbers as configured; a party's config copy holds only its own SPECs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save

from medmerge.errors import MedmergeError
from medmerge.federated.checks import base_shapes, check_adapter
from medmerge.federated.config import FederatedConfig
from medmerge.federated.verdict import objective
from medmerge.federated.wire import Payload
from medmerge.manifest import checksum

KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"


def adapter(a_shape, b_shape) -> dict[str, bytes]:
    tensors = {KEY.format("A"): torch.zeros(a_shape), KEY.format("B"): torch.zeros(b_shape)}
    return {"adapter_model.safetensors": save(tensors), "adapter_config.json": json.dumps({"r": 4}).encode()}


def test_adapter_checks(tiny_llama):
    shapes, digest = base_shapes(tiny_llama), checksum(tiny_llama)
    out_f, in_f = shapes["model.layers.0.self_attn.q_proj.weight"]
    meta = {"base": {"checksum": digest}}
    check_adapter("north", meta, adapter((4, in_f), (out_f, 4)), digest, shapes)
    with pytest.raises(MedmergeError, match=r"^site north: adapter trained on another base") as exc:
        check_adapter(
            "north", {"base": {"checksum": "0" * 64}}, adapter((4, in_f), (out_f, 4)), digest, shapes
        )
    assert "\n" not in str(exc.value)
    with pytest.raises(MedmergeError, match=r"^site south: adapter tensor .* does not fit"):
        check_adapter("south", meta, adapter((4, in_f + 1), (out_f, 4)), digest, shapes)


def test_objective_and_party_copies(tiny_qa_jsonl):
    numbers = {"a": {"nll_sum": 10.0, "tokens": 10}, "b": {"nll_sum": 30.0, "tokens": 10}}
    assert objective(numbers, "tokens") == 2.0 and objective(numbers, "sites") == 2.0
    assert objective(numbers, "worst_site") == 3.0
    # a site's non-finite loss fails the trial; no site: no score
    assert objective({**numbers, "c": {"nll_sum": None, "tokens": 10}}, "tokens") == math.inf
    assert objective({}, "sites") == math.inf
    config = FederatedConfig(sites=[{"name": "a", "data": [f"jsonl:{tiny_qa_jsonl}"]}, {"name": "b"}])
    assert all(not s.data for s in config.for_party(None).sites)
    assert config.for_party("a").site("a").data and not config.for_party("b").site("a").data


def test_payload_round_trip():
    pytest.importorskip("flwr")
    p = Payload("score", {"recipe": {"method": "linear"}}, {"x": b"\x00\x01"})
    assert Payload.from_record(p.to_record()) == p
    assert p.size == len(p.meta_text().encode()) + 2


def test_statistics_checks(tiny_llama):
    """Shared statistics are refused (one line naming the site) unless the record describes the tensor
    file and every tensor fits the base: a Gram (in, in), a Fisher the weight's shape, float32."""
    import hashlib

    from medmerge.federated.checks import check_statistics
    from medmerge.federated.site import STATISTICS_FILES
    from medmerge.site_stats import INFO_FILE, TENSORS_FILE

    assert (TENSORS_FILE, INFO_FILE) == STATISTICS_FILES
    shapes = base_shapes(tiny_llama)
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    out_f, in_f = shapes[q]

    def files(tensors, aliases=None, kinds=("gram",), **record) -> dict[str, bytes]:
        data = save(tensors)
        info = {"format": "medmerge-statistics/1", "kinds": list(kinds), "aliases": aliases or {}}
        info |= {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} | record
        return {TENSORS_FILE: data, INFO_FILE: json.dumps(info).encode()}

    good = files({f"gram::{q}": torch.eye(in_f), f"fisher::{q}": torch.ones(out_f, in_f)}, {k: q})
    check_statistics("north", good, shapes, ["gram"])
    refusals = {
        "expected": {TENSORS_FILE: good[TENSORS_FILE]},
        "no fisher": good,
        "SHA-256": files({f"gram::{q}": torch.eye(in_f)}, sha256="0" * 64),
        "expected F32": files({f"gram::{q}": torch.eye(in_f + 1)}),
        "no statistic": files({f"gram::{q}.nope": torch.eye(in_f)}),
        "alias": files({f"gram::{q}": torch.eye(in_f)}, {k: "model.layers.9.mlp.up_proj.weight"}),
    }
    for why, blobs in refusals.items():
        kinds = ["gram", "fisher"] if why == "no fisher" else ["gram"]
        with pytest.raises(MedmergeError, match=rf"^site north: shared statistics refused \(.*{why}") as exc:
            check_statistics("north", blobs, shapes, kinds)
        assert "\n" not in str(exc.value)


def test_a_failed_request_is_logged_at_the_site_and_shown_by_the_launcher(tmp_path, capsys):
    """The coordinator only learns that a site failed; the site's own log says why, and `medmerge federate`
    (local mode: the sites' logs are on this machine) prints it."""
    from medmerge.federated.launcher import LocalFederation
    from medmerge.federated.wire import Payload
    from medmerge.federated.worker import answer

    reply = answer("north", str(tmp_path / "missing.yaml"), str(tmp_path), Payload("train"))
    # on the wire: the exception's type and a fixed code, never its text (here: a path)
    assert reply.kind == "error" and reply.meta == {
        "site": "north",
        "error": "MedmergeError",
        "code": "failed",
    }
    assert b"missing.yaml" not in reply.to_bytes()
    logged = capsys.readouterr().err.strip()
    assert logged.startswith("medmerge site failed: north train: ") and "missing.yaml" in logged

    federation = LocalFederation.__new__(LocalFederation)  # only its log folder is read
    federation.logs = tmp_path / "logs"
    federation.logs.mkdir()
    (federation.logs / "worker-north.log").write_text("progress…\n" + logged + "\n")
    (federation.logs / "worker-south.log").write_text("progress…\n")
    (error,) = federation.site_errors()
    assert (
        error.startswith("north train: ")
        and "missing.yaml" in error
        and error.endswith("(logs/worker-north.log)")
    )


def test_a_failure_without_a_message_is_still_one_line(tmp_path, monkeypatch):
    import medmerge.config
    from medmerge.federated.wire import Payload
    from medmerge.federated.worker import answer

    def fail(*args, **kwargs):
        raise KeyError()

    monkeypatch.setattr(medmerge.config, "load_config", fail)
    reply = answer("north", str(tmp_path / "config.yaml"), str(tmp_path), Payload("train"))
    assert reply.kind == "error" and reply.meta["error"] == "KeyError" and reply.meta["code"] == "failed"


def test_adapter_config_leaves_and_arrives_clean():
    """Before sending, a site drops every key outside ADAPTER_CONFIG_KEYS and sets the study's base id;
    on receipt, the coordinator refuses an unknown key, and NaN, outright."""
    from medmerge.federated.site import clean_adapter_config

    local = {"r": 4, "lora_alpha": 8, "base_model_name_or_path": "/home/site/models/base"}
    local |= {"eva_config": {"cache": "/home/site/data"}, "revision": "/home/site/rev"}
    sent = json.loads(clean_adapter_config(json.dumps(local).encode(), "smollm2-135m", strict=False))
    assert sent == {"r": 4, "lora_alpha": 8, "base_model_name_or_path": "smollm2-135m"}
    assert "/home/site" not in json.dumps(sent)
    with pytest.raises(ValueError, match="unexpected key 'eva_config'"):
        clean_adapter_config(json.dumps(local).encode(), "smollm2-135m")
    with pytest.raises(ValueError, match="NaN"):
        clean_adapter_config(b'{"r": 4, "lora_alpha": NaN}', "smollm2-135m")
    assert json.loads(clean_adapter_config(json.dumps(sent).encode(), "x"))["base_model_name_or_path"] == "x"


def test_protocol_refuses_malformed_messages():
    """decode: a wrong kind, an unknown blob name, a missing blob, a frame that does not parse, a name
    that is no name — each one line naming the field."""
    from medmerge.federated.protocol import ScoreReply, StatisticsRequest, TrainReply, decode
    from medmerge.federated.wire import ProtocolError

    good = {"site": "north", "nll_sum": 1.5, "tokens": 3}
    assert decode(Payload("score", good), ScoreReply, sender="north").tokens == 3
    cases = [
        (Payload("fedavg", good), ScoreReply, "kind: 'fedavg', expected 'score'"),
        (Payload("score", good | {"tokens": -1}), ScoreReply, "tokens: Input should be greater"),
        (Payload("score", good | {"tokens": "3"}), ScoreReply, "tokens: Input should be a valid integer"),
        (Payload("score", good, {"x": b""}), ScoreReply, "blob 'x': not a blob of a score message"),
        (Payload.from_bytes(b"\x00" * 8 + b"junk"), ScoreReply, "message: "),
        (Payload("statistics", {"run": "0" * 32, "peer": "../x"}), StatisticsRequest, "peer: String should"),
        (Payload("train", {"site": "north"}), TrainReply, "base: Field required"),
    ]
    for payload, model, message in cases:
        with pytest.raises(ProtocolError) as exc:
            decode(payload, model, sender="north")
        assert str(exc.value).startswith(message) and "\n" not in str(exc.value), (str(exc.value), message)
    blob = {"statistics.safetensors": b"", "statistics.json": b"{}"}
    with pytest.raises(ProtocolError, match="blob 'statistics.json': missing"):
        decode(
            Payload("statistics", {"run": "0" * 32, "peer": "x"}, dict(list(blob.items())[:1])),
            StatisticsRequest,
        )


def test_self_reported_weights_are_capped():
    """FedAvg's pairs and the objective's tokens: each clipped to weight_cap × the median, so a site
    that claims a million tokens with a tiny loss cannot steer the objective; two sites are never
    clipped at the default cap 2."""
    from medmerge.federated.verdict import capped

    assert capped({"a": 100.0, "b": 120.0, "liar": 1e6}, 2.0) == {"a": 100.0, "b": 120.0, "liar": 240.0}
    assert capped({"a": 1.0, "b": 1000.0}, 2.0) == {"a": 1.0, "b": 1000.0}
    honest = {"a": {"nll_sum": 200.0, "tokens": 100}, "b": {"nll_sum": 240.0, "tokens": 120}}
    liar = honest | {"liar": {"nll_sum": 0.0, "tokens": 1_000_000}}
    assert objective(liar, "tokens") < 1e-3  # uncapped, the liar's claim decides
    capped_loss = objective(liar, "tokens", cap=2.0)  # = (200 + 240 + 0) / (100 + 120 + 240)
    assert capped_loss == pytest.approx(440 / 460) and objective(honest, "tokens", cap=2.0) == 2.0
    assert objective(liar, "worst_site") == 2.0
