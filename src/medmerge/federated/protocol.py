"""The federation's protocol, typed in one place: one strict model per request and reply kind, the
blobs each may carry (each wire name mapped to a fixed file name, with a size cap), and the site step
that answers each request, registered once (`@site_step`, one function per message kind, as Flower's
message API has one function per message type).

    request (coordinator → site)            reply (site → coordinator)
    hello       {run}                       hello       {site, role}
    train       {run, statistics}           train       {site, base, pairs, data_checksum, train,
                                                         dp_epsilon} + adapter [+ statistics]
    adapters    {run, order, statistics}    adapters    {site, stored}
                + <peer>/<adapter file> per peer
    statistics  {run, peer} + statistics    statistics  {site, stored}
    score       {run, recipe}               score       {site, nll_sum, tokens}
    fedavg      {run, round, local_steps}   fedavg      {site, round, pairs} [+ adapter]
                [+ aggregate]
    evaluate    {run, models, validation,   evaluate    {site, validation, sets, cells, merges}
                 domains}
    secure_prepare {run, mode}              secure_prepare {site, aliases}
    secagg_setup {run, purpose, setup,      secagg_setup {site, keys}
                  weights, sigma, clip, noised_sites}
    secagg_share_keys {run, round_id,       secagg_share_keys {site, tokens}
                       public_keys}
    secagg_masked_vector {run, round_id,    secagg_masked_vector {site, undecryptable}
                          tokens}                               + masked_vector.bin
    secagg_unmask {run, round_id,           secagg_unmask {site, b_shares, sk_shares}
                   survivors, dropped}
    secure_merge {run, recipe}              secure_merge {site, stored}
                 + merged.safetensors
    (any)                                   error       {site, error: exception type, code}

Every model forbids unknown keys and non-finite numbers, bounds its lengths, and checks each name that
will touch a path (`Name`: letters, digits, _ and -). JSON is parsed refusing NaN and Infinity
(medmerge.federated.wire). A request carries the study's run id; a reply carries the replier's claim of
who it is (`site`), which must equal the identity the transport authenticated (or the reply is
refused): replies are filed under the authenticated identity only.

Error replies carry the exception's type name and one fixed code (ERROR_CODES), never its text: the
site's own log (stderr of its worker) keeps the full reason.

Adding a message kind: declare its request and reply models here (KIND, fields, BLOBS) and one
function `@site_step(TheRequest, TheReply) def the_step(site: Site, request) -> TheReply`, with its
heavy imports inside the function; `Site` (site.py) holds the site's state (folder, resident model,
query budget). The coordinator sends it with `exchange.ask(TheRequest(...), step)` and gets
{site: TheReply} back, every bad reply dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    ValidationError,
    model_validator,
)

from medmerge.config import TrainSettings
from medmerge.federated.wire import (
    MAX_NAME,
    NAME_PATTERN,
    OverBudget,
    Payload,
    ProtocolError,
    Refused,
    log_failure,
    shown,
)
from medmerge.merge.recipe import Recipe

if TYPE_CHECKING:
    from medmerge.federated.site import Site

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN, min_length=1, max_length=MAX_NAME)]
RunId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Count = Annotated[int, Field(ge=0, le=1 << 50)]
NonNegative = Annotated[float, Field(ge=0)]
Values = Annotated[list[float], Field(max_length=1 << 20)]
ERROR_CODES = ("bad_request", "refused", "over_budget", "failed")


@dataclass(frozen=True)
class Blob:
    """A blob a message may carry: the fixed file name it is written under, and its size cap."""

    file: str
    max_bytes: int
    required: bool = True


ADAPTER_CONFIG = Blob("adapter_config.json", 64 * KiB)
ADAPTER_WEIGHTS = Blob("adapter_model.safetensors", 1 * GiB)
ADAPTER = {b.file: b for b in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}
STATISTICS = {
    "statistics.safetensors": Blob("statistics.safetensors", 2 * GiB - 64 * MiB),
    "statistics.json": Blob("statistics.json", 1 * MiB),
}
AGGREGATE = Blob("aggregate.safetensors", 2 * GiB - 64 * MiB)


class Message(BaseModel):
    """A message's JSON part; its blobs ride along (`blobs`), checked against `blob_specs()`."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)
    KIND: ClassVar[str]
    BLOBS: ClassVar[dict[str, Blob]] = {}
    _blobs: dict[str, bytes] = PrivateAttr(default_factory=dict)

    @property
    def blobs(self) -> dict[str, bytes]:
        return self._blobs

    def with_blobs(self, blobs: dict[str, bytes]) -> Any:
        """This message with `blobs` (wire name → bytes) attached; returns self."""
        self._blobs = dict(blobs)
        return self

    def blob_specs(self) -> dict[str, Blob]:
        """{wire name: Blob} this message may carry."""
        return self.BLOBS

    def payload(self) -> Payload:
        return Payload(self.KIND, self.model_dump(mode="json"), self.blobs)


