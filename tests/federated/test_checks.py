"""The coordinator refuses an adapter for another base or with wrong shapes, in one line naming the site;
the objective aggregates site numbers as configured; a party's config copy holds only its own SPECs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load, save

from medmerge.errors import MedmergeError
from medmerge.federated.checks import base_shapes, check_adapter
from medmerge.federated.config import FederatedConfig
from medmerge.federated.verdict import objective
from medmerge.federated.wire import Payload
from medmerge.manifest import checksum
from tests.federated.lora_adapters import FILES, SETTINGS, edit, peft_adapter

KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
Q = "model.layers.0.self_attn.q_proj.weight"


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


@pytest.fixture(scope="module")
def study(tiny_llama):
    from medmerge.federated.checks import lora_study

    return lora_study(SETTINGS, tiny_llama, "tiny-base")


@pytest.fixture(scope="module")
def honest(tiny_llama, tmp_path_factory):
    return peft_adapter(tiny_llama, tmp_path_factory.mktemp("adapter"), seed=1)


def test_an_honest_peft_adapter_passes_and_peers_get_the_canonical_one(tiny_llama, study, honest, tmp_path):
    """The adapter PEFT saves is accepted, its ΔW is the one medmerge.merge reads from the folder, and what
    the coordinator forwards carries the study's config (base id, no site path) and the same ΔW."""
    from medmerge.federated.checks import canonical_adapter, validate_adapter
    from medmerge.merge.lora import delta_weight, read_adapter

    checked = validate_adapter("north", *(honest[f] for f in FILES), study)
    assert sorted(checked.factors) == study.modules and checked.rank == 4 and len(study.modules) == 14
    folder = tmp_path / "as-sent"
    folder.mkdir()
    for name, data in honest.items():
        (folder / name).write_bytes(data)
    modules, replaced, _ = read_adapter(folder)
    assert not replaced and set(modules) == set(checked.factors)
    for name, module in modules.items():
        assert torch.equal(checked.factors[name].delta(), delta_weight(module)), name

    forwarded = canonical_adapter(checked, study)
    config = json.loads(forwarded["adapter_config.json"])
    assert (
        config["base_model_name_or_path"] == "tiny-base"
        and str(tiny_llama) not in forwarded["adapter_config.json"].decode()
    )
    assert config["lora_alpha"] == 8.0 and config["alpha_pattern"] == {} and config["inference_mode"] is True
    again = validate_adapter("north", *(forwarded[f] for f in FILES), study)
    for name, factors in checked.factors.items():
        assert torch.equal(again.factors[name].delta(), factors.delta())


def _nan(tensors):
    key = next(k for k in tensors if ".lora_B." in k)
    tensors[key][0, 0] = float("nan")
    return tensors


FOREIGN = {
    "other alpha": ({"lora_alpha": 64.0}, None, r"adapter_config.json lora_alpha: 64.0, the study's is 8.0"),
    "rslora on": ({"use_rslora": True}, None, r"adapter_config.json use_rslora: True"),
    "alpha_pattern regex": ({"alpha_pattern": {"(a+)+$": 64}}, None, r"adapter_config.json alpha_pattern"),
    "rank_pattern": ({"rank_pattern": {"q_proj": 8}}, None, r"adapter_config.json rank_pattern"),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, None, r"adapter_config.json modules_to_save"),
    "unknown key": ({"site_path": "/home/x"}, None, r"adapter_config.json: unknown key 'site_path'"),
    "extra full tensor": (
        None,
        lambda t: t | {f"base_model.model.{Q}": torch.zeros(32, 32)},
        r"adapter_model.safetensors: tensor .* is no LoRA factor of the study",
    ),
    "embedding": (
        None,
        lambda t: t | {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 300)},
        r"adapter_model.safetensors: tensor .* is no LoRA factor of the study",
    ),
    "a module missing": (
        None,
        lambda t: {k: v for k, v in t.items() if "q_proj" not in k},
        r"adapter_model.safetensors: no tensor .*q_proj",
    ),
    "other rank": (
        None,
        lambda t: t | {KEY.format("A"): torch.zeros(8, 32), KEY.format("B"): torch.zeros(32, 8)},
        r"adapter_model.safetensors .*q_proj.lora_A.weight: shape \(8, 32\), expected \(4, 32\)",
    ),
    "float64": (
        None,
        lambda t: {k: v.double() for k, v in t.items()},
        r"adapter_model.safetensors: tensor .*: dtype 'F64' \(expected F32, F16, BF16\)",
    ),
    "NaN": (None, _nan, r"adapter_model.safetensors .*lora_B.weight: non-finite values"),
}


