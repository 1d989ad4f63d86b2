#!/usr/bin/env bash
# Checks the layering of src/ (lib.rs's "Layout", ARCHITECTURE.md's map): code in one layer
# imports only lower layers, so there is no import cycle between folders. Comments (doc
# links) are not imports. Test modules (`tests.rs`) are not checked: a test may assemble a
# scenario from a peer of its layer (the client's tests talk to a real view leader) without
# making the product depend on it. Exit 1 with one line per offending import.
set -euo pipefail
cd "$(dirname "$0")/../src"

# layer of each top-level module of the crate
declare -A layer=(
  [util]=0 [placement]=1 [faults]=1 [wire]=2 [reliable]=3 [txn]=4 [runtime]=4
  [server]=5 [viewleader]=5 [client]=5 [cli]=6 [fuzzing]=6
)

bad=0
while IFS= read -r file; do
  module=${file%%/*}
  module=${module%.rs}
  [ -n "${layer[$module]+x}" ] || { echo "$file: module '$module' has no layer in tools/check-layers.sh"; bad=1; continue; }
  mine=${layer[$module]}
  # every crate::<module> outside comments
  while IFS=: read -r line used; do
    [ "$used" = "$module" ] && continue
    if [ -z "${layer[$used]+x}" ]; then
      echo "$file:$line: imports crate::$used, which has no layer"; bad=1
    elif [ "${layer[$used]}" -ge "$mine" ]; then
      echo "$file:$line: $module (layer $mine) imports crate::$used (layer ${layer[$used]})"; bad=1
    fi
  done < <(sed -E 's#//.*$##' "$file" | grep -noE 'crate::[a-z_]+' | sed -E 's/crate:://')
done < <(find . -name '*.rs' ! -path './bin/*' ! -name lib.rs ! -name tests.rs | sed 's#^\./##' | sort)

if [ "$bad" = 0 ]; then
  echo "layers: every import in src/ points to a lower layer"
fi
exit "$bad"
