#!/usr/bin/env bash
# The executor sandboxes generated code with bubblewrap; without it, it falls back to rlimits only.
set -u
if command -v bwrap >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap) >/dev/null 2>&1 \
    && { echo "installed bubblewrap"; exit 0; }
fi
echo "warning: bubblewrap (bwrap) is missing and could not be installed; the executor will use its rlimit-only fallback (install the 'bubblewrap' package for full isolation)" >&2
exit 0
