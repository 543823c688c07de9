"""What a secure sum (SecAgg+) costs: bytes and seconds per site and at the coordinator.

Vectors of 1M floats (one 1000×1000 tensor) and of SmolLM2-135M's Gram sums (100.6M floats: per layer
the q/k/v, o_proj and gate/up inputs 576² each and the down_proj input 1536², 30 layers, 120 tensors),
with 3 and 5 sites, modulus 2^32 (uint32 on the wire) and 2^64 (uint64). Every site and the coordinator
run in this one process over the in-process transport without JSON (records passed as they are; bytes
counted as a blob transport sends them: the masked vector raw, the rest as JSON). Masked vectors are
added to the total as each arrives (a streaming exchange), as a transport should.

Per site: seconds in its own stage handlers (key generation, Shamir shares, Fernet, quantization and
masking), bytes sent and received, and the peak memory its masking stage allocates on top of its input
(tracemalloc: numpy buffers and the reply's bytes). Coordinator: the rest of the wall time (relaying,
adding the masked vectors, rebuilding secrets, removing masks, dequantizing) and its peak allocation.
Also: Flower's `pseudo_rand_gen` (Mersenne Twister, 32-bit seed) against the AES-256-CTR stream used here.

    flock /tmp/medmerge-heavy.lock .venv/bin/python bench/secagg_cost.py [--sizes small gram] [--sites 3 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from medmerge.federated.secagg import (
    Contribution,
    LocalExchange,
    SecAggCoordinator,
    SecAggSite,
    recommended_setup,
    run_secure_sum,
    spec_for,
)
from medmerge.federated.secagg_vector import CHUNK, MaskStream

CLIP = 8.0


def tensors(size: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if size == "small":
        shapes = {"block": (1000, 1000)}
    else:
        shapes = {}
        for layer in range(30):
            for name, d in (("qkv_in", 576), ("o_in", 576), ("mlp_in", 576), ("down_in", 1536)):
                shapes[f"layers.{layer}.{name}"] = (d, d)
    return {n: rng.standard_normal(s, dtype=np.float32) for n, s in shapes.items()}


class Timed:
    """A site whose stage handlers are timed, and whose masking stage's peak allocation is traced."""

    def __init__(self, site: SecAggSite) -> None:
        self.site, self.seconds, self.peak = site, 0.0, 0

    def handle(self, request):
        masking = self.site.stage == "masked_vector"
        if masking:
            before, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
        start = time.perf_counter()
        reply = self.site.handle(request)
        self.seconds += time.perf_counter() - start
        if masking:
            self.peak = max(self.peak, tracemalloc.get_traced_memory()[1] - before)
        return reply


def one(size: str, sites: int, bits: int, data: dict[str, np.ndarray], root: Path) -> dict:
    names = [f"site{i}" for i in range(sites)]
    layout = [spec_for(n, t, CLIP) for n, t in data.items()]
    setup = recommended_setup(f"bench-{size}-{sites}-{bits}", names, layout, modulus_bits=bits)
    timed = {n: Timed(SecAggSite(n, root / n, lambda s: Contribution(data))) for n in names}
    exchange = LocalExchange(timed, serialize=False, stream=True)
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    start = time.perf_counter()
    result = run_secure_sum(SecAggCoordinator(setup), exchange)
    wall = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] - base
    err = max(float(np.abs(result.tensors[k] - sites * v.astype(np.float64)).max()) for k, v in data.items())
    tol = max(result.tolerance.values())
    assert err <= tol, (err, tol)
    del result
    site_s = [t.seconds for t in timed.values()]
    return {
        "size": size,
        "floats": setup.elements,
        "sites": sites,
        "modulus_bits": bits,
        "levels": setup.levels,
        "threshold": setup.threshold,
        "site_seconds_max": round(max(site_s), 2),
        "site_sent_MB": round(max(exchange.received.values()) / 1e6, 2),
        "site_received_MB": round(max(exchange.sent.values()) / 1e6, 3),
        "site_masking_peak_MB": round(max(t.peak for t in timed.values()) / 1e6, 1),
        "coordinator_seconds": round(wall - sum(site_s), 2),
        "coordinator_received_MB": round(sum(exchange.received.values()) / 1e6, 1),
        "round_peak_MB": round(peak / 1e6, 1),
        "wall_seconds": round(wall, 2),
        "max_abs_error": err,
        "tolerance": tol,
    }


def prg_speed(n: int = 1 << 22) -> dict:
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    start = time.perf_counter()
    pseudo_rand_gen(bytes(range(32)), 2**32, [(n,)])
    flower = time.perf_counter() - start
    stream, start = MaskStream(bytes(range(32))), time.perf_counter()
    for _ in range(n // CHUNK):
        stream.take(CHUNK)
    aes = time.perf_counter() - start
    per_100m = 1e8 / n
    return {
        "flower_mt_s_per_100M": round(flower * per_100m, 2),
        "aes_ctr_s_per_100M": round(aes * per_100m, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["small", "gram"], choices=["small", "gram"])
    parser.add_argument("--sites", nargs="+", type=int, default=[3, 5])
    parser.add_argument("--bits", nargs="+", type=int, default=[32, 64])
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    tracemalloc.start()
    rows = [prg_speed()]
    print(json.dumps(rows[0]), flush=True)
    for size in args.sizes:
        data = tensors(size)
        for sites in args.sites:
            for bits in args.bits:
                with tempfile.TemporaryDirectory() as root:
                    rows.append(one(size, sites, bits, data, Path(root)))
                print(json.dumps(rows[-1]), flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    print(json.dumps({"process_max_rss_MB": round(rss, 1)}))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