class Request(Message):
    run: RunId


class Reply(Message):
    site: Name  # the replier's claim; refused unless it is the authenticated sender


# ---------------------------------------------------------------------------------------- messages
class HelloRequest(Request):
    KIND = "hello"


class HelloReply(Reply):
    KIND = "hello"
    role: Literal["expert", "evaluate"]


class TrainRequest(Request):
    KIND = "train"
    statistics: list[Literal["gram", "fisher"]] = Field(default_factory=list, max_length=2)


class BaseIdentity(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    name: str = Field(max_length=4096)  # the study's base id, as its YAML names it
    checksum: Sha256


class TrainReply(Reply):
    KIND = "train"
    BLOBS = ADAPTER | {k: Blob(b.file, b.max_bytes, required=False) for k, b in STATISTICS.items()}
    base: BaseIdentity
    pairs: Count
    data_checksum: Sha256
    train: TrainSettings
    dp_epsilon: NonNegative | None = None


class AdaptersRequest(Request):
    """Every expert's adapter, `<peer>/<file>`, and the order of the experts (recipes' `experts` name
    them); `statistics`: the peers whose statistics follow (a site stores its own as it shared them)."""

    KIND = "adapters"
    order: list[Name] = Field(min_length=1, max_length=256)
    statistics: list[Name] = Field(default_factory=list, max_length=256)

    @model_validator(mode="after")
    def _peers(self) -> AdaptersRequest:
        if len(set(self.order)) != len(self.order) or not set(self.statistics) <= set(self.order):
            raise ValueError("order must be distinct names, statistics a part of them")
        return self

    def blob_specs(self) -> dict[str, Blob]:
        return {f"{peer}/{name}": blob for peer in self.order for name, blob in ADAPTER.items()}


class AdaptersReply(Reply):
    KIND = "adapters"
    stored: list[Name] = Field(max_length=256)


class StatisticsRequest(Request):
    KIND = "statistics"
    BLOBS = STATISTICS
    peer: Name


class StatisticsReply(Reply):
    KIND = "statistics"
    stored: Name


class WireRecipe(Recipe):
    """A recipe as it crosses the wire: its method and experts are names."""

    method: Name
    experts: list[Name] = Field(min_length=1, max_length=256)


class ScoreRequest(Request):
    KIND = "score"
    recipe: WireRecipe


class ScoreReply(Reply):
    """Σ nll (nats) and answer tokens on the site's validation split; nll_sum None: not finite there."""

    KIND = "score"
    nll_sum: NonNegative | None = None
    tokens: Count


class FedAvgRequest(Request):
    KIND = "fedavg"
    BLOBS = {"aggregate.safetensors": Blob(AGGREGATE.file, AGGREGATE.max_bytes, required=False)}
    round: Annotated[int, Field(ge=0, le=10_000)]
    local_steps: Annotated[int, Field(ge=0, le=1_000_000)]


class FedAvgReply(Reply):
    KIND = "fedavg"
    BLOBS = {k: Blob(b.file, b.max_bytes, required=False) for k, b in ADAPTER.items()}
    round: Annotated[int, Field(ge=0, le=10_000)]
    pairs: Count | None = None


class EvaluateRequest(Request):
    """models: {name: "base" | "fedavg" | a stored peer | a recipe over stored peers}."""

    KIND = "evaluate"
    models: dict[Name, Name | WireRecipe] = Field(min_length=1, max_length=256)
    validation: bool = True
    domains: list[Literal["in-domain", "out-of-domain"]] = Field(
        default_factory=lambda: ["in-domain", "out-of-domain"], max_length=2
    )


class Loss(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)
    nll_sum: NonNegative
    tokens: Count


class Interval(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)
    mean: float
    low: float
    high: float
    n: Count
    confidence: Annotated[float, Field(gt=0, lt=1)]


class Cell(BaseModel):
    """One model on one set: per metric Σ w·v and Σ w, the site's intervals, corpus scores; per-question
    losses and their token weights only where the site's config allows (never other metrics)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)
    metrics: dict[Name, Interval] = Field(max_length=64)
    sums: dict[Name, Annotated[list[float], Field(min_length=2, max_length=2)]] = Field(max_length=64)
    corpus: dict[Name, float] = Field(max_length=64)
    per_item: dict[Literal["loss"], Values] | None = Field(None, exclude_if=lambda v: v is None)
    weights: dict[Literal["loss"], Values] | None = Field(None, exclude_if=lambda v: v is None)


class SetInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    name: Name
    domain: Literal["in-domain", "out-of-domain"]
    n: Count


class LedgerRelease(BaseModel):
    """One DP release in a site's ledger summary: its accountant history [(σ > 0, 0 < q ≤ 1, steps)]."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)
    what: str = Field(max_length=200)
    kind: Literal["expert", "fedavg", "statistics", "other"]
    mechanism: str = Field(max_length=200)
    epsilon: NonNegative
    history: list[Annotated[list[float], Field(min_length=3, max_length=3)]] = Field(
        min_length=1, max_length=64
    )

    @model_validator(mode="after")
    def _history(self) -> LedgerRelease:
        if any(not (s > 0 and 0 < q <= 1 and n >= 1 and n == int(n)) for s, q, n in self.history):
            raise ValueError("history entries must be [σ > 0, 0 < q ≤ 1, steps ≥ 1]")
        return self


class LedgerSummary(BaseModel):
    """A site's privacy ledger as it reports it (federated.site_privacy): composed ε at δ, its releases."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)
    epsilon: NonNegative
    delta: Annotated[float, Field(gt=0, lt=1)]
    accountant: Literal["prv", "rdp"]
    unit: Literal["pair", "group"]
    unit_words: str = Field(max_length=200)
    budget: NonNegative | None = None
    releases: list[LedgerRelease] = Field(min_length=1, max_length=10_000)


class EvaluateReply(Reply):
    KIND = "evaluate"
    validation: dict[Name, Loss] = Field(max_length=256)
    sets: list[SetInfo] = Field(max_length=256)
    cells: dict[Name, dict[Name, Cell]] = Field(max_length=256)
    merges: dict[Name, Sha256] = Field(max_length=256)
    privacy: LedgerSummary | None = Field(None, exclude_if=lambda v: v is None)  # dp: the site's ledger


# ------------------------------------------------------------------- secure sums (SecAgg+ stages)
# The stage records of medmerge.federated.secagg_records as they cross the wire: lists for tuples and
# URL-safe base64 text for bytes (the records' own JSON form, so `Record.model_validate_json` of a
# message's fields rebuilds the record and applies every rule of the protocol: ≥ 3 participants, t,
# N·L < 2^bits, …). The masked vector rides as a blob. Steps: medmerge.federated.secure_site.
TensorName = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$", min_length=1, max_length=256)
]


def _b64(max_bytes: int) -> Any:
    return Annotated[
        str, StringConstraints(pattern=r"^[A-Za-z0-9_=-]+$", max_length=4 * (max_bytes // 3 + 1))
    ]


KeyText, TokenText, ShareText = _b64(1024), _b64(4096), _b64(1024)
Participants = Annotated[list[Name], Field(min_length=1, max_length=64)]
MASKED_VECTOR = Blob("masked_vector.bin", 2 * GiB - 64 * MiB)
SECURE_MERGE = Blob("merged.safetensors", 2 * GiB - 64 * MiB)


class WireTensor(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)
    name: TensorName
    shape: list[Annotated[int, Field(ge=1, le=250_000_000)]] = Field(min_length=1, max_length=4)
    clip: Annotated[float, Field(gt=0, le=1e12)]


class WireSetup(BaseModel):
    """secagg_records.SetupRequest's fields."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)
    round_id: Name
    participants: Participants
    threshold: Annotated[int, Field(ge=2, le=64)]
    neighbours: Annotated[int, Field(ge=2, le=63)]
    levels: Annotated[int, Field(ge=2, le=2**44)]
    modulus_bits: Annotated[int, Field(ge=8, le=64)]
    layout: list[WireTensor] = Field(min_length=1, max_length=4096)
    weights: dict[Name, Annotated[float, Field(gt=0, le=1e6)]] | None = None
    mode: Literal["secure", "secure+dp"] = "secure"
    noise_multiplier: Annotated[float, Field(gt=0, le=1e6)] | None = None


class WireKeys(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    mask: KeyText
    enc: KeyText


class SecurePrepareRequest(Request):
    """Compute (once per expert and settings) the statistics a secure sum reads, kept at the site."""

    KIND = "secure_prepare"
    mode: Literal["secure", "secure+dp"]


class SecurePrepareReply(Reply):
    """The model's structure, the same at every site: which weights read the same input (weight name →
    the name its Gram is stored under), and the clip the site's statistics were computed with."""

    KIND = "secure_prepare"
    aliases: dict[TensorName, TensorName] = Field(max_length=4096)


class SecAggSetupRequest(Request):
    """A secure round's setup. purpose `range`: each site adds, per tensor t and exponent bin j, 1 when
    max |w·x_t| ≤ 2^(j + RANGE_LOW) (the coordinator takes the smallest bin all survivors are under as
    the sum's clip); `sum`: the statistics. weights: the recipe's w by site (applied by the secure sum
    in `secure`, by the site before its noise in `secure+dp`). sigma, clip, noised_sites: secure+dp."""

    KIND = "secagg_setup"
    purpose: Literal["range", "sum"]
    setup: WireSetup
    weights: dict[Name, Annotated[float, Field(gt=0, le=1e6)]] = Field(min_length=1, max_length=64)
    sigma: Annotated[float, Field(gt=0, le=1e6)] | None = None
    clip: Annotated[float, Field(gt=0)] | None = None
    noised_sites: Annotated[int, Field(ge=1, le=64)] | None = None


class SecAggSetupReply(Reply):
    KIND = "secagg_setup"
    keys: WireKeys


class SecAggShareKeysRequest(Request):
    KIND = "secagg_share_keys"
    round_id: Name
    public_keys: dict[Name, WireKeys] = Field(min_length=2, max_length=64)


class SecAggShareKeysReply(Reply):
    KIND = "secagg_share_keys"
    tokens: dict[Name, TokenText] = Field(min_length=1, max_length=64)


class SecAggMaskedVectorRequest(Request):
    KIND = "secagg_masked_vector"
    round_id: Name
    tokens: dict[Name, TokenText] = Field(min_length=1, max_length=64)


class SecAggMaskedVectorReply(Reply):
    """y_u as the blob masked_vector.bin (little-endian uint32 or uint64, layout order)."""

    KIND = "secagg_masked_vector"
    BLOBS = {MASKED_VECTOR.file: MASKED_VECTOR}
    undecryptable: list[Name] = Field(default_factory=list, max_length=64)


class SecAggUnmaskRequest(Request):
    KIND = "secagg_unmask"
    round_id: Name
    survivors: Participants
    dropped: list[Name] = Field(default_factory=list, max_length=64)


class SecAggUnmaskReply(Reply):
    KIND = "secagg_unmask"
    b_shares: dict[Name, ShareText] = Field(default_factory=dict, max_length=64)
    sk_shares: dict[Name, ShareText] = Field(default_factory=dict, max_length=64)


class SecureMergeRequest(Request):
    """A merge the coordinator built from secure sums (the tensors it changes, float32), for the recipe
    that names it in later score and evaluate requests of this run."""

    KIND = "secure_merge"
    BLOBS = {SECURE_MERGE.file: SECURE_MERGE}
    recipe: WireRecipe


class SecureMergeReply(Reply):
    KIND = "secure_merge"
    stored: Sha256


class ErrorReply(Reply):
    KIND = "error"
    error: Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=MAX_NAME)]
    code: Literal["bad_request", "refused", "over_budget", "failed"]


