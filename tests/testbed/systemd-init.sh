#!/bin/bash
# Becomes PID 1 of one systemd testbed host: runs inside fresh mount, PID, UTS,
# IPC and cgroup namespaces (unshare) and the host's network namespace
# (nsenter), builds the mounts systemd expects of a container, pivots into an
# overlay of the systemd rootfs and execs systemd. See SYSTEMD-NOTES.md.
# Usage: systemd-init.sh HOST_DIR ROOTFS HOSTNAME CONSOLE_FD CONSOLE_MASTER_FD CGROUPS_V1...
set -eu  # bash, not sh: the console fds may be above 9, which dash cannot name
H=$1 ROOTFS=$2 NAME=$3 CONSOLE=$4 MASTER=$5
shift 5
R=$H/root

# Nothing mounted here may leak back to the root mount namespace.
mount --make-rprivate /
mount -t overlay overlay -o "lowerdir=$ROOTFS,upperdir=$H/upper,workdir=$H/work" "$R"
# Docker's and containerd's state on the real disk (overlay2 cannot sit on
# overlayfs), and Ferry's state dir where tests can read it from outside.
mount --bind "$H/docker" "$R/var/lib/docker"
mount --bind "$H/containerd" "$R/var/lib/containerd"
mount --bind "$H/state" "$R/var/lib/ferry"

mount -t proc proc "$R/proc"
# Read-only sysfs keeps systemd and udev off the machine's devices; Docker and
# CRIU only read it.
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
# Hybrid cgroups: one v1 mount per controller plus name=systemd, and cgroup2 at
# unified. Inside this cgroup namespace each is rooted at this host's cgroup.
mount -t tmpfs -o mode=755,nosuid,nodev,noexec tmpfs "$R/sys/fs/cgroup"
for c in "$@"; do
    mkdir "$R/sys/fs/cgroup/$c"
    mount -t cgroup -o "nosuid,nodev,noexec,$c" cgroup "$R/sys/fs/cgroup/$c"
done
mkdir "$R/sys/fs/cgroup/systemd" "$R/sys/fs/cgroup/unified"
mount -t cgroup -o nosuid,nodev,noexec,none,name=systemd cgroup "$R/sys/fs/cgroup/systemd"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup/unified"

# A /dev of its own: a few bound device nodes, a private devpts, shm, mqueue.
mount -t tmpfs -o mode=755,nosuid tmpfs "$R/dev"
for d in null zero full random urandom tty net/tun fuse; do
    [ -e "/dev/$d" ] || continue
    mkdir -p "$(dirname "$R/dev/$d")"
    touch "$R/dev/$d"
    mount --bind "/dev/$d" "$R/dev/$d"
done
mkdir "$R/dev/pts" "$R/dev/shm" "$R/dev/mqueue"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620,gid=5 devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/dev/shm"
mount -t mqueue -o nosuid,nodev,noexec mqueue "$R/dev/mqueue"
ln -s /proc/self/fd "$R/dev/fd"
ln -s /proc/self/fd/0 "$R/dev/stdin"
ln -s /proc/self/fd/1 "$R/dev/stdout"
ln -s /proc/self/fd/2 "$R/dev/stderr"
# systemd writes to /dev/console: a pty whose other end is read into console.log.
touch "$R/dev/console"
mount --bind "/proc/self/fd/$CONSOLE" "$R/dev/console"

mount -t tmpfs -o mode=755,nosuid,nodev tmpfs "$R/run"
hostname "$NAME"
ip link set lo up

# A chroot is not enough: CRIU walks the mount tree and needs a real root.
mkdir -p "$R/.oldroot"
cd "$R"
pivot_root . .oldroot
cd /
umount -l /.oldroot
rmdir /.oldroot 2>/dev/null || true

# The reader outlives nothing: it ends with the host (EIO once the pty closes).
cat <&"$MASTER" >/var/log/console.log 2>&1 &
eval "exec $CONSOLE>&- $MASTER<&-"
exec env -i container=ferry-testbed /lib/systemd/systemd </dev/console >/dev/console 2>&1
