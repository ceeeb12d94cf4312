#!/usr/bin/env bash
# Record asv results for commits, offline, with the current interpreter (docs/asv.md).
#
#   bash .ci/with-venv bash tools/asv_history.sh [--quick] [--machine NAME] [REV | A..B]... [-- ASV-RUN-ARGS]
#
# asv 0.6 refuses a commit range with an existing environment, so each commit is checked out into a
# temporary git worktree and asv runs this checkout's benchmarks (suites/benchmarks) against that
# worktree's harness (ASV_PYTHONPATH puts it first on the benchmarks' sys.path), saving the results
# under the commit's hash in this checkout's results/asv. Default: HEAD. The machine is registered
# first (GPU, torch and CUDA recorded), and the result files are tidied of local paths at the end.
# Arguments after -- go to asv run (e.g. -- --bench Gemm); results of several calls for one commit merge.
# Exit 0 when every commit was recorded, 1 when asv failed on one, 2 on bad input.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

usage() { sed -n '2,12s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }
die() { echo "error: $*" >&2; exit 2; }

asv_args=()
machine=""
revs=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --quick) asv_args+=(--quick) ;;
    --machine) [ $# -ge 2 ] || die "--machine needs a name"; machine="$2"; shift ;;
    --machine=*) machine="${1#--machine=}" ;;
    --) shift; asv_args+=("$@"); break ;;
    -*) die "unknown option $1 (options: --quick, --machine NAME; see --help)" ;;
    *) revs+=("$1") ;;
  esac
  shift
done
[ ${#revs[@]} -gt 0 ] || revs=(HEAD)
command -v asv >/dev/null || die "asv is not on PATH; run through: bash .ci/with-venv bash tools/asv_history.sh"

commits=()
for rev in "${revs[@]}"; do
  if [[ "$rev" == *..* ]]; then
    list="$(git rev-list --reverse "$rev" 2>/dev/null)" || die "$rev is not a commit range of this repository"
    [ -n "$list" ] || die "$rev selects no commit"
    while read -r c; do commits+=("$c"); done <<<"$list"
  else
    c="$(git rev-parse --verify -q "$rev^{commit}")" || die "$rev is not a commit of this repository"
    commits+=("$c")
  fi
done

machine="$(python tools/asv_env.py machine ${machine:+--name "$machine"})"
echo "asv history: ${#commits[@]} commit(s) on machine $machine" >&2

tmp="$(mktemp -d "${TMPDIR:-/tmp}/asv-history.XXXXXX")"
cleanup() {
  for wt in "$tmp"/*/; do
    [ -d "$wt" ] && git worktree remove --force "$wt" >/dev/null 2>&1 || true
  done
  rm -rf "$tmp"
  git worktree prune
}
trap cleanup EXIT

status=0
for c in "${commits[@]}"; do
  wt="$tmp/${c:0:12}"
  git worktree add --detach -q "$wt" "$c"
  echo "asv history: ${c:0:12} $(git log -1 --format=%s "$c" | cut -c1-70)" >&2
  pypath="$wt${ASV_PYTHONPATH:+:$ASV_PYTHONPATH}"
  if ! ASV_PYTHONPATH="$pypath" asv run --python=same --set-commit-hash "$c" --machine "$machine" "${asv_args[@]}"; then
    echo "asv history: asv failed on ${c:0:12}" >&2
    status=1
  fi
  git worktree remove --force "$wt"
done
python tools/asv_env.py tidy --results-dir results/asv >&2
exit "$status"
