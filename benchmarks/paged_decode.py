"""One decode step over a paged KV cache on CPU: read in place, against a dense cache and
against gathering the pages first, in one run.

    .venv/bin/python benchmarks/paged_decode.py --out benchmarks/results/DIR

Per block size (16 and 256 by default) the same flash_attn_with_kvcache call runs three
ways, interleaved round by round so that a noisy neighbour hits all of them alike:

  * paged:    compat.flash_attn_with_kvcache(block_table=...), which reads the blocks in
              place (fusedattn.attention_paged);
  * dense:    the same call on a dense cache (B, S, Hkv, D) holding the same keys;
  * gathered: the path before attention_paged: the pages gathered into a right-aligned
              dense copy (compat._right_aligned_keys), then fusedattn.attention with the mask.

The blocks of the cache are in random order (a fragmented cache). Prints the medians and
their ratios and writes results.json with every raw time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import fusedattn
import torch
from fusedattn import compat
from fusedattn.backends.cpu import selected_isa
from fusedattn.fingerprint import cpu_model, git_commit


def build(tokens: int, block_size: int, heads_q: int, heads_kv: int, dim: int, dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, tokens, heads_kv, dim, generator=generator).to(dtype)
    values = torch.randn(1, tokens, heads_kv, dim, generator=generator).to(dtype)
    blocks = tokens // block_size
    order = torch.randperm(blocks, generator=generator)
    key_cache = torch.empty(blocks, block_size, heads_kv, dim, dtype=dtype)
    value_cache = torch.empty_like(key_cache)
    key_cache[order] = keys.view(blocks, block_size, heads_kv, dim)
    value_cache[order] = values.view(blocks, block_size, heads_kv, dim)
    table = order.to(torch.int32)[None, :]
    q = torch.randn(1, 1, heads_q, dim, generator=generator).to(dtype)
    lengths = torch.tensor([tokens], dtype=torch.int32)
    return q, keys, values, key_cache, value_cache, table, lengths


def gathered_call(q, key_cache, value_cache, table, lengths):
    rows = torch.zeros(1, dtype=torch.int64)
    keys, values, mask = compat._right_aligned_keys(
        key_cache, value_cache, rows, torch.zeros(1, dtype=torch.int64), lengths.long(), table.long()
    )
    out = fusedattn.attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def measure(args: argparse.Namespace, dtype_name: str, block_size: int, heads_q: int, heads_kv: int) -> dict:
    """The three calls for one dtype and block size, interleaved: medians and raw times."""
    q, keys, values, key_cache, value_cache, table, lengths = build(
        args.tokens, block_size, heads_q, heads_kv, args.head_dim, getattr(torch, dtype_name), seed=block_size
    )
    calls = {
        "paged": lambda: compat.flash_attn_with_kvcache(
            q, key_cache, value_cache, cache_seqlens=lengths, block_table=table
        ),
        "dense": lambda: compat.flash_attn_with_kvcache(q, keys, values, cache_seqlens=lengths),
        "gathered": lambda: gathered_call(q, key_cache, value_cache, table, lengths),
    }
    results = {name: call() for name, call in calls.items()}
    for name in ("paged", "gathered"):  # the same answer, or the timing means nothing
        torch.testing.assert_close(results[name].float(), results["dense"].float(), rtol=2e-2, atol=2e-2)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return dict(
        dtype=dtype_name,
        block_size=block_size,
        median_ms={name: 1e3 * value for name, value in medians.items()},
        paged_over_dense=medians["paged"] / medians["dense"],
        gathered_over_paged=medians["gathered"] / medians["paged"],
        raw_seconds=times,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--block-sizes", default="16,256")
    parser.add_argument("--heads", default="32:8", help="query heads:KV heads")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    heads_q, heads_kv = (int(x) for x in args.heads.split(":"))
    load = os.getloadavg()
    rows = []
    for dtype_name in args.dtypes.split(","):
        for block_size in (int(x) for x in args.block_sizes.split(",")):
            row = measure(args, dtype_name, block_size, heads_q, heads_kv)
            rows.append(row)
            print(
                f"{dtype_name:9s} block {block_size:4d}: paged {row['median_ms']['paged']:.3f} ms, "
                f"dense {row['median_ms']['dense']:.3f} ms, gathered {row['median_ms']['gathered']:.3f} ms; "
                f"paged/dense {row['paged_over_dense']:.3f}, gathered/paged {row['gathered_over_paged']:.1f}x"
            )
    commit, dirty = git_commit()
    report = dict(
        command="benchmarks/paged_decode.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=dict(cpu=cpu_model(), threads=torch.get_num_threads(), isa=selected_isa(), load_before=load),
        versions=dict(torch=torch.__version__, fusedattn=fusedattn.__version__, commit=commit, dirty=dirty),
        shape=dict(tokens=args.tokens, heads_q=heads_q, heads_kv=heads_kv, head_dim=args.head_dim, batch=1, queries=1),
        rows=rows,
    )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
