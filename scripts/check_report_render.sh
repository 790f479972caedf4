#!/usr/bin/env bash
# Render a `detr-attn report` HTML page in headless Chromium, offline, and save a screenshot.
#
# Usage: scripts/check_report_render.sh [RUN_DIR | HTML_FILE] [OUT_PNG] [WIDTH,HEIGHT]
#   RUN_DIR    a `detr-attn predict` run folder: its report is (re)built first
#   HTML_FILE  an existing report page
#   (nothing)  a small fake run folder (synthetic images, built by tests/test_report.py's
#              make_run) is created in a temp folder and reported
#   OUT_PNG    screenshot path (default: report_screenshot.png)
# Needs Chromium; as root on Debian/Ubuntu it is installed with apt-get when missing.
# Exit status 0 when Chromium rendered a non-blank page.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$python" ] || python="python3"
target="${1:-}"
out_png="$(realpath -m "${2:-report_screenshot.png}")"
window="${3:-1280,2400}"

find_chromium() {
    for name in chromium chromium-browser google-chrome google-chrome-stable; do
        if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return 0; fi
    done
    return 1
}

if ! browser="$(find_chromium)"; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "chromium not found: installing it with apt-get" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null
        browser="$(find_chromium)"
    else
        echo "error: chromium not found (install it, e.g. 'apt-get install -y chromium')" >&2
        exit 2
    fi
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if [ -z "$target" ]; then
    run_dir="$("$python" - "$work" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from test_report import make_run
print(make_run(Path(sys.argv[1])))
EOF
)"
    target="$run_dir"
fi

if [ -d "$target" ]; then
    (cd "$repo" && "$python" -m detection.cli report "$target" >&2)
    html="$target/report/index.html"
else
    html="$target"
fi
[ -f "$html" ] || { echo "error: $html does not exist" >&2; exit 2; }

# --headless renders without a display; the rest keep Chromium offline and side-effect free
timeout 180 "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars \
    --disable-background-networking --disable-component-update --disable-sync \
    --disable-default-apps --no-first-run --user-data-dir="$work/profile" \
    --window-size="$window" --screenshot="$out_png" "file://$(realpath "$html")" >"$work/chromium.log" 2>&1 || {
    echo "error: chromium failed; its log:" >&2; cat "$work/chromium.log" >&2; exit 1; }

"$python" - "$out_png" <<'EOF'
import sys
import numpy as np
from PIL import Image
path = sys.argv[1]
pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
spread = float(pixels.std())
print(f"screenshot {path}: {pixels.shape[1]}x{pixels.shape[0]} px, pixel std {spread:.1f}")
sys.exit(0 if spread > 5.0 else f"error: {path} looks blank")
EOF
