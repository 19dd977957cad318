#!/usr/bin/env bash
# Install Ferry system-wide (used by `make install`):
#   - a virtualenv in /opt/ferry with ferry and its dependencies,
#   - /usr/local/bin/ferry -> /opt/ferry/bin/ferry,
#   - the systemd unit in /etc/systemd/system/ferry.service,
#   - /etc/ferry/config.yaml from config.example.yaml and the maintenance policy,
#     only when absent (an existing configuration is never overwritten),
# then `systemctl daemon-reload`. It does not enable or start the service:
# certificates have to be in place first (see the message at the end).
#
# Overridable for packaging: PY (python to build the venv with), PREFIX,
# BINDIR, UNITDIR, CONFDIR, and DESTDIR (staging root; skips systemctl).
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

if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "install.sh: $PY is missing or older than Python 3.11; set PY=/path/to/python3.11" >&2
    exit 1
fi

echo "ferry: installing into ${DESTDIR}${PREFIX}"
"$PY" -m venv "${DESTDIR}${PREFIX}"
"${DESTDIR}${PREFIX}/bin/pip" install --quiet --upgrade pip
# A regular (not editable) install: the service must not depend on this checkout.
"${DESTDIR}${PREFIX}/bin/pip" install --quiet "$SRC"
install -m 0644 "$SRC/README.md" "${DESTDIR}${PREFIX}/README.md"

install -d -m 0755 "${DESTDIR}${BINDIR}"
ln -sfn "${PREFIX}/bin/ferry" "${DESTDIR}${BINDIR}/ferry"

install -d -m 0755 "${DESTDIR}${UNITDIR}"
install -m 0644 "$SRC/systemd/ferry.service" "${DESTDIR}${UNITDIR}/ferry.service"

install -d -m 0755 "${DESTDIR}${CONFDIR}" "${DESTDIR}${CONFDIR}/policies"
if [ ! -e "${DESTDIR}${CONFDIR}/config.yaml" ]; then
    install -m 0644 "$SRC/config.example.yaml" "${DESTDIR}${CONFDIR}/config.yaml"
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
