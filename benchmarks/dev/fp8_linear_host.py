"""Host time per call of FP8Linear at one row against bf16 nn.Linear, alternated rounds (GPU).

    python -m benchmarks.dev.fp8_linear_host

500 back-to-back calls per round, fewer than the launch queue holds, so the figure is the host's cost even where
the GPU's work per call (a 4096 x 14336 bf16 weight: about 28 us) exceeds it. Published in
docs/benchmarks/host-overhead-h200.md.
"""

from __future__ import annotations

import fp8_gemm
import torch

from benchmarks.host_overhead import host_us

ROUNDS = 21
CALLS = 500
SHAPES = ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096))


def measure(in_features: int, out_features: int) -> dict[str, list[float]]:
    """Per-round host us per call of each module, rounds alternated."""
    linear = torch.nn.Linear(in_features, out_features, bias=False, device="cuda", dtype=torch.bfloat16)
    fp8 = fp8_gemm.FP8Linear.from_linear(linear)
    x = torch.randn(1, in_features, device="cuda", dtype=torch.bfloat16)
    rows: dict[str, list[float]] = {"nn.Linear": [], "FP8Linear": []}
    with torch.inference_mode():
        for _ in range(ROUNDS):
            rows["nn.Linear"].append(host_us(lambda: linear(x), n=CALLS))
            rows["FP8Linear"].append(host_us(lambda: fp8(x), n=CALLS))
    return rows


def main() -> None:
    mid = ROUNDS // 2
    print(f"{torch.cuda.get_device_name()}: median (min, max) of {ROUNDS} alternated rounds of {CALLS} calls, M = 1")
    for in_features, out_features in SHAPES:
        rows = measure(in_features, out_features)
        print(f"== {in_features} -> {out_features}")
        for name, values in rows.items():
            v = sorted(values)
            print(f"   {name:10s} {v[mid]:6.2f} ({v[0]:6.2f}, {v[-1]:6.2f}) us", flush=True)
        diffs = sorted(a - b for a, b in zip(rows["FP8Linear"], rows["nn.Linear"], strict=True))
        print(f"   paired FP8Linear - nn.Linear: median {diffs[mid]:+.2f} us, range {diffs[0]:+.2f}..{diffs[-1]:+.2f}")


if __name__ == "__main__":
    main()
