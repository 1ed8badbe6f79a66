#!/usr/bin/env bash
# Builds and runs Istio's control plane (pilot-discovery, "istiod") as a
# benchmark peer for vmesh, with no Kubernetes: config comes from istio.io
# YAML files in a directory, xDS is served as plaintext gRPC on loopback.
#
#   scripts/istiod-peer.sh build
#   scripts/istiod-peer.sh run CONFIG_DIR XDS_PORT [MONITORING_PORT]
#   scripts/istiod-peer.sh clean
#
# (filled in below)
set -euo pipefail

# ---------------------------------------------------------------- settings --
# Where binaries and Go caches live (outside the repo).
PEER_DIR=${VMESH_PEER_DIR:-/var/tmp/vmesh-peers}
# The Go module to build from; the version is resolved through the module
# proxy unless ISTIO_MODULE_VERSION pins it.
ISTIO_MODULE=istio.io/istio
ISTIO_PKG=istio.io/istio/pilot/cmd/pilot-discovery

log() { printf 'istiod-peer: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Go environment used for the build: a private module cache under PEER_DIR
# (the source stays there to read), the machine's own toolchain only.
#
# The build cache of a full pilot-discovery build is ~2 GiB and only needed
# while building, so by default it goes to RAM (/dev/shm) when that has room,
# which spares a nearly full disk. ISTIOD_PEER_GOCACHE overrides it (and is
# then left alone); the default one is deleted after a successful build
# unless ISTIOD_PEER_KEEP_GOCACHE=1.
OWN_GOCACHE=1
go_env() {
  export GOMODCACHE="$PEER_DIR/gomod"
  export GOFLAGS="-modcacherw"   # lets `clean` (or rm -rf) delete the cache
  export GOTOOLCHAIN=local
  export CGO_ENABLED=0           # as Istio's own gobuild.sh does
  local shm_free_kb
  if [[ -n ${ISTIOD_PEER_GOCACHE:-} ]]; then
    export GOCACHE="$ISTIOD_PEER_GOCACHE"
    OWN_GOCACHE=0
  elif shm_free_kb=$(df -Pk /dev/shm 2>/dev/null | awk 'NR==2 {print $4}') &&
    [[ ${shm_free_kb:-0} -gt $((4 * 1024 * 1024)) ]]; then
    export GOCACHE=/dev/shm/vmesh-istiod-gocache
    export GOTMPDIR=/dev/shm   # the compiler's scratch files too
  else
    export GOCACHE="$PEER_DIR/gocache"
  fi
}

# Prints the newest istio.io/istio version the module proxy serves. Istio's
# release tags (1.x.y, no "v") are not semver module versions, so the proxy
# only serves pseudo-versions of the default branch; "@latest" is the newest.
resolve_version() {
  if [[ -n ${ISTIO_MODULE_VERSION:-} ]]; then
    echo "$ISTIO_MODULE_VERSION"
    return
  fi
  (cd / && go list -m -f '{{.Version}}' "$ISTIO_MODULE@latest")
}

cmd_build() {
  command -v go >/dev/null || die "go is not installed"
  go_env
  local version dir bin
  version=$(resolve_version)
  dir="$PEER_DIR/istio-$version"
  bin="$dir/pilot-discovery"
  if [[ -x $bin ]]; then
    log "already built: $bin"
    echo "$bin"
    return
  fi
  mkdir -p "$dir"

  # Source of the module (also handy to read: flags are in
  # pilot/cmd/pilot-discovery/app/cmd.go, pilot/pkg/bootstrap/options.go).
  local src
  src=$(cd / && go mod download -json "$ISTIO_MODULE@$version" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [[ -d $src ]] || die "could not download $ISTIO_MODULE@$version"

  # Version stamping, as Istio's Makefile does: VERSION file + "-dev" for a
  # branch build, git revision = the pseudo-version's commit hash.
  local istio_version rev ldflags
  istio_version="$(tr -d '[:space:]' <"$src/VERSION")-dev"
  rev=${version##*-}
  ldflags="-s -w"
  ldflags+=" -X istio.io/istio/pkg/version.buildVersion=$istio_version"
  ldflags+=" -X istio.io/istio/pkg/version.buildGitRevision=$rev"
  ldflags+=" -X istio.io/istio/pkg/version.buildStatus=Clean"
  ldflags+=" -X istio.io/istio/pkg/version.buildTag=$version"
  ldflags+=" -X istio.io/istio/pkg/version.buildHub=local"
  ldflags+=" -X istio.io/istio/pkg/version.buildOS=$(go env GOOS)"
  ldflags+=" -X istio.io/istio/pkg/version.buildArch=$(go env GOARCH)"

  # istio.io/istio's go.mod has no replace/exclude directives, so
  # `go install pkg@version` builds it with exactly its own go.mod/go.sum.
  # Tags are Istio's STANDARD_TAGS (Makefile.core.mk). Runs at low priority:
  # this machine is shared with other builds.
  log "building $ISTIO_PKG@$version ($istio_version) into $dir"
  local start=$SECONDS
  (cd / && GOBIN="$dir" nice -n "${ISTIOD_PEER_NICE:-10}" \
    go install -trimpath -tags vtprotobuf,disable_pgv \
    ${ISTIOD_PEER_BUILD_JOBS:+-p "$ISTIOD_PEER_BUILD_JOBS"} \
    -ldflags "$ldflags" "$ISTIO_PKG@$version") >&2
  log "built in $((SECONDS - start))s"

  if [[ $OWN_GOCACHE == 1 && ${ISTIOD_PEER_KEEP_GOCACHE:-0} != 1 ]]; then
    rm -rf "$GOCACHE"
  fi
  echo "$bin"
}

main() {
  local sub=${1:-}
  [[ $# -gt 0 ]] && shift
  case $sub in
    build) cmd_build "$@" ;;
    *) die "usage: $0 build | run CONFIG_DIR XDS_PORT [MONITORING_PORT] | clean" ;;
  esac
}

main "$@"
