#!/usr/bin/env bash
# Throughput of one `fedpft bench` workload at several world sizes on this machine, then its scaling
# table (`fedpft report`, docs/benchmarks.md#scaling-across-world-sizes):
#   - 1, 2 and 4 gloo ranks on this node (launcher/torchrun.sh N), into OUT/ranks-N;
#   - when root and network namespaces can be made (tests/netns_nodes.py), two "nodes" of this
#     machine joined by a veth pair, 1 and then 2 ranks on each (torchrun --nnodes 2, c10d rendezvous
#     on node1), into OUT/nodes-2x1 and OUT/nodes-2x2: every byte between the nodes crosses the pair;
#   - the report of every size measured, into OUT/report (scaling.md, scaling.csv, scaling.png).
# Resumable: a size whose bench.json exists is skipped (an unfinished one is started again from
# scratch). Each size's output goes to OUT/logs/<size>.log.
#
# Usage:
#   scripts/scaling.sh [OUT] [key=value ...]      (OUT default: runs/scaling)
#   e.g. scripts/scaling.sh runs/scaling
#        SCALING_RANKS="1 2" SCALING_NODES=0 scripts/scaling.sh /tmp/sc fed.num_clients=60 data.max_train=480
# The overrides go to every size (all sizes must be one workload). The default workload,
# configs/bench/many-clients.yaml (1,000 clients of 8 tweets, 100 per round, 3 rounds), takes about
# a minute per size on 2 quiet cores. Measure on a quiet machine: other jobs on the cores distort the
# figures. With more ranks than cores (4 ranks on 2 cores) the ranks take turns on them: the table
# marks such rows oversubscribed; CPU gloo figures here show the overheads of more ranks, not a GPU
# cluster's scaling.
#
# Variables read (all optional):
#   SCALING_CONFIG      bench config (default: configs/bench/many-clients.yaml)
#   SCALING_RANKS       local world sizes (default: "1 2 4")
#   SCALING_NODES       two-node runs: auto (default: when root and namespaces work), 0 (never), 1 (must)
#   SCALING_NODE_RANKS  ranks per node of the two-node runs (default: "1 2")
#   FEDPFT_PYTHON       interpreter (default: the repository's .venv, see launcher/common.sh)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../launcher/common.sh"
cd "$FEDPFT_HOME"
out=runs/scaling
if [ $# -gt 0 ] && [[ $1 != *=* ]]; then out=${1%/}; shift; fi
for arg in "$@"; do
  if [[ $arg != *=* ]] || [[ $arg == run.dir=* ]]; then
    echo "usage: scripts/scaling.sh [OUT] [key=value ...] (not run.dir: each size has its own, OUT/<size>)" >&2
    exit 2
  fi
done
config=${SCALING_CONFIG:-configs/bench/many-clients.yaml}
nodes_mode=${SCALING_NODES:-auto}
bench=(bench --config "$config" "$@")
mkdir -p "$out/logs"
measured=()

# run NAME COMMAND...: the bench into OUT/NAME unless its bench.json exists; returns COMMAND's status
run() {
  local name=$1; shift
  local dir=$out/$name
  if [ -f "$dir/bench.json" ]; then
    echo "$name: done before, skipped ($dir/bench.json)"; measured+=("$dir"); return 0
  fi
  rm -rf "$dir"   # a fresh run.dir: fedpft bench does not resume
  echo "$name: running, log in $out/logs/$name.log"
  local start=$SECONDS status=0
  "$@" "run.dir=$dir" > "$out/logs/$name.log" 2>&1 || status=$?
  if [ "$status" -eq 0 ] && [ -f "$dir/bench.json" ]; then
    echo "$name: finished in $(( SECONDS - start )) s"; measured+=("$dir")
  fi
  return "$status"
}

for n in ${SCALING_RANKS:-1 2 4}; do
  run "ranks-$n" bash launcher/torchrun.sh "$n" "${bench[@]}" \
    || { echo "ranks-$n failed (exit $?): see $out/logs/ranks-$n.log" >&2; exit 1; }
done

if [ "$nodes_mode" != 0 ]; then
  if [ "$(id -u)" != 0 ] && [ "$nodes_mode" = auto ]; then
    echo "two-node runs skipped: network namespaces need root (SCALING_NODES=0 to silence this)"
  else
    for n in ${SCALING_NODE_RANKS:-1 2}; do
      status=0
      run "nodes-2x$n" "$FEDPFT_PYTHON" scripts/scaling_nodes.py "$n" "${bench[@]}" || status=$?
      if [ "$status" -eq 77 ] && [ "$nodes_mode" = auto ]; then
        echo "two-node runs skipped: $(tail -n1 "$out/logs/nodes-2x$n.log")"; rm -rf "$out/nodes-2x$n"; break
      elif [ "$status" -ne 0 ]; then
        echo "nodes-2x$n failed (exit $status): see $out/logs/nodes-2x$n.log" >&2; exit 1
      fi
    done
  fi
fi

"$FEDPFT_PYTHON" -m fedpft_dist report "${measured[@]}" --out "$out/report"
