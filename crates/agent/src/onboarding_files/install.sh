#!/bin/sh
# install.sh: written by `vmesh workload entry configure` beside the
# onboarding files. Copy the whole directory to the VM and run, as root:
#
#     sudo sh install.sh
#
# It puts the files where Istio's sidecar (and `vmesh agent --root /`)
# reads them, creates the proxy user, installs the vmesh-agent unit and
# (re)starts it. Running it again, say with a fresh token or a new gateway
# address, replaces what the last run installed and nothing else.
#
#   cluster.env         -> /var/lib/istio/envoy/cluster.env          0644
#   mesh.yaml           -> /etc/istio/config/mesh                    0644
#   istio-token         -> /var/lib/istio/tokens/istio-token         0600 istio-proxy
#                          linked from /var/run/secrets/tokens/istio-token
#   root-cert.pem       -> /etc/certs/root-cert.pem                  0644
#   hosts               -> added to /etc/hosts, once per line
#   vmesh-agent.service -> /etc/systemd/system/vmesh-agent.service   0644
#                          linked as istio.service, the guide's name, from
#                          /usr/local/lib/systemd/system/istio.service
#   vmesh (if present)  -> /usr/local/bin/vmesh                      0755
#
# Environment:
#   ROOT=/some/dir   install under this directory instead of / (tests, image
#                    building): the proxy user goes into $ROOT/etc/passwd and
#                    $ROOT/etc/group, and systemd is left alone.
#   VMESH_NO_START=1 install and enable the unit but do not (re)start it.
#   APP_UNIT=app.service
#                    order the application's unit after the sidecar: a
#                    drop-in, /etc/systemd/system/app.service.d/10-vmesh-sidecar.conf,
#                    with Requires= and After= the agent's unit. When the mesh
#                    sets holdApplicationUntilProxyStarts, the agent's unit
#                    counts as started only once the sidecar is ready, so the
#                    application starts after its sidecar, as in Istio's pods.

set -eu

