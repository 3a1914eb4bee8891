"""Scratch: which SDPA backend is fast for decode (growing KV length) and for training shapes, on this GPU."""
import time, torch, torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
dev = "cuda"; dt = torch.bfloat16
nh, nkv, hd = 32, 8, 128
def decode(backends, steps=64, S0=128):
    k = torch.randn(1, nkv, S0 + steps, hd, device=dev, dtype=dt); v = torch.randn_like(k)
    q = torch.randn(1, nh, 1, hd, device=dev, dtype=dt)
    with sdpa_kernel(backends):
        torch.cuda.synchronize(); t = time.perf_counter()
        for i in range(steps):
            F.scaled_dot_product_attention(q, k[:, :, :S0 + i], v[:, :, :S0 + i], enable_gqa=True)
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps * 1e3
def train(backends, T=2048):
    q = torch.randn(1, nh, T, hd, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(1, nkv, T, hd, device=dev, dtype=dt, requires_grad=True); v = torch.randn_like(k, requires_grad=True)
    with sdpa_kernel(backends):
        for _ in range(3): F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
        torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(10): F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / 10 * 1e3
for name, b in [("cudnn", [SDPBackend.CUDNN_ATTENTION]), ("flash", [SDPBackend.FLASH_ATTENTION]),
                ("efficient", [SDPBackend.EFFICIENT_ATTENTION]), ("math", [SDPBackend.MATH]),
                ("default", list(SDPBackend.__members__.values())[1:] if False else None)]:
    try:
        if b is None:
            d = decode.__wrapped__ if False else None
            torch.cuda.synchronize()
            k = torch.randn(1, nkv, 192, hd, device=dev, dtype=dt); v = torch.randn_like(k); q = torch.randn(1, nh, 1, hd, device=dev, dtype=dt)
            t = time.perf_counter()
            for i in range(64): F.scaled_dot_product_attention(q, k[:, :, :128 + i], v[:, :, :128 + i], enable_gqa=True)
            torch.cuda.synchronize(); print(name, "decode ms/step", (time.perf_counter() - t) / 64 * 1e3)
            continue
        print(name, "decode ms/step", round(decode(b), 3), "train fwd+bwd ms", round(train(b), 3))
    except Exception as e:
        print(name, "failed:", str(e).splitlines()[0][:150])
# one matmul sanity: 8B-shape linear at decode
w = torch.randn(14336, 4096, device=dev, dtype=dt); x = torch.randn(1, 1, 4096, device=dev, dtype=dt)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(100): F.linear(x, w)
torch.cuda.synchronize(); print("gemv 14336x4096 us", (time.perf_counter() - t) / 100 * 1e6)
