#!/bin/sh
# Obfuscate the tiktrue package with PyArmor (`make bundle OBFUSCATE=1`; on Windows,
# deploy/windows/build.ps1 -Obfuscate does the same). Writes OUT/tiktrue and PyArmor's runtime
# package OUT/pyarmor_runtime_*; the spec then takes tiktrue from OUT (TIKTRUE_BUNDLE_SRC).
# PyArmor's trial licence refuses large modules: a licence is needed for the whole package.
set -e
OUT=${1:?usage: obfuscate.sh OUT}
"${PY:-python}" -m pyarmor.cli gen --recursive --output "$OUT" src/tiktrue
