#!/usr/bin/env bash
# Builds and runs Istio's control plane (pilot-discovery, "istiod") as a
# benchmark peer for vmesh, with no Kubernetes: config comes from istio.io
# YAML files in a directory (ServiceEntry, WorkloadEntry, DestinationRule,
# VirtualService, ...), xDS is served as plaintext gRPC on loopback.
#
#   scripts/istiod-peer.sh build
#       Builds pilot-discovery from the Go module istio.io/istio, newest
#       version on the module proxy (or ISTIO_MODULE_VERSION), into
#       ${VMESH_PEER_DIR:-/var/tmp/vmesh-peers}/istio-<version>/pilot-discovery.
#       Skips the build when that exists. Prints the binary's path last.
#       Needs go (>= the module's go directive) and patch.
#       Seen here (2 cores, shared): about 6 min to 10 min, ~2.2 GB max RSS
#       (the link), ~2.8 GB summed over build processes, ~3 GB of scratch.
#
#   scripts/istiod-peer.sh run CONFIG_DIR XDS_PORT [MONITORING_PORT] [-- FLAGS]
#       Runs it in the foreground (exec), watching CONFIG_DIR, plaintext
#       ADS (StreamAggregatedResources and DeltaAggregatedResources) on
#       127.0.0.1:XDS_PORT, /metrics and /debug/* on 127.0.0.1:MONITORING_PORT
#       (else on a random loopback port). FLAGS go to pilot-discovery as is,
#       e.g. -- --log_output_level=default:warn
#
#   scripts/istiod-peer.sh clean
#       Removes the binaries, run dirs and any build scratch.
#
# Readiness: istiod opens the xDS port only once its caches are synced and
# the first push context is built, so "port accepts connections" means
# ready. Its /ready endpoint stays 503 without Kubernetes (the sidecar
# injector and config validation never report ready).
#
# Clients: a sidecar's node id is TYPE~IP~ID~DOMAIN, TYPE one of sidecar,
# router, waypoint, ztunnel (else InvalidArgument), IP a valid address (or
# metadata INSTANCE_IPS), e.g. sidecar~10.0.0.1~bench-0.bench~bench.svc.cluster.local.
# No metadata is required: NAMESPACE (else the DOMAIN's first label),
# ISTIO_VERSION (else a warning, and treated as the newest version),
# CLUSTER_ID (should be Kubernetes, the --clusterID used here), LABELS.
# The gRPC server has reflection, so grpcurl works, e.g.
#   echo '{"node":{"id":"sidecar~10.0.0.1~bench-0.bench~bench.svc.cluster.local",
#     "metadata":{"NAMESPACE":"bench","ISTIO_VERSION":"1.31-dev","CLUSTER_ID":"Kubernetes"}},
#     "typeUrl":"type.googleapis.com/envoy.config.cluster.v3.Cluster"}' |
#   grpcurl -plaintext -max-time 3 -d @ 127.0.0.1:XDS_PORT \
#     envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources
#
# Config changes: CONFIG_DIR is watched with fsnotify (recursively; only
# *.yaml/*.yml are read). The first event starts a fixed 250 ms timer
# (hard-coded in pkg/kube/krt/files), then the whole directory is re-read;
# one invalid file makes that reload fail and the previous config stays.
# Then the push debounce: PILOT_DEBOUNCE_AFTER (100ms) of quiet, at most
# PILOT_DEBOUNCE_MAX (10s). Seen here: WorkloadEntry address edit -> EDS
# push in ~365 ms (~270 ms with PILOT_DEBOUNCE_AFTER=10ms). Write files
# whole (temp file + rename, or a fast single write): empty files are
# skipped, a half-written one fails the reload until the next event.
set -euo pipefail

# ---------------------------------------------------------------- settings --
# Where binaries and run dirs live (outside the repo).
PEER_DIR=${VMESH_PEER_DIR:-/var/tmp/vmesh-peers}
# The Go module to build from; the version is resolved through the module
# proxy unless ISTIO_MODULE_VERSION pins it (checked with
# v0.0.0-20260827124520-eed52ebb66ad, Istio 1.31-dev).
ISTIO_MODULE=istio.io/istio
ISTIO_PKG=istio.io/istio/pilot/cmd/pilot-discovery   # for messages

