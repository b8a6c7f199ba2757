#!/usr/bin/env bash
# Copies of this checkout (HEAD) with one serving mechanism turned off each, for serve_load.py's --variant NAME@DIR:
#   bash benchmarks/mechanisms_off.sh /tmp/svertka-off
#   python benchmarks/serve_load.py --models simple_cnn --servers service --python-clients 0 \
#       --variant noinline@/tmp/svertka-off/noinline --variant nosolo@/tmp/svertka-off/nosolo \
#       --variant notrack@/tmp/svertka-off/notrack --variant nogc@/tmp/svertka-off/nogc
# Each edit must match exactly once, or the script stops (the code moved: fix the pattern here).
set -euo pipefail
out=${1:?usage: mechanisms_off.sh OUTDIR}
repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)

off() {  # off NAME FILE OLD NEW: a copy of HEAD named NAME with OLD replaced by NEW in FILE
    local name=$1 file=$2 old=$3 new=$4 dir="$out/$1"
    rm -rf "$dir" && mkdir -p "$dir"
    git -C "$repo" archive HEAD | tar -x -C "$dir"
    local n
    n=$(grep -cF -- "$old" "$dir/$file" || true)
    [ "$n" = 1 ] || { echo "mechanisms_off.sh: '$old' found $n times in $file, not once" >&2; exit 1; }
    OLD=$old NEW=$new python3 -c 'import os,sys; p=sys.argv[1]; s=open(p).read(); open(p,"w").write(s.replace(os.environ["OLD"], os.environ["NEW"]))' "$dir/$file"
    echo "$dir: $file: $old -> $new"
}

# the fast forward on the event loop (and a lone request's skip of the queue)
off noinline serving/service.py "INLINE_FORWARD_MS = 2.0" "INLINE_FORWARD_MS = 0.0"
# every thread for a lone slow request
off nosolo serving/service.py "solo = min(cpu_count(), s.workers * s.torch_threads)" "solo = s.torch_threads"
# the load as requests in flight only, without the keep-alive clients seen lately
off notrack serving/guards.py "return max(admission.in_flight, admission.recent_clients)" "return admission.in_flight"
# Python's own schedule for full garbage collections, not the timer
off nogc serving/service.py "        full_collections_every(FULL_GC_S)" "        pass"
