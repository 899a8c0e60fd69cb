"""The compute floor of an exact attribution with the linear engine.

For one ``fastattr.attribute`` call, the floating-point work and the memory traffic that no exact
implementation of the linear engine's algorithm can skip, and the time they take at a device's
rates. ``fraction = floor_s / measured_s`` says how close a run came (1.0: at the floor).

What is counted (from the run's own record, ``fastattr.attribution.driver._LAST_RUN["work"]``,
so the truncated prefixes and the compaction by layer are those the run used):

- sweep matmuls, per layer step of ``n`` rows over ``P`` positions: the attention transpose's two
  projections (2 P n D H d_head and 2 P n H_kv d_head D), the pattern product (2 H d_head n times
  P (P + 1) / 2 on a causal pattern, P^2 otherwise), the skip path (2 P n D^2) where there is one,
  and the contraction's dot products (2 n D per vector at positions < P, token embeddings included);
- the setup: one batch-1 forward of the model (attention and MLP projections, attention scores,
  unembedding) and the transcoders' encoders over the prompt (2 P D F per layer; a cross-layer
  transcoder's decoders write each active feature to every later layer, counted as 2 D per pair);
- memory traffic: every edge row written once (rows x nodes float32), each partial-influence update
  reading the rows attributed so far once over the full width, and the square adjacency written once.

What is not counted, so the floor is a lower bound: elementwise work (norms, adds, seeds), the
partial influences' power series over the rows' own node columns (rows^2 per term), sorting and
selection, Python, and the graph's pruning.

Time: matmul work at the device's matmul rate plus traffic at its bandwidth, summed (the phases
run one after another). On the CPU the rates are the benchmark session's measured roofline
(``benchutil.roofline``: an fp32 2048^3 matmul and a large copy); on a GPU the card's datasheet
peaks (``GPU_PEAKS``), so that a device check can report measured against predicted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Dense peaks from NVIDIA's datasheets (SXM): TFLOP/s by dtype (tensor cores; fp32 is the CUDA-core
# rate, tf32 the tensor-core rate) and HBM bandwidth in TB/s.
GPU_PEAKS = {
    "H100": dict(float32=67.0, tf32=494.7, bfloat16=989.4, float16=989.4, bandwidth=3.35),
    "H200": dict(float32=67.0, tf32=494.7, bfloat16=989.4, float16=989.4, bandwidth=4.8),
}


@dataclass
class Floor:
    flops: float  # matmul work, floating-point operations
    bytes: float  # memory traffic a pass over the edge rows cannot avoid
    seconds: float
    parts: dict[str, float]  # flops or bytes per component

    def fraction(self, measured_s: float) -> float:
        return self.seconds / measured_s if measured_s > 0 else float("nan")


@dataclass
class Shape:
    """What the record of a run does not carry: the model's MLP and transcoder widths."""

    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    n_kv_heads: int
    d_vocab: int
    d_transcoder: int
    cross_layer: bool


def sweep_flops(work: dict[str, Any]) -> dict[str, float]:
    """The sweep's matmul work, from the engine's per-step record."""
    layers = work["layers"]
    causal = work["causal"]
    out = dict(attention_projections=0.0, attention_pattern=0.0, skip=0.0, contraction=0.0)
    # n_out: rows whose cotangent at the layer's output hook is not zero (seeded above it); n_in:
    # those and the rows seeded at the layer, which the attention transpose carries down.
    for layer, P, n_out, n_in, vecs in work["steps"]:
        if layer < 0:  # the token embeddings: the contraction only
            D = layers[0]["d_model"]
            out["contraction"] += 2.0 * n_out * D * vecs
            continue
        la = layers[layer]
        D, H, Hkv, dh = la["d_model"], la["n_heads"], la["n_kv_heads"], la["d_head"]
        out["contraction"] += 2.0 * n_out * D * vecs
        out["attention_projections"] += 2.0 * P * n_in * D * dh * (H + Hkv)
        pairs = P * (P + 1) / 2 if causal else P * P
        out["attention_pattern"] += 2.0 * H * dh * n_in * pairs
        if la["skip"]:
            out["skip"] += 2.0 * P * n_out * D * D
    return out


