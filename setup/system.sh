#!/usr/bin/env bash
# The set-up step: make sure every Debian package of setup/debian-packages.txt is installed.
# Installs what is missing when it can (root and apt-get); otherwise stops with the exact command.
# Idempotent, and quick (one dpkg-query) when everything is present.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
mapfile -t wanted < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$here/debian-packages.txt" | grep -v '^$')

installed=" $(dpkg-query -W -f='${Package}=${Status}\n' "${wanted[@]}" 2>/dev/null \
  | sed -n 's/=install ok installed$//p' | tr '\n' ' ' || true) "
missing=()
for pkg in "${wanted[@]}"; do
  if [[ $pkg == openjdk-*-jdk-headless ]] && command -v javac >/dev/null; then continue; fi
  [[ $installed == *" $pkg "* ]] || missing+=("$pkg")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi

cmd="apt-get update && apt-get install -y --no-install-recommends ${missing[*]}"
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
  echo "setup (setup/system.sh): missing Debian packages: ${missing[*]}" >&2
  echo "setup: run as root:  $cmd" >&2
  exit 1
fi
echo "setup (setup/system.sh): installing ${#missing[@]} Debian packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "setup: done" >&2
