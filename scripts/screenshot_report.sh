#!/usr/bin/env bash
# Render a fedprobe report page in headless Chromium and save a screenshot, to check it as a reader sees it.
#   scripts/screenshot_report.sh fedprobe-output/reports/privacy_utility/report.html report.png
# Needs Chromium (Debian: apt-get install chromium). The page is self-contained: no network is touched.
set -euo pipefail
page=$(realpath "${1:?usage: screenshot_report.sh REPORT.html OUT.png}")
out=$(realpath -m "${2:-report.png}")
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$browser" ] || { echo "screenshot_report: no Chromium found (apt-get install chromium)" >&2; exit 2; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --hide-scrollbars \
  --window-size=1400,1800 --screenshot="$out" "file://$page" >/dev/null 2>&1
[ -s "$out" ] || { echo "screenshot_report: Chromium wrote no screenshot" >&2; exit 1; }
echo "$out"
