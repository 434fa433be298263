#!/usr/bin/env bash
# Debian packages the tests use: dicom3tools (dciodvfy, the standard's validator), dcmtk (dcmdump)
# and chromium (headless, to check that the QC report.html renders).
# Installs only what is missing; needs root (or sudo) and Debian's package registry.
set -euo pipefail
need=()
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
command -v dcmdump >/dev/null 2>&1 || need+=(dcmtk)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
echo "installing ${need[*]} (Debian packages)" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
