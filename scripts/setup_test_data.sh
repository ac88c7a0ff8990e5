#!/usr/bin/env bash
# Offline data that some metrics and tests need (see METRICS.md, docs/evaluation.md).
# Each step is optional: a missing piece makes the dependent metric report "skipped".
set -uo pipefail
PY=${1:?usage: setup_test_data.sh PYTHON}
for step in scripts/setup.d/*.sh; do
  [ -e "$step" ] || continue
  bash "$step" "$PY" || echo "warning: $step failed; dependent features will report skipped"
done
exit 0
