# sh mask_ab.sh ROUND (ORDER="new base" to reverse): the mask/softcap grid on two package copies,
# /tmp/s36/pkg-base (3955581 built) and /tmp/s36/pkg-new (this change), one after the other.
# sh mask_ab.sh ROUND: the mask/softcap grid (two threads, --rounds 5) on base then new.
for p in ${ORDER:-base new}; do
  OMP_NUM_THREADS=2 PYTHONPATH=/tmp/s36/pkg-$p /work/main/.venv/bin/python -m fusedattn bench --config /work/main/benchmarks/grids/cpu-masks-softcap.toml --device cpu --providers fusedattn:cpu,sdpa --min-repeats 5 --rounds 5 --no-plots --no-memory --out /tmp/s36/masks-$p-$1 > /tmp/s36/masks-$p-$1.log 2>&1
done