# -------------------------------------------------------------------------------- checks, registry
def decode(payload: Payload, model: type[Message], sender: str | None = None) -> Message:
    """`payload` as a `model` message (an ErrorReply where a reply was expected and the site failed),
    its blobs checked; ProtocolError (one line naming the field) for anything else. With `sender` (the
    authenticated identity of a reply's sender), a reply claiming to be another site is refused."""
    if payload.kind == "invalid":
        raise ProtocolError("message", str(payload.meta.get("reason", "does not parse")))
    if issubclass(model, Reply) and payload.kind == ErrorReply.KIND:
        model = ErrorReply
    elif payload.kind != model.KIND:
        raise ProtocolError("kind", f"{shown(payload.kind)}, expected {model.KIND!r}")
    try:
        message = model.model_validate(payload.meta)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(shown(p, 24).strip("'") for p in error["loc"]) or "(top level)"
        raise ProtocolError(where, error["msg"]) from None
    claim = getattr(message, "site", None)
    if sender is not None and claim != sender:
        raise ProtocolError("site", f"claims to be {shown(claim)}, but the sender is {sender}")
    specs = message.blob_specs()
    for name, data in payload.blobs.items():
        spec = specs.get(name)
        if spec is None:
            raise ProtocolError(f"blob {shown(name)}", f"not a blob of a {payload.kind} message")
        if len(data) > spec.max_bytes:
            raise ProtocolError(f"blob {name}", f"{len(data)} bytes, over its {spec.max_bytes}-byte cap")
    missing = [name for name, spec in specs.items() if spec.required and name not in payload.blobs]
    if missing:
        raise ProtocolError(f"blob {shown(missing[0])}", "missing")
    return message.with_blobs(payload.blobs)