def setup_flops(shape: Shape, n_pos: int, n_active: int) -> dict[str, float]:
    """One batch-1 forward and the transcoders' encoding over ``n_pos`` positions."""
    D, L, P = shape.d_model, shape.n_layers, n_pos
    d_head = D // shape.n_heads
    proj = 2.0 * P * D * d_head * (2 * shape.n_heads + 2 * shape.n_kv_heads)  # q, o and k, v
    scores = 2.0 * 2 * shape.n_heads * d_head * P * (P + 1) / 2
    mlp = 2.0 * P * 3 * D * shape.d_mlp  # gated MLP: gate, up, down
    forward = L * (proj + scores + mlp) + 2.0 * P * D * shape.d_vocab
    encode = L * 2.0 * P * D * shape.d_transcoder
    # Decoding the active features: to their own layer, or (cross-layer) to every later one.
    per_feature = (L + 1) / 2 if shape.cross_layer else 1
    decode = 2.0 * D * n_active * per_feature
    return dict(forward=forward, encode=encode + decode)


def traffic_bytes(work: dict[str, Any]) -> dict[str, float]:
    cols = work["total_nodes"]
    return dict(
        edge_rows=4.0 * work["n_rows"] * cols,
        partial_influences=4.0 * cols * sum(work["influence_rows"]),
        adjacency=4.0 * work["n_final"] ** 2,
    )


def floor(work: dict[str, Any], shape: Shape, n_active: int, *, flops_per_s: float, bytes_per_s: float) -> Floor:
    """The floor of one run at the given rates (``bytes_per_s`` counts bytes moved once)."""
    if "steps" not in work:
        raise ValueError("work: expected the record of a linear-engine run (with 'steps'), got one without")
    flops = {**sweep_flops(work), **setup_flops(shape, work["n_pos"], n_active)}
    traffic = traffic_bytes(work)
    total_flops, total_bytes = sum(flops.values()), sum(traffic.values())
    seconds = total_flops / flops_per_s + total_bytes / bytes_per_s
    return Floor(total_flops, total_bytes, seconds, {**flops, **traffic})


def gpu_rates(card: str, dtype: str) -> tuple[float, float]:
    """(flop/s, bytes/s) of ``card`` for matmuls in ``dtype`` from :data:`GPU_PEAKS`. float32 is the
    CUDA-core rate: torch's float32 matmuls do not use TF32 unless asked to."""
    peaks = next((v for k, v in GPU_PEAKS.items() if k in card), None)
    if peaks is None:
        raise ValueError(f"card: expected a name containing one of {sorted(GPU_PEAKS)}, got {card!r}")
    rate = peaks[dtype]
    return rate * 1e12, peaks["bandwidth"] * 1e12


def rates_for(roofline: dict, device_name: str, dtype: str) -> tuple[float, float, str]:
    """(flop/s, bytes/s, source): a GPU's datasheet peaks when its name is in :data:`GPU_PEAKS`,
    else the session's measured roofline (fp32 matmul rate and copy bandwidth)."""
    if any(k in device_name for k in GPU_PEAKS):
        flops, bw = gpu_rates(device_name, dtype)
        return flops, bw, "datasheet"
    key = "matmul_tflops_bf16" if dtype in ("bfloat16", "float16") else "matmul_tflops_fp32"
    tflops = roofline.get(key) or roofline["matmul_tflops_fp32"]
    return tflops * 1e12, roofline["copy_gbps"] * 1e9, "measured"


def record(info: dict, work: dict[str, Any], shape: Shape, n_active: int, roofline: dict, device_name: str,
           dtype: str) -> Floor:  # fmt: skip
    """Put the floor of ``work`` and its fraction of this row's median into ``info`` (a
    benchmark's extra_info), for report.py."""
    flops_per_s, bytes_per_s, source = rates_for(roofline, device_name, dtype)
    f = floor(work, shape, n_active, flops_per_s=flops_per_s, bytes_per_s=bytes_per_s)
    info.update(floor_s=f.seconds, floor_flops=f.flops, floor_bytes=f.bytes, floor_rates=source,
                floor_parts={k: float(v) for k, v in f.parts.items()})  # fmt: skip
    if info.get("median_s"):
        info["fraction_of_floor"] = f.fraction(info["median_s"])
    return f
