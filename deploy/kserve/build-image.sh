#!/usr/bin/env bash
# make image: build the runtime image (deploy/kserve/Dockerfile) here, with podman. Its last line
# of output is the image's NAME:TAG.
#
# These machines pull no registry images and podman needs a few settings (../shared/NOTES.md,
# "Containers"), so:
# - the base is made from Debian packages with mmdebstrap and imported (podman import), tagged by
#   the hash of what goes into it: a rebuild reuses it;
# - pip installs from a wheelhouse filled on the host by `pip download` (so pip's configuration
#   here, its local torch CPU wheel and its CA, do not have to reach into the build);
# - podman runs with runc and the cgroupfs manager, without default ulimits.
# Unchanged inputs reuse podman's layer cache: the build is then a few seconds.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
IMAGE=${IMAGE:-localhost/mrl-serve:$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)}
SUITE=bookworm
BASE_PACKAGES=python3,python3-venv,openjdk-17-jre-headless,ca-certificates,tini
CACHE=.cache/image
mkdir -p "$CACHE"

export CONTAINERS_CONF="$PWD/$CACHE/containers.conf"
cat > "$CONTAINERS_CONF" <<'EOF'
[containers]
default_ulimits = []
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
EOF

t0=$SECONDS
base_tag=$(printf '%s %s' "$SUITE" "$BASE_PACKAGES" | sha256sum | cut -c1-12)
BASE=localhost/mrl-serve-base:$SUITE-$base_tag
if podman image exists "$BASE"; then
  echo "base: $BASE (reused)" >&2
else
  echo "base: mmdebstrap $SUITE with $BASE_PACKAGES" >&2
  mmdebstrap --quiet --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$CACHE/rootfs.tar"
  podman import --quiet "$CACHE/rootfs.tar" "$BASE" >/dev/null
  rm -f "$CACHE/rootfs.tar"
  echo "base: $BASE ($((SECONDS - t0)) s)" >&2
fi

wheels=$CACHE/wheelhouse
stamp=$(sha256sum setup/runtime.txt | cut -c1-16)
if [[ ! -f $wheels/.stamp || $(cat "$wheels/.stamp") != "$stamp" ]]; then
  rm -rf "$wheels"
  "$PY" -m pip download --quiet --disable-pip-version-check -r setup/runtime.txt -d "$wheels" 2>&1 \
    | { grep -v "^WARNING: Location .* is ignored" || true; } >&2
  echo "$stamp" > "$wheels/.stamp"
  echo "wheelhouse: $(ls "$wheels" | grep -c '\.whl$') wheels ($((SECONDS - t0)) s)" >&2
fi

previous=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
podman build --quiet --network=host -f deploy/kserve/Dockerfile \
  --build-arg BASE="$BASE" --build-arg PIP_SOURCE="--no-index --find-links /wheels" \
  -v "$PWD/$wheels:/wheels:ro" -t "$IMAGE" . >&2
# The image this tag named before, once nothing runs it: rebuilds don't pile up untagged gigabytes.
if [[ -n $previous && $previous != $(podman image inspect --format '{{.Id}}' "$IMAGE") ]]; then
  podman rmi "$previous" >/dev/null 2>&1 || true
fi
echo "image: built in $((SECONDS - t0)) s, $(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MiB", $1 / 2^20}')" >&2
echo "$IMAGE"
