#!/usr/bin/env bash
# Debian packages the tests need: headless Chromium + its WebDriver, for the browser test of `medmerge serve`.
# Idempotent and fast when already installed: no apt-get update unless something is missing.
# Without root (or apt-get) it only says what is missing; the browser test then skips with that reason.
set -euo pipefail

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || [ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: missing ${missing[*]} (install as root: apt-get install -y ${missing[*]});" \
    "the browser test will be skipped" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y --no-install-recommends "${missing[@]}"
fi