@pytest.mark.parametrize("case", list(FOREIGN))
def test_a_foreign_or_broken_adapter_is_refused_naming_the_site_and_field(study, honest, case):
    """Each field of the LoRA config is pinned to the study's, the tensors are exactly the study's LoRA
    factors (no full weights, no modules_to_save, no embedding adapter), float32/16/bf16, finite."""
    import time

    from medmerge.federated.checks import validate_adapter

    config, tensors, message = FOREIGN[case]
    blobs = edit(honest, config, tensors)
    started = time.perf_counter()
    with pytest.raises(MedmergeError, match=r"^site south: adapter refused \(" + message) as exc:
        validate_adapter("south", *(blobs[f] for f in FILES), study)
    assert "\n" not in str(exc.value) and time.perf_counter() - started < 1.0  # no pattern is compiled


def test_a_bf16_adapter_is_accepted_exactly(study, honest):
    from medmerge.federated.checks import canonical_adapter, validate_adapter

    blobs = edit(honest, tensors=lambda t: {k: v.bfloat16() for k, v in t.items()})
    checked = validate_adapter("north", *(blobs[f] for f in FILES), study)
    forwarded = load(canonical_adapter(checked, study)["adapter_model.safetensors"])
    assert all(v.dtype == torch.bfloat16 for v in forwarded.values())
    assert all(torch.equal(v, load(blobs["adapter_model.safetensors"])[k]) for k, v in forwarded.items())


@pytest.mark.parametrize(
    "data, why",
    [
        (b"\x00" * 4, "shorter than the 8-byte header length"),
        ((1 << 40).to_bytes(8, "little") + b"{}", "header length 1099511627776 exceeds"),
        (len(b"[1]").to_bytes(8, "little") + b"[1]", "header is not a JSON object"),
        (len(b"{}").to_bytes(8, "little") + b"{}" + b"junk", "data section is 4 bytes, its tensors 0"),
    ],
)
def test_a_malformed_safetensors_header_is_refused_before_it_is_read(study, honest, data, why):
    from medmerge.federated.checks import validate_adapter

    with pytest.raises(
        MedmergeError, match=r"^site north: adapter refused \(adapter_model.safetensors: " + why
    ):
        validate_adapter("north", honest["adapter_config.json"], data, study)


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


def statistics_files(tensors, aliases=None, kinds=("gram",), tokens=50, **record) -> dict[str, bytes]:
    """A site's shared statistics pair as federated.site shares it (record fields of SHARED_RECORD)."""
    import hashlib

    from medmerge.site_stats import INFO_FILE, TENSORS_FILE

    data = save(tensors)
    info = {"format": "medmerge-statistics/1", "kinds": list(kinds), "aliases": aliases or {}}
    info |= {"tokens": tokens, "per_kind": {"gram": {"examples": 4, "tokens": {"input": tokens}}}}
    info |= {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} | record
    return {TENSORS_FILE: data, INFO_FILE: json.dumps(info).encode()}


def gram(in_f: int, tokens: int = 50, seed: int = 0, norm: float = 1.0) -> torch.Tensor:
    """G = Σ_t x_t x_tᵀ over `tokens` random inputs with ‖x_t‖ = norm."""
    x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(seed))
    x = x / x.norm(dim=1, keepdim=True) * norm
    return x.T @ x


