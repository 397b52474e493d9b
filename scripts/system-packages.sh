#!/usr/bin/env bash
# System packages the pipeline uses when present, installed with apt-get when run as root:
# - bubblewrap sandboxes generated code; without it the executor falls back to rlimits only;
# - tcmalloc serves `etpo`'s large tensors faster than glibc's malloc (pipeline/allocator.py);
#   without it `etpo` keeps the system allocator: the same results, slower.
set -u
has_bwrap() { command -v bwrap >/dev/null 2>&1; }
has_tcmalloc() { PATH="$PATH:/sbin:/usr/sbin" ldconfig -p 2>/dev/null | grep -q 'libtcmalloc\(_minimal\)\?\.so'; }
missing=()
has_bwrap || missing+=(bubblewrap)
has_tcmalloc || missing+=(libtcmalloc-minimal4)
if [ ${#missing[@]} = 0 ]; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null 2>&1 \
    && { echo "installed ${missing[*]}"; exit 0; }
fi
has_bwrap \
  || echo "warning: bubblewrap (bwrap) is missing and could not be installed; the executor will use its rlimit-only fallback (install the 'bubblewrap' package for full isolation)" >&2
has_tcmalloc \
  || echo "note: tcmalloc is missing and could not be installed; etpo uses the system allocator, slower (install 'libtcmalloc-minimal4' or gperftools)" >&2
exit 0
