"""CPU timings of the C++ ops against the PyTorch references at Qwen3-VL-4B shapes (H 32, KV 8, D 128,
d_model 2560). Usage: ``python benchmarks/ops_cpu.py [--T 1024 4096] [--repeat 5] [--threads N]``. Prints the median
wall time of each op per backend and the speed-up."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from maskvl.ops import get_backend, head_grams


def _median_time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--variants", type=int, default=256, help="B of decode_attention")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ref, cpp = get_backend("reference", "cpu"), get_backend("cpp", "cpu")
    H, KV, D, DM = 32, 8, 128, 2560
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'op':<34}{'reference ms':>14}{'cpp ms':>10}{'speed-up':>10}")
    g = torch.Generator().manual_seed(0)
    for T in args.T:
        for dt in (torch.float32, torch.bfloat16):
            q = torch.randn(H, D, generator=g).to(dt)
            k = torch.randn(T, KV, D, generator=g).to(dt)
            v = torch.randn(T, KV, D, generator=g).to(dt)
            cases = {f"loo_attention T{T} {str(dt)[6:]}": lambda b: b.loo_attention(q, k, v, D ** -0.5)}
            if dt == torch.float32:
                o, delta = ref.loo_attention(q, k, v, D ** -0.5)
                gram = head_grams(torch.randn(DM, H * D, generator=g) / DM ** 0.5, H, torch.float32)
                clean, dvec = torch.randn(DM, generator=g), torch.randn(T, DM, generator=g)
                B = args.variants
                qd = torch.randn(B, H, D, generator=g)
                ko, vo = torch.randn(B, KV, D, generator=g), torch.randn(B, KV, D, generator=g)
                ex = torch.randint(-1, T + 1, (B,), generator=g)
                cases.update({
                    f"head_distances T{T} float32": lambda b: b.head_distances(o, delta, gram),
                    f"vector_distances T{T} N{DM} float32": lambda b: b.vector_distances(clean, dvec),
                    f"decode_attention T{T} B{B} float32": lambda b: b.decode_attention(qd, k, v, ko, vo, D ** -0.5, ex),
                })
            for name, fn in cases.items():
                tr = _median_time(lambda: fn(ref), args.repeat)
                tc = _median_time(lambda: fn(cpp), args.repeat)
                print(f"{name:<34}{tr * 1e3:>14.2f}{tc * 1e3:>10.2f}{tr / tc:>9.1f}x", flush=True)


if __name__ == "__main__":
    main()
