"""Matmul throughput of the job's GPU in fp16, bf16 and fp32, checked against the CPU.

Environment: N (matrix size, default 8192), ITERS (timed iterations, default 20),
OUTPUT_DIR (default /outputs). Writes OUTPUT_DIR/result.json; exits non-zero when no
CUDA device is visible or a result disagrees with the CPU reference.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Relative error allowed against a float64 reference: the inputs' own rounding and the
# accumulation order; fp32 leaves room for TF32 if someone turns it on.
TOLERANCE = {"fp16": 1e-2, "bf16": 3e-2, "fp32": 5e-3}
CHECK_SIZE = 512


def check(dtype: torch.dtype, device: torch.device) -> float:
    """Relative error of the GPU's product against a float64 product on the CPU."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(CHECK_SIZE, CHECK_SIZE, generator=generator).to(dtype)
    b = torch.randn(CHECK_SIZE, CHECK_SIZE, generator=generator).to(dtype)
    expected = a.double() @ b.double()
    got = (a.to(device) @ b.to(device)).double().cpu()
    return ((got - expected).norm() / expected.norm()).item()


def tflops(dtype: torch.dtype, device: torch.device, n: int, iters: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    # Warm-up: the first calls pick cuBLAS kernels and allocate workspaces.
    for _ in range(3):
        torch.matmul(a, b, out=out)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        torch.matmul(a, b, out=out)
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return 2 * n**3 * iters / seconds / 1e12


def main() -> int:
    if not torch.cuda.is_available():
        print(
            "error: no CUDA device is visible "
            f"(NVIDIA_VISIBLE_DEVICES={os.environ.get('NVIDIA_VISIBLE_DEVICES')!r})",
            file=sys.stderr,
        )
        return 2
    n = int(os.environ.get("N", "8192"))
    iters = int(os.environ.get("ITERS", "20"))
    output_dir = Path(os.environ.get("OUTPUT_DIR", "/outputs"))
    device = torch.device("cuda", 0)
    name = torch.cuda.get_device_name(device)
    print(f"{name}: torch {torch.__version__}, CUDA {torch.version.cuda}, N={n}, ITERS={iters}")

    results: dict[str, dict[str, float | bool | str]] = {}
    for label, dtype in DTYPES.items():
        if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
            print(f"{label}: skipped (not supported by this GPU)")
            results[label] = {"skipped": "not supported by this GPU"}
            continue
        error = check(dtype, device)
        ok = error <= TOLERANCE[label]
        speed = tflops(dtype, device, n, iters)
        print(f"{label}: {speed:8.1f} TFLOPS  relative error {error:.1e} {'ok' if ok else 'BAD'}")
        results[label] = {"tflops": round(speed, 2), "relative_error": error, "ok": ok}

    passed = all(r.get("ok", True) for r in results.values())
    result = {"gpu": name, "n": n, "iters": iters, "passed": passed, "dtypes": results}
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    if not passed:
        print("error: a result disagrees with the CPU reference", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
