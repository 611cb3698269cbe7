#!/usr/bin/env bash
# The batch fault tests N times in a row while two CPU-bound processes load the machine (issue 13):
#   .ci/faults_under_load.sh 10 /tmp/faults.log
# Not part of .ci/run (it takes 15-30 min); the last count is the last line of LOG.
set -u
n=${1:-10}; log=${2:-/tmp/palstream-faults-under-load.log}; k=${3:-"sigkill or restart or breaks"}
cd "$(dirname "$0")/.."
python3 -c "while True: pass" & h1=$!
python3 -c "while True: pass" & h2=$!
trap 'kill "$h1" "$h2" 2>/dev/null' EXIT
: > "$log"
pass=0
for i in $(seq "$n"); do
    echo "=== run $i $(date -u +%T)" >> "$log"
    if timeout 2400 .venv/bin/python -m pytest -q -x -p no:cacheprovider tests/test_batch_jobs.py -k "$k" --durations=10 -rA >> "$log" 2>&1; then
        pass=$((pass + 1)); echo "=== run $i PASS $(date -u +%T)" >> "$log"
    else
        echo "=== run $i FAIL $(date -u +%T)" >> "$log"
    fi
done
echo "=== passed $pass of $n" >> "$log"