StepFn = Callable[["Site", Any], Reply]


@dataclass(frozen=True)
class Step:
    request: type[Request]
    reply: type[Reply]
    fn: StepFn


STEPS: dict[str, Step] = {}


def site_step(request: type[Request], reply: type[Reply]) -> Callable[[StepFn], StepFn]:
    """Register `fn(site, request) -> reply` as the site's answer to `request.KIND` (once per kind)."""

    def register(fn: StepFn) -> StepFn:
        if request.KIND in STEPS or request.KIND != reply.KIND:
            raise ValueError(f"site step {request.KIND!r}: registered twice, or its reply is another kind")
        STEPS[request.KIND] = Step(request, reply, fn)
        return fn

    return register


def reply_type(kind: str) -> type[Reply]:
    """The reply model of requests of `kind`."""
    return STEPS[kind].reply


def answer(site: Site, request: Payload) -> Payload:
    """The site's reply to one request: its step's reply, or an error reply (exception type name and
    code only); the full reason goes to the site's own log (stderr, wire.log_failure)."""
    try:
        step = STEPS.get(request.kind)
        if step is None:
            raise ProtocolError("kind", f"{shown(request.kind)} is no request kind")
        message = decode(request, step.request)
        site.use_threads()
        reply = step.fn(site, message)
        if not isinstance(reply, step.reply):
            raise TypeError(f"site step {request.kind} returned {type(reply).__name__}")
        return reply.payload()
    except Exception as exc:  # noqa: BLE001 (every failure becomes a fixed code on the wire)
        code = _code(exc)
        log_failure(site.name, request.kind, code, exc)
        return ErrorReply(site=site.name, error=type(exc).__name__[:MAX_NAME], code=code).payload()


