#!/usr/bin/env bash
# Shows that tools/vendor/glommio is glommio 0.9.0 as published on crates.io
# plus exactly tools/vendor/glommio.patch: downloads the release, checks its
# sha256 (the checksum Cargo.lock held for it), and compares the diff.
# Usage: tools/vendor/check-glommio.sh [--write]   (--write regenerates the patch file)
set -euo pipefail
cd "$(dirname "$0")"
sha256=e1f8bc1fce949d18098dc0a4e861314e40351a0144ebf61e59bdb5254a2273b2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
curl -sSfL -o "$work/glommio.crate" https://static.crates.io/crates/glommio/glommio-0.9.0.crate
echo "$sha256  $work/glommio.crate" | sha256sum --check --quiet
tar xzf "$work/glommio.crate" -C "$work"
# diff exits 1 when the trees differ, which they do by the patch.
(cd "$work" && mv glommio-0.9.0 a && cp -r "$OLDPWD/glommio" b && diff -ruN a b | sed -E "s/^((---|\+\+\+) [^\t]*)\t.*/\1/") > "$work/actual.patch" || [ $? -eq 1 ]
if [ "${1:-}" = "--write" ]; then
  cp "$work/actual.patch" glommio.patch
  echo "wrote glommio.patch ($(grep -c '^@@' glommio.patch) hunks)"
elif cmp -s "$work/actual.patch" glommio.patch; then
  echo "ok: tools/vendor/glommio = glommio 0.9.0 (sha256 $sha256) + glommio.patch ($(grep -c '^@@' glommio.patch) hunks)"
else
  diff -u glommio.patch "$work/actual.patch" || true
  echo "tools/vendor/glommio differs from glommio 0.9.0 + glommio.patch" >&2
  exit 1
fi
