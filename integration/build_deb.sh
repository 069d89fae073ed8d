#!/usr/bin/env bash
# Build the Debian package from this checkout's working tree, outside it:
#   integration/build_deb.sh OUTDIR
# leaves in OUTDIR the .deb, the source package (.dsc, orig tarballs,
# .debian.tar.xz), the .changes, build.log and lintian.txt, and prints the
# .deb's path. Fails when the build fails or lintian reports an error.
#
# The source is what `git ls-files` sees (tracked and untracked-not-ignored
# files, as they are on disk, edits included), so nothing of the build ever
# lands in the checkout. qemu.qmp comes from debian/fetch-qemu-qmp as a
# component tarball; the wheel is cached in $VMSHARE_CACHE (default
# /var/cache/vmshare-test).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT=$(realpath -m "${1:?usage: integration/build_deb.sh OUTDIR}")
CACHE=${VMSHARE_CACHE:-/var/cache/vmshare-test}

# Debian's own tools and python3 only (not a pyenv or venv python found first)
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV

say() { echo "build_deb: $*" >&2; }
die() { echo "build_deb: ERROR: $*" >&2; exit 1; }

for tool in dpkg-buildpackage dpkg-parsechangelog lintian; do
    command -v "$tool" >/dev/null || die "$tool missing (run integration/setup.sh)"
done
mkdir -p "$OUT"
work=$(mktemp -d /tmp/vmshare-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT

version=$(dpkg-parsechangelog -l "$REPO/debian/changelog" -SVersion)
upstream=${version%-*}
src="$work/vmshare-$upstream"
# fixed timestamps, so the same tree gives the same orig tarball
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(dpkg-parsechangelog -l "$REPO/debian/changelog" -STimestamp)}

# --- upstream tarball: the working tree without debian/ ---------------------
(cd "$REPO" && git ls-files -z -co --exclude-standard -- . ':!:debian') \
    | while IFS= read -r -d '' f; do
          # a tracked file deleted in the working tree is not part of it
          [[ -e $REPO/$f || -L $REPO/$f ]] && printf '%s\0' "$f"
      done \
    | tar -C "$REPO" --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 \
          --numeric-owner --transform "s,^,vmshare-$upstream/," --null -T - -cf - \
    | gzip -9n > "$work/vmshare_$upstream.orig.tar.gz"
"$REPO/debian/fetch-qemu-qmp" "$work" "$CACHE/qemu-qmp" >/dev/null

# --- the unpacked source, as dpkg-source -x would lay it out -----------------
tar -xzf "$work/vmshare_$upstream.orig.tar.gz" -C "$work"
mkdir "$src/qemu-qmp"
tar -xzf "$work/vmshare_$upstream.orig-qemu-qmp.tar.gz" -C "$src/qemu-qmp" --strip-components=1
cp -a "$REPO/debian" "$src/debian"

say "building vmshare $version (log: $OUT/build.log)"
if ! (cd "$src" && dpkg-buildpackage -us -uc) >"$OUT/build.log" 2>&1; then
    tail -n 40 "$OUT/build.log" >&2
    die "dpkg-buildpackage failed (log: $OUT/build.log)"
fi
changes="$work/vmshare_${version}_amd64.changes"
deb="vmshare_${version}_amd64.deb"
[[ -f $work/$deb ]] || die "dpkg-buildpackage made no $deb"

# lintian on the .changes checks the source package and the .deb
lintian --info --display-info --pedantic --tag-display-limit 0 "$changes" \
    >"$OUT/lintian.txt" 2>&1 || true
cp "$work"/*.deb "$work"/*.dsc "$work"/*.tar.* "$changes" "$OUT"/
if grep -q '^E: ' "$OUT/lintian.txt"; then
    grep '^E: ' "$OUT/lintian.txt" >&2
    die "lintian reports errors (all of it: $OUT/lintian.txt)"
fi
say "lintian: $(grep -c '^W: ' "$OUT/lintian.txt" || true) warning(s), no errors"
echo "$OUT/$deb"