def _code(exc: BaseException) -> str:
    if isinstance(exc, ProtocolError):
        return "bad_request"
    if isinstance(exc, OverBudget):
        return "over_budget"
    return "refused" if isinstance(exc, Refused) else "failed"


# ---------------------------------------------------------------------------------------- the steps
@site_step(HelloRequest, HelloReply)
def hello(site: Site, request: HelloRequest) -> HelloReply:
    return HelloReply(site=site.name, role=site.role)


@site_step(TrainRequest, TrainReply)
def train(site: Site, request: TrainRequest) -> TrainReply:
    """Train (or reuse) the site's LoRA expert; its adapter (base id rewritten, local paths dropped),
    manifest and, when asked and its own config shares them, its statistics."""
    meta, blobs = site.train(list(request.statistics))
    return TrainReply(site=site.name, **meta).with_blobs(blobs)


@site_step(AdaptersRequest, AdaptersReply)
def adapters(site: Site, request: AdaptersRequest) -> AdaptersReply:
    """Store every peer's adapter under peers/<peer>/ (fixed file names); refused when it would
    replace, in the same run, an adapter stored before with a different one."""
    files = {peer: {f: request.blobs[f"{peer}/{f}"] for f in ADAPTER} for peer in request.order}
    site.store_adapters(request.run, files, list(request.statistics))
    return AdaptersReply(site=site.name, stored=list(request.order))


