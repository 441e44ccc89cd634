# sh variant.sh NAME N: rebuild a -g build tree at /tmp/wt-prof (int8_experiments.diff applied) with
# FA_EXPERIMENT=N (read from /tmp/s35/experiment.h) and copy its package to /tmp/s35/v/NAME.
set -e
echo "#define FA_EXPERIMENT $2" > /tmp/s35/experiment.h
cd /tmp/wt-prof/build/temp.linux-x86_64-cpython-311/cmake
ninja > /tmp/s35/ninja.log 2>&1 || { grep -m5 -A5 error /tmp/s35/ninja.log; exit 1; }
rm -rf /tmp/s35/v/$1; mkdir -p /tmp/s35/v/$1
cp -r /tmp/wt-prof/python/fusedattn /tmp/s35/v/$1/
cp /tmp/wt-prof/build/lib.linux-x86_64-cpython-311/fusedattn/_C*.so /tmp/s35/v/$1/fusedattn/
echo built $1
