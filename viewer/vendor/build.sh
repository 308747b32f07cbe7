#!/usr/bin/env bash
# Rebuilds viewer/vendor/hyparquet.js: hyparquet + fzstd as ONE classic-script
# IIFE exposing `window.hyparquet` (Chromium blocks ES-module imports of sibling
# files from file://, so the viewer cannot use `import`).
# Build-time only: needs node + npm and the npm registry; users of the viewer
# need none of this. Versions are pinned in package.json / package-lock.json.
set -euo pipefail
cd "$(dirname "$0")"
npm ci --no-audit --no-fund
npx esbuild entry.js \
  --bundle \
  --format=iife \
  --global-name=hyparquet \
  --target=es2020 \
  --platform=browser \
  --minify-whitespace --minify-syntax \
  --legal-comments=inline \
  --banner:js="/* hyparquet $(node -p "JSON.parse(require('fs').readFileSync('node_modules/hyparquet/package.json')).version") (MIT, see LICENSE-hyparquet) + fzstd $(node -p "JSON.parse(require('fs').readFileSync('node_modules/fzstd/package.json')).version") (MIT, see LICENSE-fzstd); built by viewer/vendor/build.sh */" \
  --outfile=hyparquet.js
cp node_modules/hyparquet/LICENSE LICENSE-hyparquet
cp node_modules/fzstd/LICENSE LICENSE-fzstd
rm -rf node_modules  # build-time only; never committed
echo "wrote $(pwd)/hyparquet.js ($(wc -c < hyparquet.js) bytes)"