@site_step(StatisticsRequest, StatisticsReply)
def statistics(site: Site, request: StatisticsRequest) -> StatisticsReply:
    """Store one peer's shared statistics beside its stored adapter."""
    site.store_statistics(request.run, request.peer, dict(request.blobs))
    return StatisticsReply(site=site.name, stored=request.peer)


@site_step(ScoreRequest, ScoreReply)
def score(site: Site, request: ScoreRequest) -> ScoreReply:
    """Merge the recipe's experts (stored peers only) into the resident base; its validation Σ nll and
    tokens. One unit of the site's `score` budget."""
    site.spend("score", 1)
    nll, tokens = site.score(request.run, request.recipe)
    return ScoreReply(site=site.name, nll_sum=nll, tokens=tokens)


@site_step(FedAvgRequest, FedAvgReply)
def fedavg(site: Site, request: FedAvgRequest) -> FedAvgReply:
    """Add the round's aggregate to this run's global model, then (expert sites, local_steps > 0) train
    a fresh LoRA on it; reply that adapter and the training pairs."""
    aggregate = request.blobs.get(AGGREGATE.file)
    pairs, blobs = site.fedavg(request.run, request.round, request.local_steps, aggregate)
    return FedAvgReply(site=site.name, round=request.round, pairs=pairs).with_blobs(blobs)


@site_step(EvaluateRequest, EvaluateReply)
def evaluate(site: Site, request: EvaluateRequest) -> EvaluateReply:
    """Every model on the site's validation split and on each of its sets in `domains`. One unit of the
    site's `evaluate` budget per model."""
    site.spend("evaluate", len(request.models))
    result = site.evaluate(request.run, dict(request.models), request.validation, list(request.domains))
    return EvaluateReply(site=site.name, **result)
