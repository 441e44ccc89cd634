"""One prefill case alone, fusedattn (backend="cpu") against torch SDPA, torch's default threads: five rounds of 50 calls each, alternated.

python prefill_one.py B,H,S,D
"""
import statistics, sys, time, torch, fusedattn
import torch.nn.functional as F
torch.manual_seed(0)
B,H,S,D = [int(x) for x in sys.argv[1].split(",")]
q=torch.randn(B,H,S,D); k=torch.randn(B,H,S,D); v=torch.randn(B,H,S,D)
def t(f,n=50):
    for _ in range(5): f()
    s=time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter()-s)/n*1e3
r=[]
for _ in range(5):
    a=t(lambda: fusedattn.attention(q,k,v,backend="cpu")); b=t(lambda: F.scaled_dot_product_attention(q,k,v)); r.append(b/a)
    print(f"ours {a:.3f} ms sdpa {b:.3f} ms ratio {b/a:.2f}")
print("median", statistics.median(r))
