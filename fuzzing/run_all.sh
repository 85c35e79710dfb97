#!/bin/sh
# Run every atheris target for SECONDS (default 60) from a scratch copy of its seed corpus; prints
# one summary line per target (executions, corpus size, findings). Usage: fuzzing/run_all.sh [SECONDS] [TARGET...]
set -u
here=$(cd "$(dirname "$0")" && pwd)
seconds=${1:-60}
[ $# -gt 0 ] && shift
targets=${*:-"mllp hl7_header hl7_session agent_messages agent_session astm bytestream"}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for target in $targets; do
    mkdir -p "$work/$target/corpus" "$work/$target/crashes"
    cp "$here/corpus/$target/"* "$work/$target/corpus/"
    (cd "$work/$target/crashes" && python "$here/fuzz.py" "$target" -max_total_time="$seconds" \
        -max_len=4096 -rss_limit_mb=1024 -print_final_stats=1 "$work/$target/corpus") >"$work/$target/log" 2>&1
    status=$?
    runs=$(grep -o 'Done [0-9]* runs' "$work/$target/log" | grep -o '[0-9]*' | tail -1)
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$work/$target/log" | grep -o '[0-9]*$' | tail -1)
    corpus=$(ls "$work/$target/corpus" | wc -l)
    crashes=$(ls "$work/$target/crashes" | grep -c '^crash-\|^timeout-\|^oom-')
    echo "$target: exit=$status executions=${execs:-${runs:-?}} corpus=$corpus findings=$crashes"
    if [ "$crashes" -gt 0 ]; then
        mkdir -p "$here/findings/$target" && cp "$work/$target/crashes/"* "$here/findings/$target/"
        grep -m1 -A12 'Uncaught Python exception\|Traceback' "$work/$target/log"
    fi
done