log() { printf 'istiod-peer: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

free_kb() { df -Pk "$1" 2>/dev/null | awk 'NR==2 {print $4}'; }

# ------------------------------------------------------------------- build --
# Scratch space for the build: the Go module cache (~0.7 GiB, with the
# istio.io/istio source), a patched copy of that source (~0.1 GiB) and the
# build cache (~2.2 GiB). None of it is needed once the binary exists, so it
# goes to RAM (/dev/shm) when that has room, sparing the disk, and is
# deleted after a successful build (a failed one leaves it, for a faster
# retry; `clean` removes it). ISTIOD_PEER_SCRATCH picks another directory
# (then kept); ISTIOD_PEER_KEEP_SCRATCH=1 keeps the default one.
SCRATCH_OWNED=1
go_env() {
  if [[ -n ${ISTIOD_PEER_SCRATCH:-} ]]; then
    SCRATCH=$ISTIOD_PEER_SCRATCH
    SCRATCH_OWNED=0
  elif [[ $(free_kb /dev/shm || echo 0) -gt $((6 * 1024 * 1024)) ]]; then
    SCRATCH=/dev/shm/vmesh-istiod-build
  else
    SCRATCH=$PEER_DIR/build
  fi
  mkdir -p "$SCRATCH/tmp"
  export GOMODCACHE="$SCRATCH/gomod"
  export GOCACHE="$SCRATCH/gocache"
  export GOTMPDIR="$SCRATCH/tmp"
  export GOFLAGS="-modcacherw"   # module cache files deletable with rm -rf
  export GOTOOLCHAIN=local       # the machine's Go, no toolchain download
  export CGO_ENABLED=0           # as Istio's own gobuild.sh does
}

drop_scratch() {
  if [[ $SCRATCH_OWNED == 1 && ${ISTIOD_PEER_KEEP_SCRATCH:-0} != 1 ]]; then
    rm -rf "$SCRATCH"
  fi
}

# Prints the newest istio.io/istio version the module proxy serves. Istio's
# release tags (1.x.y, no "v") are not semver module versions, so the proxy
# only has pseudo-versions of its default branch (`go list -m -versions`
# lists none); "@latest" is the newest of those.
resolve_version() {
  if [[ -n ${ISTIO_MODULE_VERSION:-} ]]; then
    echo "$ISTIO_MODULE_VERSION"
    return
  fi
  (cd / && go list -m -f '{{.Version}}' "$ISTIO_MODULE@latest")
}

# Istio's file-only mode (--configDir, no Kubernetes) crashes at start in
# the versions the module proxy serves (seen in v0.0.0-20260423205519-... and
# v0.0.0-20260827124520-...): the ServiceEntry registry reads Namespace
# objects from the multicluster controller, which only exists with a kube
# client, so NewServer dies with a nil pointer dereference in
# serviceentry.newController (multicluster.(*Controller).ConfigCluster).
# This patch gives it an empty Namespace collection instead; Namespaces only
# feed namespace labels/annotations into ServiceEntry visibility, which file
# config has no way to set anyway. It is applied to a copy of the source.
# The patched lines are upstream code: Apache-2.0, Istio Authors.
NIL_MULTICLUSTER_PATCH='--- a/pilot/pkg/serviceregistry/serviceentry/controller.go
+++ b/pilot/pkg/serviceregistry/serviceentry/controller.go
@@ -221,7 +221,12 @@
 	}
 
 	if !workloadEntryController {
-		s.inputs.Namespaces = multiclusterController.ConfigCluster().Namespaces()
+		if multiclusterController != nil {
+			s.inputs.Namespaces = multiclusterController.ConfigCluster().Namespaces()
+		} else {
+			// No Kubernetes (config from --configDir only): no Namespace objects.
+			s.inputs.Namespaces = krt.NewStaticCollection[*v1.Namespace](nil, nil, s.opts.WithName("inputs/Namespaces")...)
+		}
 		s.inputs.ServiceEntries = store.KrtCollection(gvk.ServiceEntry)
 		s.inputs.ExternalWorkloads = krt.NewStaticCollection[*model.WorkloadInstance](nil, nil, s.opts.WithName("inputs/ExternalWorkloads")...)
 		s.inputs.ExternalWorkloadsByIP = krt.NewIndex(s.inputs.ExternalWorkloads, "ip", func(wi *model.WorkloadInstance) []string {
'

# Applies NIL_MULTICLUSTER_PATCH to the source copy in $1 when that still
# has the bug, and then sets BUILD_STATUS=Modified.
BUILD_STATUS=Clean
patch_source() {
  local src=$1 rel=pilot/pkg/serviceregistry/serviceentry/controller.go
  if ! grep -q '^		s.inputs.Namespaces = multiclusterController.ConfigCluster().Namespaces()$' "$src/$rel"; then
    log "serviceentry controller changed upstream: building without the nil-multicluster patch"
    return
  fi
  printf '%s' "$NIL_MULTICLUSTER_PATCH" |
    patch --quiet --no-backup-if-mismatch -d "$src" -p1 >&2 ||
    die "the nil-multicluster patch does not apply to $rel"
  BUILD_STATUS=Modified
}

cmd_build() {
  [[ $# -eq 0 ]] || die "usage: $0 build"
  command -v go >/dev/null || die "go is not installed"
  command -v patch >/dev/null || die "patch is not installed (Debian package patch)"
  go_env
  local version dir bin
  version=$(resolve_version)
  dir="$PEER_DIR/istio-$version"
  bin="$dir/pilot-discovery"
  if [[ -x $bin ]]; then
    log "already built: $bin"
    drop_scratch   # only holds the version lookup now
    echo "$bin"
    return
  fi
  mkdir -p "$dir"
  # The binary is ~120 MB; fail now rather than after a long build.
  [[ $(free_kb "$dir") -gt $((300 * 1024)) ]] || die "less than 300 MB free in $dir"
  [[ $(free_kb "$SCRATCH") -gt $((4 * 1024 * 1024)) ]] ||
    log "warning: less than 4 GiB free in $SCRATCH (module and build caches)"

  # Source of the module. To read it (flags: pilot/cmd/pilot-discovery/app/
  # cmd.go, pilot/pkg/bootstrap/options.go; env: pilot/pkg/features/), keep
  # the scratch dir with ISTIOD_PEER_KEEP_SCRATCH=1.
  local src
  src=$(cd / && go mod download -json "$ISTIO_MODULE@$version" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [[ -d $src ]] || die "could not download $ISTIO_MODULE@$version"

  # Build from a writable copy (the module cache is read-only to the go
  # command: `go build -overlay` may not replace files in it either).
  local work="$SCRATCH/src-$version"
  rm -rf "$work"
  cp -r "$src" "$work"
  chmod -R u+w "$work"
  patch_source "$work"
  local status=$BUILD_STATUS

  # Version stamping, as Istio's Makefile does: VERSION file + "-dev" for a
  # branch build, git revision = the pseudo-version's commit hash; status
  # "Modified" when patched.
  local istio_version rev ldflags
  istio_version="$(tr -d '[:space:]' <"$src/VERSION")-dev"
  rev=${version##*-}
  ldflags="-s -w"
  ldflags+=" -X istio.io/istio/pkg/version.buildVersion=$istio_version"
  ldflags+=" -X istio.io/istio/pkg/version.buildGitRevision=$rev"
  ldflags+=" -X istio.io/istio/pkg/version.buildStatus=$status"
  ldflags+=" -X istio.io/istio/pkg/version.buildTag=$version"
  ldflags+=" -X istio.io/istio/pkg/version.buildHub=local"
  ldflags+=" -X istio.io/istio/pkg/version.buildOS=$(go env GOOS)"
  ldflags+=" -X istio.io/istio/pkg/version.buildArch=$(go env GOARCH)"

  # Built as the main module, so with exactly istio's go.mod/go.sum (it has
  # no replace directives). Tags are Istio's STANDARD_TAGS
  # (Makefile.core.mk). Low priority: this machine is shared with other
  # builds; ISTIOD_PEER_BUILD_JOBS caps parallel compiles (go build -p).
  log "building $ISTIO_PKG@$version ($istio_version, $status) into $dir"
  local start=$SECONDS
  (cd "$work" && nice -n "${ISTIOD_PEER_NICE:-10}" \
    go build -trimpath -tags vtprotobuf,disable_pgv \
    ${ISTIOD_PEER_BUILD_JOBS:+-p "$ISTIOD_PEER_BUILD_JOBS"} \
    -ldflags "$ldflags" -o "$work/pilot-discovery" ./pilot/cmd/pilot-discovery) >&2
  local seconds=$((SECONDS - start))

  # Copy under a temporary name and rename, so that a full disk never
  # leaves a truncated binary that the next `build` would take as done.
  if ! cp "$work/pilot-discovery" "$dir/.pilot-discovery.tmp"; then
    rm -f "$dir/.pilot-discovery.tmp"
    die "could not copy the binary into $dir"
  fi
  mv "$dir/.pilot-discovery.tmp" "$bin"
  {
    echo "module: $ISTIO_MODULE@$version"
    echo "istio version: $istio_version ($status)"
    if [[ $status == Modified ]]; then
      echo "patch: nil-multicluster (scripts/istiod-peer.sh)"
    fi
    echo "go: $(go env GOVERSION)"
    echo "build seconds: $seconds"
  } >"$dir/BUILD_INFO"
  log "built in ${seconds}s"

  drop_scratch
  echo "$bin"
}

# --------------------------------------------------------------------- run --
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
    ls -t "$PEER_DIR"/istio-*/pilot-discovery 2>/dev/null | head -n 1 || true
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
  if [[ ${1:-} == -- ]]; then
    shift   # the rest goes to pilot-discovery as is
  fi
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
    # would make it want a kube-apiserver). ISTIOD_PEER_MESH_CONFIG names
    # another file instead.
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
  #                     "starting HTTP service at ..."); ISTIOD_PEER_HTTP_ADDR
  #   --monitoringAddr  /metrics and /debug/*: MONITORING_PORT, or shared
  #                     with --httpAddr when not given
  #   --ctrlz_*         ControlZ introspection UI, cannot be turned off:
  #                     loopback, any free port
  local http_addr=${ISTIOD_PEER_HTTP_ADDR:-127.0.0.1:0}
  local mon_addr=
  if [[ -n $mon_port ]]; then
    mon_addr=127.0.0.1:$mon_port
  fi

  # No Kubernetes:
  #   --registries=     (empty) no Kubernetes service registry; the
  #                     ServiceEntry registry is always there
  #   --configDir       config from YAML files, watched with fsnotify
  #   KUBECONFIG, KUBERNETES_SERVICE_*  unset, so nothing finds a cluster
  #   ENABLE_CA_SERVER=false   no built-in CA (it would want k8s secrets)
  #   PILOT_CERT_PROVIDER=none no istiod serving certificate either (logs
  #                     "PILOT_CERT_PROVIDER=none is not implemented": fine)
  # Nothing here resolves names or dials out: seen with strace, no connect()
  # at all through start-up, connections and pushes.
  # Tunables pass through from the caller's environment, e.g.
  #   PILOT_DEBOUNCE_AFTER (default 100ms), PILOT_DEBOUNCE_MAX (10s),
  #   PILOT_ENABLE_EDS_DEBOUNCE (true), PILOT_PUSH_THROTTLE and
  #   PILOT_MAX_REQUESTS_PER_SECOND (new xDS streams/s; both default to
  #   15+5*GOMAXPROCS, capped at 100: 25 on 2 cores), GOMAXPROCS.
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

# ------------------------------------------------------------------- clean --
# Removes what `build` and `run` left: binaries, run dirs, build scratch.
cmd_clean() {
  rm -rf "$PEER_DIR"/istio-* "$PEER_DIR"/run-* "$PEER_DIR/build" \
    /dev/shm/vmesh-istiod-build
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
    *) die "usage: $0 build | run CONFIG_DIR XDS_PORT [MONITORING_PORT] [-- FLAGS] | clean" ;;
  esac
}

main "$@"
