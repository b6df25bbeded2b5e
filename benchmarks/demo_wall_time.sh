#!/bin/bash
# The README demo's wall time from fresh clones, back to back on one machine: commit BASE, then commit NEW.
#
#     benchmarks/demo_wall_time.sh [BASE [NEW]]      # default: 4472ac0 (main before issue 11), HEAD
#
# Each run: `git clone` of this repository, a new empty model cache, then the README demo command of that
# commit (which creates its venv, installs, converts the embedded model and runs SFT + 2 iterations),
# timed as a whole. Logs go to /tmp/demo-wall-<name>.log; the last lines printed are the two wall times.
set -u
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
run() {  # name commit
  local dir=/tmp/demo-wall-$1 cache=/tmp/demo-wall-$1-cache
  rm -rf "$dir" "$cache" && git clone -q "$repo" "$dir" && mkdir "$cache" && cd "$dir" && git checkout -q "$2" || exit 2
  local cmd
  cmd=$(grep -m1 "^    python3 -m venv .venv && .venv/bin/pip install -q .*torch==2.13.0 -e '.\[embedded\]'" README.md | sed 's/^    //')
  echo "[$1 $(git log --oneline -1 | cut -c1-60)] $cmd"
  local start=$SECONDS
  SELFREWARD_CACHE=$cache bash -c "$cmd" > "/tmp/demo-wall-$1.log" 2>&1
  echo "[$1] exit code $? wall $((SECONDS - start)) s"
}
run base "${1:-4472ac0}"
run new "$(git -C "$repo" rev-parse "${2:-HEAD}")"