def test_statistics_checks(tiny_llama):
    """Shared statistics are refused (one line naming the site) unless the record describes the tensor
    file and every tensor fits the base: a Gram (in, in), a Fisher the weight's shape, float32; finite,
    a Gram symmetric with diagonal ≥ 0, a Fisher ≥ 0, the tokens declared within the study's bound and,
    with per-token clipping ‖x‖² ≤ C, trace G ≤ C · tokens."""
    from medmerge.federated.checks import StatisticsBounds, check_statistics
    from medmerge.federated.site import STATISTICS_FILES
    from medmerge.site_stats import INFO_FILE, TENSORS_FILE

    assert (TENSORS_FILE, INFO_FILE) == STATISTICS_FILES
    shapes = base_shapes(tiny_llama)
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    out_f, in_f = shapes[q]
    files = statistics_files
    bounds = StatisticsBounds.for_study(2, 24, 8, token_norm_sq=1.0)  # at most 2 × (24 + 8) = 64 tokens
    assert bounds == StatisticsBounds(max_tokens=64, token_norm_sq=1.0)

    good = files({f"gram::{q}": gram(in_f), f"fisher::{q}": torch.ones(out_f, in_f)}, {k: q})
    summary = check_statistics("north", good, shapes, ["gram"], bounds)
    assert summary.tokens == 50 and summary.mean_sq_norm[q] == pytest.approx(1.0, rel=1e-5)
    asymmetric, nan, negative = gram(in_f), gram(in_f), -torch.ones(out_f, in_f)
    asymmetric[0, 1] += 1.0
    nan[3, 3] = float("nan")
    refusals = {
        "expected": {TENSORS_FILE: good[TENSORS_FILE]},
        "no fisher": good,
        "SHA-256": files({f"gram::{q}": gram(in_f)}, sha256="0" * 64),
        "expected F32": files({f"gram::{q}": torch.eye(in_f + 1)}),
        "no statistic": files({f"gram::{q}.nope": gram(in_f)}),
        "alias": files({f"gram::{q}": gram(in_f)}, {k: "model.layers.9.mlp.up_proj.weight"}),
        "not symmetric": files({f"gram::{q}": asymmetric}),
        "non-finite": files({f"gram::{q}": nan}),
        "Fisher has negative": files(
            {f"gram::{q}": gram(in_f), f"fisher::{q}": negative}, kinds=("gram", "fisher")
        ),
        "more than the study's 64": files({f"gram::{q}": gram(in_f, 50)}, tokens=100),
        "tokens: None": files({f"gram::{q}": gram(in_f)}, tokens=None, per_kind={}),
        # the inflated Gram: ×1000, its trace is 1000 × what 50 clipped tokens can sum
        r"trace 5e\+04 exceeds C·tokens = 1 × 50": files({f"gram::{q}": gram(in_f) * 1000}),
    }
    for why, blobs in refusals.items():
        kinds = ["gram", "fisher"] if why == "no fisher" else ["gram"]
        with pytest.raises(MedmergeError, match=rf"^site north: shared statistics refused \(.*{why}") as exc:
            check_statistics("north", blobs, shapes, kinds, bounds)
        assert "\n" not in str(exc.value)


def test_an_inflated_gram_is_refused_against_the_other_sites_without_clipping(tiny_llama):
    """Without per-token clipping, trace/tokens (the mean ‖x‖² of a Linear's input) is compared across
    sites: a Gram ×1000 is 1000× the median of the sites' and is refused, the honest ones are not."""
    from medmerge.federated.checks import check_statistics
    from medmerge.federated.robust import K_GRAM, screen_gram_scales

    shapes = base_shapes(tiny_llama)
    q = "model.layers.0.self_attn.q_proj.weight"
    in_f = shapes[q][1]
    sent = {
        "north": files_of(gram(in_f, 50, 0, norm=1.0), 50),
        "south": files_of(gram(in_f, 40, 1, norm=1.3), 40),  # honest sites differ: 1.69× in mean ‖x‖²
        "east": files_of(gram(in_f, 60, 2, norm=0.9), 60),
        "west": files_of(gram(in_f, 50, 3, norm=1.0) * 1000, 50),
    }
    summaries = {s: check_statistics(s, b, shapes, ["gram"]).mean_sq_norm for s, b in sent.items()}
    refused = screen_gram_scales(summaries)
    assert list(refused) == ["west"] and refused["west"].endswith("743× the reference")  # 1000 / 1.345
    honest = {s: v for s, v in summaries.items() if s != "west"}
    assert screen_gram_scales(honest) == {} and K_GRAM > 1.69


def files_of(g: torch.Tensor, tokens: int) -> dict[str, bytes]:
    return statistics_files({"gram::model.layers.0.self_attn.q_proj.weight": g}, tokens=tokens)


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
