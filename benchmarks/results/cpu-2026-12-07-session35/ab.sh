# sh ab.sh THREADS SPECS ROUNDS VARIANT...: int8_per_key.py for each variant in turn, ROUNDS times.
# A variant is a directory under $VARIANTS (default /tmp/s35/v) holding a fusedattn package
# (variant.sh builds them); SPECS as int8_per_key.py takes them (int8:2048,int8:32768).
T=$1; S=$2; R=$3; shift 3
HERE=$(dirname "$0")
for r in $(seq "$R"); do for v in "$@"; do
  echo "$v $(PYTHONPATH=${VARIANTS:-/tmp/s35/v}/$v ${PYTHON:-python} "$HERE/int8_per_key.py" "$T" "$S")"
done; done
