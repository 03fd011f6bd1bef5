"""The cost of a model's fingerprint (a digest of every weight) on SmolLM2-135M-Instruct, in
float32 as loaded and cast to bfloat16, and that one changed element changes it.
Usage: OMP_NUM_THREADS=1 .venv/bin/python scripts/fingerprint_cost.py"""
import statistics
import time

import torch

from slimlm.fingerprint import model_fingerprint
from slimlm.models import load_model, smollm2_gguf_path

model = load_model(smollm2_gguf_path(), dtype=torch.float32, device="cpu")
count = sum(p.numel() for p in model.parameters())
for label, dtype in (("float32 as loaded", None), ("cast to bfloat16", torch.bfloat16)):
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        model_fingerprint(model, dtype)
        seconds.append(time.perf_counter() - start)
    print(f"{label}: median {statistics.median(seconds):.2f} s of 3, {count / 1e6:.1f}M parameters")
before = model_fingerprint(model)
with torch.no_grad():
    model.model.layers[3].mlp.down_proj.weight[0, 0] += 1
print(f"one down_proj element changed: fingerprint differs: {model_fingerprint(model) != before}")
