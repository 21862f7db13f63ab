#!/usr/bin/env bash
# Build the pipeline-stage image here, with no container registry (../shared/CONTAINERS.md):
# podman + runc, a Debian 12 base made with debootstrap, and a wheelhouse filled from PyPI through
# pip's own cache, so the build itself needs no network.
#
#   scripts/build-image.sh [TAG]          (default TAG: localhost/pipeline-stage:<version>)
#   VARIANT=torch scripts/build-image.sh  (the PyTorch variant, extra [torch]: localhost/pipeline-stage:<version>-torch)
#   BASE_IMAGE=python:3.11-slim-bookworm scripts/build-image.sh   (where a registry is reachable)
#   NO_CACHE=1 scripts/build-image.sh    (rebuild every layer, e.g. to time a clean build)
#
# Prints the image size and the build time. Needs root (apt-get, debootstrap).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
VARIANT=${VARIANT:-}
EXTRAS="kfp,s3,gcs${VARIANT:+,$VARIANT}"
TAG=${1:-localhost/pipeline-stage:$VERSION${VARIANT:+-$VARIANT}}
LOCAL_BASE=localhost/debian-base:bookworm-slim
BASE_IMAGE=${BASE_IMAGE:-$LOCAL_BASE}

need=()
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || need+=("$tool"); done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah debootstrap runc >/dev/null
fi

# crun fails here ("cgroups in hybrid mode not supported"); limits above these are refused.
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/scripts/containers.conf}

if [ "$BASE_IMAGE" = "$LOCAL_BASE" ] && ! podman image exists "$LOCAL_BASE"; then
  rootfs=$(mktemp -d)
  mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  debootstrap --variant=minbase bookworm "$rootfs" ${mirror:-http://deb.debian.org/debian} >/dev/null
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    cp /etc/apt/sources.list.d/debian.sources "$rootfs/etc/apt/sources.list.d/" && rm -f "$rootfs/etc/apt/sources.list"
  fi
  # HTTPS from inside the build may go through a TLS-intercepting proxy: give the base the host's CAs.
  mkdir -p "$rootfs/usr/local/share/ca-certificates" "$rootfs/etc/ssl/certs"
  cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/" 2>/dev/null || true
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  # As Debian's slim images do: no manuals, docs (copyright notices kept) or translations, now or
  # from the apt installs of later layers (about 50 MB).
  find "$rootfs/usr/share/doc" -type f ! -name copyright -delete
  rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*
  printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' 'path-exclude /usr/share/man/*' \
    'path-exclude /usr/share/info/*' 'path-exclude /usr/share/locale/*' > "$rootfs/etc/dpkg/dpkg.cfg.d/slim"
  tar -C "$rootfs" -c . | podman import - "$LOCAL_BASE" >/dev/null
  rm -rf "$rootfs"
fi

# The wheelhouse: what pipeline-stage[EXTRAS] resolves to under the constraints (the same
# resolution the Dockerfile makes, so the default image's build context carries no PyTorch), the
# full tensorflow wheel that resolution reads, the build backend, and pip itself.
py=${PYTHON:-python3.11}
[ -x .venv/bin/python ] && py=.venv/bin/python
log=$(mktemp)
resolved=$(mktemp)
requirements=$(mktemp)
# `pip wheel`, not `pip download`: kfp and kfp-server-api are published as sdists only.
# The image installs tensorflow-cpu in place of tensorflow (same version; Dockerfile).
tf_version=$(sed -n 's/^tensorflow==//p' constraints.txt)
if ! { "$py" -m pip install -q --dry-run --ignore-installed --report "$resolved" -c constraints.txt ".[$EXTRAS]" \
       && "$py" scripts/image_requirements.py "$resolved" > "$requirements" \
       && "$py" -m pip wheel -q --no-deps -w wheels -r "$requirements" \
       && "$py" -m pip download -q --no-deps --only-binary=:all: -d wheels "tensorflow==$tf_version" \
       && "$py" -m pip download -q --only-binary=:all: -d wheels "setuptools>=77" wheel pip; } >"$log" 2>&1; then
  grep -v "^WARNING: Location" "$log" >&2
  exit 1
fi

start=$(date +%s)
podman build -q ${NO_CACHE:+--no-cache} --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg EXTRAS="$EXTRAS" \
  --build-arg PIP_EXTRA="--no-index --find-links /wheels" -t "$TAG" . >/dev/null
end=$(date +%s)
size=$(podman image inspect "$TAG" --format '{{.Size}}')
echo "built $TAG in $((end - start)) s; size $((size / 1000000)) MB"
