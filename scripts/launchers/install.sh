#!/usr/bin/env bash
# Install the apt packages the real-launcher tests need. Idempotent and
# non-interactive: when every package is already installed, apt is not run.
#
#   scripts/launchers/install.sh            # as root
#
# Env: DRT_APT_TIMEOUT (default 600): upper bound in seconds for each apt step.
set -euo pipefail

# chromium: tests/test_docs_site.py renders the documentation site headless (never skipped in CI).
PACKAGES=(slurm-wlm munge openmpi-bin mpich iproute2 util-linux procps chromium)
APT_TIMEOUT=${DRT_APT_TIMEOUT:-600}
export DEBIAN_FRONTEND=noninteractive

start=$(date +%s.%N)
elapsed() { awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }

missing=()
for pkg in "${PACKAGES[@]}"; do
  # "install ok installed": a package merely known (removed, config-files)
  # makes `dpkg -s` succeed too, so check the status line.
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
    missing+=("$pkg")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "install.sh: all packages present (${PACKAGES[*]}); apt skipped; took $(elapsed) s"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: ERROR: packages missing (${missing[*]}) and not running as root;" \
       "run 'sudo $0' or install them with apt-get" >&2
  exit 1
fi

echo "install.sh: installing ${missing[*]}"
# Bounded: apt can block on a dpkg lock held by another process.
apt_run() {
  timeout --kill-after=10 -s TERM "$APT_TIMEOUT" \
    apt-get -o DPkg::Lock::Timeout=120 -o Dpkg::Options::=--force-confdef \
      -o Dpkg::Options::=--force-confold "$@"
}
if ! apt_run install -y -q --no-install-recommends "${missing[@]}"; then
  echo "install.sh: first install attempt failed; running apt-get update and retrying" >&2
  apt_run update -q || { echo "install.sh: ERROR: apt-get update failed" >&2; exit 1; }
  apt_run install -y -q --no-install-recommends "${missing[@]}" \
    || { echo "install.sh: ERROR: apt-get install ${missing[*]} failed" >&2; exit 1; }
fi

for pkg in "${missing[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$' \
    || { echo "install.sh: ERROR: $pkg still not installed after apt-get" >&2; exit 1; }
done
echo "install.sh: installed ${missing[*]}; took $(elapsed) s"
