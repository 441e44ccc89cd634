"""Nanoseconds per key and KV head of a decode step from an 8-bit cache (issue 18).

B1, 32 query heads over 8 KV heads, Sq 1, D 128, bf16 queries, caches from quantize_kv;
timed as decode_ab.py times its steps. The time is
multiplied by the thread count, so it reads as a thread's time per key. One line.

    python int8_per_key.py THREADS int8:2048,int8:32768
"""

import functools
import sys

import fusedattn
import torch
from decode_ab import seconds_per_call  # beside this script


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]))
    torch.manual_seed(0)
    out = []
    for spec in sys.argv[2].split(","):
        dtype_name, keys = spec.split(":")
        keys = int(keys)
        dtype = getattr(torch, dtype_name)
        q = torch.randn(1, 32, 1, 128, dtype=torch.bfloat16)
        k = torch.randn(1, 8, keys, 128, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        key_cache, k_descale = fusedattn.quantize_kv(k, dtype)
        value_cache, v_descale = fusedattn.quantize_kv(v, dtype)

        step = functools.partial(
            fusedattn.attention, q, key_cache, value_cache, backend="cpu", k_descale=k_descale, v_descale=v_descale
        )

        per_key = seconds_per_call(step, keys) * 1e9 * torch.get_num_threads() / (keys * 8)
        out.append(f"{dtype_name[:4]}{keys}:{per_key:.2f}")
    print(" ".join(out))


if __name__ == "__main__":
    main()
