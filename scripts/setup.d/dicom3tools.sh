#!/usr/bin/env bash
# dciodvfy (Debian's dicom3tools) validates the DICOM SR the export writes (Testing/results_tests/test_export_sr.py).
# Optional: without it that one check reports "skipped" with the reason.
set -u
command -v dciodvfy >/dev/null 2>&1 && exit 0
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends dicom3tools >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
         --no-install-recommends dicom3tools >/dev/null 2>&1; } \
    || echo "warning (dicom3tools): not installed; the dciodvfy check of the SR export will be skipped" >&2
else
  echo "note (dicom3tools): install Debian's dicom3tools to validate SR exports with dciodvfy" >&2
fi
exit 0
