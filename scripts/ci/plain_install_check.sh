#!/usr/bin/env bash
# Plain-install check: what `pip install mixbuild` gives a user, with no extras.
# A fresh temporary venv gets the pinned CPU torch wheel ($TORCH; an unpinned torch pulls a
# multi-GB CUDA build), then `pip install` of the source tree (tracked and untracked-not-ignored
# files only, copied out so no build/ or egg-info lands in the work tree), then `mixbuild demo`
# must succeed and write its reports. The venv and the demo output are removed on exit.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH="${TORCH:-torch==2.13.0}"

work="$(mktemp -d "${TMPDIR:-/tmp}/mixbuild-plain-install.XXXXXX")"
trap 'rm -rf "$work"' EXIT
start=$SECONDS

echo "plain-install check in $work"
"$PYTHON" -m venv "$work/venv"
pip=("$work/venv/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip
"${pip[@]}" install -q "$TORCH"

mkdir "$work/src"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # tracked + untracked files that git does not ignore, skipping ones deleted in the work tree
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
        | tar --null -T - -cf -) | tar -xf - -C "$work/src"
else
    (cd "$ROOT" && tar --exclude=./.venv --exclude=./build --exclude='*.egg-info' -cf - .) \
        | tar -xf - -C "$work/src"
fi
"${pip[@]}" install -q "$work/src"
"${pip[@]}" check

# Run outside the source tree so only the installed package can be imported.
cd "$work"
"$work/venv/bin/mixbuild" demo -o "$work/demo-out"
for f in validation/report.md validation/report.png; do
    [ -s "$work/demo-out/$f" ] || { echo "plain-install check: demo did not write $f" >&2; exit 1; }
done
echo "plain-install check passed in $((SECONDS - start)) s"
