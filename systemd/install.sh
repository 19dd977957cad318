#!/usr/bin/env bash
# Install Ferry system-wide (used by `make install`):
#   - a virtualenv in /opt/ferry with ferry and its dependencies,
#   - /usr/local/bin/ferry -> /opt/ferry/bin/ferry,
#   - the systemd unit in /etc/systemd/system/ferry.service,
#   - /etc/ferry/config.yaml from config.example.yaml (runc and CRIU run through
#     systemd-run, outside the unit's sandbox) and the maintenance policy,
#     only when absent (an existing configuration is never overwritten),
# then `systemctl daemon-reload`. It does not enable or start the service:
# certificates have to be in place first (see the message at the end).
#
# Overridable for packaging: PY (python to build the venv with), PREFIX,
# BINDIR, UNITDIR, CONFDIR, and DESTDIR (staging root; skips systemctl).
#
# DEPS says where Ferry's Python dependencies come from:
#   index  (default) pip installs them from the package index pip is configured for;
#   system the distribution's packages (SYSTEM_DEPS_HINT below, installed first):
#          the venv sees the system site-packages and pip runs with --no-index, so
#          nothing is downloaded. For hosts without access to a package index.
set -euo pipefail

if [ "$(id -u)" -ne 0 ] && [ -z "${DESTDIR:-}" ]; then
    echo "install.sh: must run as root to write /opt, /etc and /usr/local/bin (try: sudo make install)" >&2
    exit 1
fi

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PY:-python3}
DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/opt/ferry}
BINDIR=${BINDIR:-/usr/local/bin}
UNITDIR=${UNITDIR:-/etc/systemd/system}
CONFDIR=${CONFDIR:-/etc/ferry}
DEPS=${DEPS:-index}
SYSTEM_DEPS_HINT="apt-get install python3-venv python3-setuptools python3-docker \
python3-watchdog python3-pydantic python3-structlog python3-yaml python3-click python3-rich \
python3-aiohttp python3-cryptography python3-prometheus-client python3-zstandard \
python3-etcd3gw python3-blake3 (Debian forky has them all; on trixie, -t forky)"

case "$DEPS" in
    index | system) ;;
    *)
        echo "install.sh: DEPS=$DEPS is not known; use DEPS=index (pip from the package index) or DEPS=system (distribution packages, offline)" >&2
        exit 1
        ;;
esac

if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "install.sh: $PY is missing or older than Python 3.11; set PY=/path/to/python3.11" >&2
    exit 1
fi

echo "ferry: installing into ${DESTDIR}${PREFIX} (dependencies: DEPS=$DEPS)"
# A regular (not editable) install: the service must not depend on this checkout.
if [ "$DEPS" = system ]; then
    "$PY" -m venv --system-site-packages "${DESTDIR}${PREFIX}"
    # --no-build-isolation: the build backend (setuptools) comes from the system
    # too, so pip has nothing to fetch.
    if ! "${DESTDIR}${PREFIX}/bin/pip" install --quiet --no-index --no-build-isolation "$SRC"; then
        echo "install.sh: DEPS=system: a dependency is missing or too old; install them first: $SYSTEM_DEPS_HINT" >&2
        exit 1
    fi
else
    "$PY" -m venv "${DESTDIR}${PREFIX}"
    "${DESTDIR}${PREFIX}/bin/pip" install --quiet --upgrade pip
    "${DESTDIR}${PREFIX}/bin/pip" install --quiet "$SRC"
fi
install -m 0644 "$SRC/README.md" "${DESTDIR}${PREFIX}/README.md"

install -d -m 0755 "${DESTDIR}${BINDIR}"
ln -sfn "${PREFIX}/bin/ferry" "${DESTDIR}${BINDIR}/ferry"

install -d -m 0755 "${DESTDIR}${UNITDIR}"
install -m 0644 "$SRC/systemd/ferry.service" "${DESTDIR}${UNITDIR}/ferry.service"

install -d -m 0755 "${DESTDIR}${CONFDIR}" "${DESTDIR}${CONFDIR}/policies"
# Under the unit's sandbox the agent cannot dump a container itself (CRIU needs
# ptrace, every namespace and most capabilities), so runc and CRIU's lazy-pages
# daemon run through systemd-run: a transient service of systemd's, unsandboxed,
# in dockerd's namespaces (so the agent must not nsenter there itself: it could
# not). RuntimeMaxSec bounds one that outlives its caller.
RUN_OUTSIDE="systemd-run, --quiet, --wait, --pipe, --collect, --service-type=exec, --property=RuntimeMaxSec=10min"
if [ ! -e "${DESTDIR}${CONFDIR}/config.yaml" ]; then
    sed -e "s|^  runc_command: \[runc,|  runc_command: [${RUN_OUTSIDE}, runc,|" \
        -e "s|^  criu_command: \[criu\]|  criu_command: [${RUN_OUTSIDE}, criu]|" \
        -e "s|^  runc_in_daemon_namespaces: true|  runc_in_daemon_namespaces: false|" \
        "$SRC/config.example.yaml" >"${DESTDIR}${CONFDIR}/config.yaml"
    chmod 0644 "${DESTDIR}${CONFDIR}/config.yaml"
    if ! grep -q "runc_command: \[systemd-run" "${DESTDIR}${CONFDIR}/config.yaml" ||
        ! grep -q "runc_in_daemon_namespaces: false" "${DESTDIR}${CONFDIR}/config.yaml"; then
        echo "install.sh: could not set docker.runc_command in ${CONFDIR}/config.yaml; set it to [${RUN_OUTSIDE}, runc, --root, /run/docker/runtime-runc/moby]" >&2
        exit 1
    fi
    echo "ferry: wrote ${CONFDIR}/config.yaml from config.example.yaml; edit name and peers"
else
    echo "ferry: kept existing ${CONFDIR}/config.yaml"
fi
# Only the maintenance policy is installed by default: it acts on an explicit
# operator request (`ferry drain`). Load-based policies are opt-in; examples are
# in ${PREFIX}/policies.
install -d -m 0755 "${DESTDIR}${PREFIX}/policies"
install -m 0644 "$SRC"/policies/*.yaml "${DESTDIR}${PREFIX}/policies/"
if [ ! -e "${DESTDIR}${CONFDIR}/policies/maintenance.yaml" ]; then
    install -m 0644 "$SRC/policies/maintenance.yaml" "${DESTDIR}${CONFDIR}/policies/"
fi

if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
else
    echo "ferry: systemd is not running here (or DESTDIR is set); skipped daemon-reload"
fi

cat <<MSG
ferry: installed. Next:
  1. edit ${CONFDIR}/config.yaml (name, peers)
  2. put this host's TLS files in place (see \`ferry certs --help\`)
  3. systemctl enable --now ferry && ferry status
MSG
