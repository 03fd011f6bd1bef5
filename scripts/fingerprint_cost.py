"""The cost of a model's fingerprint (a digest of every weight) on SmolLM2-135M-Instruct:
first computation, the cached answer for an unchanged model, and after one in-place change.
Usage: OMP_NUM_THREADS=1 .venv/bin/python scripts/fingerprint_cost.py"""
import time, torch
from slimlm.models import load_model, smollm2_gguf_path
from slimlm.fingerprint import model_fingerprint
m = load_model(smollm2_gguf_path(), dtype=torch.float32, device="cpu")
n = sum(p.numel() for p in m.parameters())
for label, dtype in (("float32 (as loaded)", None), ("cast to bfloat16", torch.bfloat16)):
    t = time.perf_counter(); a = model_fingerprint(m, dtype); first = time.perf_counter() - t
    t = time.perf_counter(); model_fingerprint(m, dtype); again = time.perf_counter() - t
    print(f"{label}: first {first:.2f} s, unchanged again {again*1000:.1f} ms, {n/1e6:.1f}M params")
with torch.no_grad(): m.model.layers[3].mlp.down_proj.weight[0, 0] += 1
t = time.perf_counter(); b = model_fingerprint(m); print(f"after one in-place change: {time.perf_counter()-t:.2f} s, differs: {a != b}")
