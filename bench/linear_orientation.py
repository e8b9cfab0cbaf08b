"""F.linear(x, W) against (W @ x^T)^T on the CPU, by number of rows: why `lmlab.model.linear` exists.

The weights are the 24 block matrices of the GPT-2-shaped model bench/generate.py decodes with
(6 layers x q/k/v, out, up, down at width 512); forward only, float32, median of the rounds, the
two orientations alternating.

    python bench/linear_orientation.py
    python bench/linear_orientation.py --rows 1 8 64 --rounds 10

The last columns time the same products with the weights in float16 through fbgemm
(`quantized::linear_dynamic_fp16`, lmlab.quantize.Fp16Linear: float32 activations and accumulation),
and the rate at which each way reads the float32 weights (GB/s): decoding reads every weight once per
token, so at one row that rate is the decoding speed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64, 512, 2048])
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=8)
    a = ap.parse_args()
    torch.manual_seed(0)
    d = a.d_model
    shapes = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)] * a.layers
    weights = [(torch.randn(s), torch.randn(s[0])) for s in shapes]
    packed = [torch.ops.quantized.linear_prepack_fp16(w, b) for w, b in weights]
    megabytes = sum(s[0] * s[1] for s in shapes) * 4 / 1e6
    print(
        f"{len(shapes)} matrices, {sum(s[0] * s[1] for s in shapes) * 4 / 1e6:.0f} MB, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        "| rows | F.linear (ms) | (W @ x^T)^T (ms) | ratio | fp16 weights (ms) | F.linear / fp16 | "
        "float32 weights read by F.linear (GB/s) |\n|---|---|---|---|---|---|---|"
    )
    with torch.inference_mode():
        for rows in a.rows:
            xs = {k: torch.randn(rows, k) for k in {s[1] for s in shapes}}
            ways = {
                "linear": lambda: [F.linear(xs[w.shape[1]], w, b) for w, b in weights],
                "transposed": lambda: [torch.addmm(b[:, None], w, xs[w.shape[1]].t()).t() for w, b in weights],
                "fp16": lambda: [
                    torch.ops.quantized.linear_dynamic_fp16(xs[w.shape[1]], p) for (w, _), p in zip(weights, packed)
                ],
            }
            for way in ways.values():
                way()
            times: dict[str, list[float]] = {k: [] for k in ways}
            for _ in range(a.rounds):
                for k, way in ways.items():
                    t = time.perf_counter()
                    way()
                    times[k].append(time.perf_counter() - t)
            lin, tr, h = (statistics.median(times[k]) * 1e3 for k in ways)
            print(
                f"| {rows} | {lin:.2f} | {tr:.2f} | {lin / tr:.2f} | {h:.2f} | {lin / h:.2f} | {megabytes / lin:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
