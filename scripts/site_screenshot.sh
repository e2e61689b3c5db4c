#!/usr/bin/env bash
# A screenshot of the site's index in headless Chromium (Debian's chromium), for the README.
# Usage: scripts/site_screenshot.sh [SITE] [PNG]   (defaults: runs/exp/site, docs/site-index.png;
# the site is what `bnlab lab` or `bnlab report --html` wrote). Run from the repository root.
# Chromium runs as the tests run it: no sandbox (root), nothing fetched by itself, a new empty
# profile, deleted afterwards.
set -euo pipefail

SITE=${1:-runs/exp/site}
PNG=${2:-docs/site-index.png}
CHROMIUM=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}
[ -n "$CHROMIUM" ] || { echo "site_screenshot: no chromium (make browser installs Debian's)" >&2; exit 1; }
[ -f "$SITE/index.html" ] || { echo "site_screenshot: no $SITE/index.html (run bnlab lab first)" >&2; exit 1; }

PROFILE=$(mktemp -d)
trap 'rm -rf "$PROFILE"' EXIT
mkdir -p "$(dirname "$PNG")"
"$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$PROFILE" --hide-scrollbars --window-size=1280,1600 \
    --screenshot="$(realpath -m "$PNG")" "file://$(realpath "$SITE")/index.html" 2>/dev/null
echo "screenshot: $PNG"
