#!/bin/sh
# One-thread sweep of stream_ceiling (one JSON line per configuration), two rounds:
#   sh stream_ceiling_sweep.sh ./stream_ceiling > stream_ceiling_1thread.jsonl
bin=$1
for round in 1 2; do
  for dtype in fp32 bf16; do
    for arith in sum full; do
      for huge in 0 1; do
        $bin $dtype $arith none 2 0 $huge 1 heads
        for hint in 0 1 2 3; do $bin $dtype $arith tile $hint 0 $huge 1 heads; done
        for distance in 512 1024 2048 4096 8192; do
          for hint in 0 2 3; do $bin $dtype $arith lines $hint $distance $huge 1 heads; done
        done
      done
    done
  done
done
