#!/usr/bin/env bash
# Rebuilds viewer/vendor/hyparquet.js: hyparquet + fzstd + zstddec (its
# WebAssembly module inlined as base64) as ONE classic-script IIFE exposing
# `window.hyparquet` (Chromium blocks ES-module imports of sibling files from
# file://, so the viewer cannot use `import`).
# Build-time only: needs node + npm and the npm registry; users of the viewer
# need none of this. Versions are pinned in package.json / package-lock.json.
set -euo pipefail
cd "$(dirname "$0")"
npm ci --no-audit --no-fund
ver() { node -p "JSON.parse(require('fs').readFileSync('node_modules/$1/package.json')).version"; }
npx esbuild entry.js \
  --bundle \
  --format=iife \
  --global-name=hyparquet \
  --target=es2020 \
  --platform=browser \
  --minify-whitespace --minify-syntax \
  --legal-comments=inline \
  --banner:js="/* hyparquet $(ver hyparquet) (MIT, see LICENSE-hyparquet) + fzstd $(ver fzstd) (MIT, see LICENSE-fzstd) + zstddec $(ver zstddec) (MIT and BSD-3-Clause, see LICENSE-zstddec); built by viewer/vendor/build.sh */" \
  --outfile=hyparquet.js
cp node_modules/hyparquet/LICENSE LICENSE-hyparquet
cp node_modules/fzstd/LICENSE LICENSE-fzstd
cp node_modules/zstddec/LICENSE LICENSE-zstddec
rm -rf node_modules  # build-time only; never committed
echo "wrote $(pwd)/hyparquet.js ($(wc -c < hyparquet.js) bytes)"
