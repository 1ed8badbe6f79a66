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

# Finds the pilot-discovery binary for `run`, without asking the network:
# ISTIOD_PEER_BIN if set, else the pinned ISTIO_MODULE_VERSION's build, else
# the most recently built one under PEER_DIR.
find_binary() {
  if [[ -n ${ISTIOD_PEER_BIN:-} ]]; then
    echo "$ISTIOD_PEER_BIN"
  elif [[ -n ${ISTIO_MODULE_VERSION:-} ]]; then
    echo "$PEER_DIR/istio-$ISTIO_MODULE_VERSION/pilot-discovery"
  else
    # shellcheck disable=SC2012  # names are ours, no odd characters
    ls -t "$PEER_DIR"/istio-*/pilot-discovery 2>/dev/null | head -n 1
  fi
}

is_port() { [[ $1 =~ ^[0-9]+$ ]] && ((1 <= $1 && $1 <= 65535)); }

cmd_run() {
  [[ $# -ge 2 ]] || die "usage: $0 run CONFIG_DIR XDS_PORT [MONITORING_PORT] [-- PILOT_DISCOVERY_FLAGS...]"
  local config_dir=$1 xds_port=$2 mon_port=
  shift 2
  if [[ $# -gt 0 && $1 != -- ]]; then
    mon_port=$1
    shift
  fi
  [[ ${1:-} == -- ]] && shift   # the rest goes to pilot-discovery as is
  [[ -d $config_dir ]] || die "no such config dir: $config_dir"
  config_dir=$(cd "$config_dir" && pwd)
  is_port "$xds_port" || die "bad XDS_PORT: $xds_port"
  [[ -z $mon_port ]] || is_port "$mon_port" || die "bad MONITORING_PORT: $mon_port"

  local bin
  bin=$(find_binary)
  [[ -n $bin && -x $bin ]] || die "pilot-discovery not built (${bin:-none found}): run '$0 build' first"

  # Per-port run dir: the mesh config files, and the working directory, so
  # that the relative default paths pilot-discovery probes (./etc/cacerts,
  # ./etc/istio/config/mesh, ./var/lib/istio/inject) find nothing of ours.
  local run_dir="$PEER_DIR/run-$xds_port"
  mkdir -p "$run_dir"
  local mesh_file=${ISTIOD_PEER_MESH_CONFIG:-$run_dir/mesh.yaml}
  if [[ -z ${ISTIOD_PEER_MESH_CONFIG:-} ]]; then
    # MeshConfig: Istio's defaults except what is set here. No configSources,
    # so config comes from --configDir only (a configSource of "k8s://"
    # would make it want a kube-apiserver).
    cat >"$mesh_file" <<YAML
# Written by scripts/istiod-peer.sh; every other field is Istio's default.
rootNamespace: istio-system
trustDomain: cluster.local
defaultConfig:
  discoveryAddress: 127.0.0.1:$xds_port
YAML
  fi
  printf 'networks: {}\n' >"$run_dir/meshNetworks.yaml"

  # Listeners, all on loopback:
  #   --grpcAddr        plaintext xDS (ADS, SotW and delta) + gRPC reflection
  #   --secureGRPCAddr  empty: the TLS xDS port (15012) is off
  #   --httpsAddr       empty: no webhook server (it only exists with k8s)
  #   --httpAddr        /ready and debug; port 0 = any free port (logged as
  #                     "starting HTTP service at ...")
  #   --monitoringAddr  /metrics and /debug/*: MONITORING_PORT, or shared
  #                     with --httpAddr when not given
  #   --ctrlz_*         ControlZ introspection UI, cannot be turned off:
  #                     loopback, any free port
  local http_addr=${ISTIOD_PEER_HTTP_ADDR:-127.0.0.1:0}
  local mon_addr=
  [[ -n $mon_port ]] && mon_addr=127.0.0.1:$mon_port

  # No Kubernetes:
  #   --registries=     (empty) no Kubernetes service registry; the
  #                     ServiceEntry registry is always there
  #   --configDir       config from YAML files, watched with fsnotify
  #   KUBECONFIG, KUBERNETES_SERVICE_*  unset, so nothing finds a cluster
  #   ENABLE_CA_SERVER=false   no built-in CA (it would want k8s secrets)
  #   PILOT_CERT_PROVIDER=none no istiod serving certificate either
  # Tunables pass through from the caller's environment, e.g.
  #   PILOT_DEBOUNCE_AFTER (default 100ms), PILOT_DEBOUNCE_MAX (10s),
  #   PILOT_ENABLE_EDS_DEBOUNCE (true), PILOT_PUSH_THROTTLE and
  #   PILOT_MAX_REQUESTS_PER_SECOND (both 15+5*GOMAXPROCS, max 100),
  #   GOMAXPROCS.
  log "starting $bin: config $config_dir, xDS 127.0.0.1:$xds_port${mon_addr:+, monitoring $mon_addr}"
  cd "$run_dir"
  exec env -u KUBECONFIG -u KUBERNETES_SERVICE_HOST -u KUBERNETES_SERVICE_PORT \
    ENABLE_CA_SERVER=false \
    PILOT_CERT_PROVIDER=none \
    POD_NAMESPACE="${POD_NAMESPACE:-istio-system}" \
    "$bin" discovery \
    --registries= \
    --configDir="$config_dir" \
    --meshConfig="$mesh_file" \
    --networksConfig="$run_dir/meshNetworks.yaml" \
    --clusterID="${CLUSTER_ID:-Kubernetes}" \
    --domain=cluster.local \
    --grpcAddr="127.0.0.1:$xds_port" \
    --secureGRPCAddr= \
    --httpsAddr= \
    --httpAddr="$http_addr" \
    --monitoringAddr="$mon_addr" \
    --ctrlz_address=127.0.0.1 \
    --ctrlz_port=0 \
    "$@"
}

# Removes what `build` left: binaries, the module cache, build caches.
cmd_clean() {
  rm -rf "$PEER_DIR"/istio-* "$PEER_DIR"/run-* "$PEER_DIR/gocache" \
    /dev/shm/vmesh-istiod-gocache
  if [[ -d $PEER_DIR/gomod ]]; then
    chmod -R u+w "$PEER_DIR/gomod"
    rm -rf "$PEER_DIR/gomod"
  fi
  rmdir "$PEER_DIR" 2>/dev/null || true
  log "removed $PEER_DIR"
}

main() {
  local sub=${1:-}
  [[ $# -gt 0 ]] && shift
  case $sub in
    build) cmd_build "$@" ;;
    run) cmd_run "$@" ;;
    clean) cmd_clean "$@" ;;
    *) die "usage: $0 build | run CONFIG_DIR XDS_PORT [MONITORING_PORT] | clean" ;;
  esac
}

main "$@"
