# sh mask_training_ab.sh ROUND (ORDER="bwd fwd" to reverse): masks_training.toml on two package
# copies, /tmp/s36/pkg-new (9b02978: the forward skips hidden tiles) and /tmp/s36/pkg-bwd (the
# backward too), one after the other, two threads.
for p in ${ORDER:-new bwd}; do
  OMP_NUM_THREADS=2 PYTHONPATH=/tmp/s36/pkg-$p /work/main/.venv/bin/python -m fusedattn bench \
    --config /work/main/benchmarks/results/cpu-2026-12-07-session36/masks_training.toml --device cpu \
    --providers fusedattn:cpu,sdpa --min-repeats 5 --rounds 5 --no-plots --no-memory \
    --out /tmp/s36/train-$p-$1 > /tmp/s36/train-$p-$1.log 2>&1
done