ROOT=${ROOT:-}
ROOT=${ROOT%/}
case $ROOT in
    '' | /*) ;;
    *) printf 'install.sh: error: ROOT must be an absolute path, not %s\n' "$ROOT" >&2; exit 1 ;;
esac
SRC=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)
PROXY_USER=istio-proxy
PROXY_UID=1337
HOSTS_MARK='# added by vmesh install.sh'

# Istio's paths. The token's home is /var/lib/istio/tokens, not Istio's
# /var/run/secrets/tokens: /var/run is a tmpfs on most systems, emptied at
# every boot, and a VM must keep its credentials across a reboot. Istio's
# path becomes a symbolic link to the kept copy, made again at boot by the
# systemd-tmpfiles rule below.
@ISTIO_PATHS@
TMPFILES=/etc/tmpfiles.d/vmesh-agent.conf
BINARY=/usr/local/bin/vmesh

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

for f in cluster.env mesh.yaml istio-token root-cert.pem hosts vmesh-agent.service; do
    [ -f "$SRC/$f" ] || die "$SRC/$f is missing: run the install.sh that vmesh workload entry configure wrote, beside its files"
done

IS_ROOT=false
[ "$(id -u)" -eq 0 ] && IS_ROOT=true
if [ -z "$ROOT" ] && [ "$IS_ROOT" = false ]; then
    die "run as root (sudo sh $0), or set ROOT=DIR to install under DIR"
fi

umask 022

# place SOURCE PATH MODE: copies SOURCE to $ROOT/PATH with MODE, replacing
# the old file in one rename so a reader never sees half a file.
place() {
    dest=$ROOT$2
    mkdir -p -- "$(dirname -- "$dest")"
    rm -f -- "$dest.vmesh-new"
    (umask 077 && cp -- "$1" "$dest.vmesh-new")
    chmod "$3" "$dest.vmesh-new"
    if [ -n "${4:-}" ] && [ "$IS_ROOT" = true ]; then
        chown "$4" "$dest.vmesh-new"
    fi
    mv -f -- "$dest.vmesh-new" "$dest"
}

# The proxy user, Istio's istio-proxy with uid 1337 when that uid is free.
# Envoy runs as this user; traffic capture leaves its traffic alone.
proxy_ids() {
    if [ -z "$ROOT" ]; then
        id -u "$PROXY_USER" >/dev/null 2>&1 || return 1
        printf '%s:%s\n' "$(id -u "$PROXY_USER")" "$(id -g "$PROXY_USER")"
    else
        grep "^$PROXY_USER:" "$ROOT/etc/passwd" 2>/dev/null | head -n 1 | cut -d: -f3,4 | grep .
    fi
}

create_proxy_user() {
    if [ -n "$ROOT" ]; then
        mkdir -p "$ROOT/etc"
        for db in passwd group; do
            [ -f "$ROOT/etc/$db" ] || { : >"$ROOT/etc/$db"; chmod 0644 "$ROOT/etc/$db"; }
        done
        grep -q "^$PROXY_USER:" "$ROOT/etc/group" ||
            printf '%s:x:%s:\n' "$PROXY_USER" "$PROXY_UID" >>"$ROOT/etc/group"
        printf '%s:x:%s:%s:Istio proxy (vmesh):/var/lib/istio:/usr/sbin/nologin\n' \
            "$PROXY_USER" "$PROXY_UID" "$PROXY_UID" >>"$ROOT/etc/passwd"
        return
    fi
    nologin=$(command -v nologin || echo /bin/false)
    uid_free=true
    grep -q "^[^:]*:[^:]*:$PROXY_UID:" /etc/passwd && uid_free=false
    gid_free=true
    grep -q "^[^:]*:[^:]*:$PROXY_UID:" /etc/group && gid_free=false
    if command -v useradd >/dev/null 2>&1; then
        if ! grep -q "^$PROXY_USER:" /etc/group; then
            if [ "$gid_free" = true ]; then
                groupadd --system --gid "$PROXY_UID" "$PROXY_USER"
            else
                groupadd --system "$PROXY_USER"
            fi
        fi
        if [ "$uid_free" = true ]; then
            useradd --system --uid "$PROXY_UID" --gid "$PROXY_USER" --home-dir /var/lib/istio \
                --no-create-home --shell "$nologin" "$PROXY_USER"
        else
            useradd --system --gid "$PROXY_USER" --home-dir /var/lib/istio \
                --no-create-home --shell "$nologin" "$PROXY_USER"
        fi
    elif command -v adduser >/dev/null 2>&1; then
        # BusyBox (Alpine)
        if [ "$gid_free" = true ]; then addgroup -S -g "$PROXY_UID" "$PROXY_USER"; else addgroup -S "$PROXY_USER"; fi
        if [ "$uid_free" = true ]; then
            adduser -S -D -H -u "$PROXY_UID" -G "$PROXY_USER" -h /var/lib/istio -s "$nologin" "$PROXY_USER"
        else
            adduser -S -D -H -G "$PROXY_USER" -h /var/lib/istio -s "$nologin" "$PROXY_USER"
        fi
    else
        die "cannot create the user $PROXY_USER: neither useradd nor adduser is installed"
    fi
    [ "$uid_free" = true ] || say "uid $PROXY_UID is taken: $PROXY_USER got another uid"
}

if ! ids=$(proxy_ids); then
    say "creating the proxy user $PROXY_USER"
    create_proxy_user
    ids=$(proxy_ids) || die "the user $PROXY_USER was not created"
fi
[ "$IS_ROOT" = true ] || say "not root: the token is not given to $PROXY_USER ($ids)"

place "$SRC/cluster.env" "$CLUSTER_ENV" 0644
place "$SRC/mesh.yaml" "$MESH" 0644
place "$SRC/root-cert.pem" "$ROOT_CERT" 0644

# The token: private to the proxy user, in a directory only it can enter.
mkdir -p -- "$ROOT$(dirname -- "$TOKEN")"
chmod 0700 "$ROOT$(dirname -- "$TOKEN")"
[ "$IS_ROOT" = true ] && chown "$ids" "$ROOT$(dirname -- "$TOKEN")"
place "$SRC/istio-token" "$TOKEN" 0600 "$ids"
mkdir -p -- "$ROOT$(dirname -- "$TOKEN_LINK")"
# Under ROOT the link names the file under ROOT, so the tree works in place.
ln -sfn -- "$ROOT$TOKEN" "$ROOT$TOKEN_LINK"

# /etc/hosts: the lines a previous run added go, the current ones come,
# each once; lines the operator wrote stay. Rewritten in place because
# /etc/hosts is often a bind mount (containers) that a rename would break.
hosts_file=$ROOT/etc/hosts
mkdir -p -- "$ROOT/etc"
[ -f "$hosts_file" ] || { : >"$hosts_file"; chmod 0644 "$hosts_file"; }
next=$hosts_file.vmesh-new
grep -v -F -- "$HOSTS_MARK" "$hosts_file" >"$next" || true
while IFS= read -r line || [ -n "$line" ]; do
    case $line in '' | '#'*) continue ;; esac
    grep -q -x -F -- "$line" "$next" || printf '%s %s\n' "$line" "$HOSTS_MARK" >>"$next"
done <"$SRC/hosts"
cmp -s "$next" "$hosts_file" || cat "$next" >"$hosts_file"
rm -f -- "$next"

place "$SRC/vmesh-agent.service" "$UNIT" 0644
# The guide's name for the unit. The link names the unit's path on the VM,
# also under ROOT: systemctl --root and systemd-analyze --root read it there.
mkdir -p -- "$ROOT$(dirname -- "$UNIT_ALIAS")"
ln -sfn -- "$UNIT" "$ROOT$UNIT_ALIAS"
AGENT_UNIT=$(basename -- "$UNIT")
ALIAS_UNIT=$(basename -- "$UNIT_ALIAS")

if [ -n "${APP_UNIT:-}" ]; then
    case $APP_UNIT in *.service) ;; *) APP_UNIT=$APP_UNIT.service ;; esac
    case $APP_UNIT in
        */* | .* | *[!A-Za-z0-9:_.@-]*) die "APP_UNIT=$APP_UNIT is not a unit name" ;;
    esac
    dropin=$ROOT/etc/systemd/system/$APP_UNIT.d/10-vmesh-sidecar.conf
    mkdir -p -- "$(dirname -- "$dropin")"
    printf '%s\n' \
        "# Written by vmesh install.sh (APP_UNIT): $APP_UNIT starts after its sidecar," \
        "# and not without it (after it is ready when the mesh holds applications" \
        "# until the proxy starts)." \
        '[Unit]' \
        "Requires=$AGENT_UNIT" \
        "After=$AGENT_UNIT" >"$dropin.vmesh-new"
    chmod 0644 "$dropin.vmesh-new"
    mv -f -- "$dropin.vmesh-new" "$dropin"
    say "$APP_UNIT is ordered after $AGENT_UNIT ($dropin)"
