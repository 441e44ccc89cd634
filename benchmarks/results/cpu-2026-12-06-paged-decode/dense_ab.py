import torch, time, statistics, sys, json, fusedattn
from fusedattn.validation import validate_attention
from fusedattn.backends import cpu
torch.manual_seed(0)
res = {"file": fusedattn.__file__}
shapes = {
  "decode_bf16": (1, 32, 8, 1, 8192, 128, torch.bfloat16, False),
  "decode_f32": (1, 32, 8, 1, 8192, 128, torch.float32, False),
  "decode_f16": (1, 32, 8, 1, 4096, 128, torch.float16, False),
  "prefill_f32": (1, 8, 8, 1024, 1024, 64, torch.float32, True),
  "prefill_bf16": (1, 8, 8, 1024, 1024, 64, torch.bfloat16, True),
}
for name, (b, hq, hkv, sq, sk, d, dt, causal) in shapes.items():
    q = torch.randn(b, hq, sq, d, dtype=dt); k = torch.randn(b, hkv, sk, d, dtype=dt); v = torch.randn(b, hkv, sk, d, dtype=dt)
    call = validate_attention(q, k, v, causal=causal)
    for _ in range(3): cpu.forward(call)
    ts = []
    for _ in range(15):
        s = time.perf_counter(); cpu.forward(call); ts.append(time.perf_counter() - s)
    res[name] = statistics.median(ts) * 1e3
print(json.dumps(res))