fi
mkdir -p -- "$ROOT$(dirname -- "$TMPFILES")"
printf '%s\n' \
    '# Istio'\''s token path, on tmpfs, links to the copy kept on disk (vmesh install.sh).' \
    "d /run/secrets/tokens 0755 root root -" \
    "L+ /run/secrets/tokens/istio-token - - - - $TOKEN" >"$ROOT$TMPFILES.vmesh-new"
chmod 0644 "$ROOT$TMPFILES.vmesh-new"
mv -f -- "$ROOT$TMPFILES.vmesh-new" "$ROOT$TMPFILES"

if [ -f "$SRC/vmesh" ] && ! cmp -s "$SRC/vmesh" "$ROOT$BINARY"; then
    place "$SRC/vmesh" "$BINARY" 0755
fi

say "onboarding files installed under ${ROOT:-/}"
if [ -n "$ROOT" ]; then
    say "ROOT is set: systemd left alone; run: vmesh agent --root $ROOT --capture"
elif [ ! -d /run/systemd/system ] || ! command -v systemctl >/dev/null 2>&1; then
    say "systemd is not running: start the agent yourself: $BINARY agent --root / --capture"
else
    systemctl daemon-reload
    systemd-tmpfiles --create "$TMPFILES" >/dev/null 2>&1 || true
    systemctl enable "$AGENT_UNIT"
    if [ "${VMESH_NO_START:-}" = 1 ]; then
        say "VMESH_NO_START=1: start it with: systemctl start $ALIAS_UNIT (or $AGENT_UNIT)"
    elif [ ! -x "$BINARY" ]; then
        say "install the vmesh binary at $BINARY, then: systemctl start $ALIAS_UNIT"
    else
        systemctl restart "$AGENT_UNIT"
        say "$AGENT_UNIT (alias $ALIAS_UNIT) (re)started; follow it with: journalctl -u ${ALIAS_UNIT%.service} -f"
    fi
fi
