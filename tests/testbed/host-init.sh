#!/bin/sh
# Becomes PID 1 of one testbed host: runs inside a fresh mount + PID namespace
# (unshare) and the host's network namespace (nsenter), pivots into an overlay
# of the shared rootfs, then idles as an init that reaps orphans.
# Usage: host-init.sh HOST_DIR RUN_DIR ROOTFS
set -eu
H=$1 RUN=$2 ROOTFS=$3
R=$H/root

# Nothing mounted here may leak back to the root mount namespace.
mount --make-rprivate /
mount -t overlay overlay -o "lowerdir=$ROOTFS,upperdir=$H/upper,workdir=$H/work" "$R"

# Per-host state lives on the real filesystem (overlay2 cannot sit on overlayfs)
# and stays reachable from the root mount namespace at the bind sources.
mount --bind "$H/docker" "$R/var/lib/docker"
mount --bind "$H/containerd" "$R/var/lib/containerd"
mount --bind "$H/etc-docker" "$R/etc/docker"
mount --bind "$H/tmp" "$R/tmp"
mount --bind "$H/state" "$R/var/lib/ferry"
mount --bind "$H/log" "$R/var/log"
mount --bind "$RUN/run" "$R/run"

mount -t proc proc "$R/proc"
# `ip netns exec` would remount /sys without cgroups and dockerd then dies with
# "Devices cgroup isn't mounted": mount a sysfs of this netns and rbind cgroups.
mount -t sysfs sysfs "$R/sys"
mount --rbind /sys/fs/cgroup "$R/sys/fs/cgroup"
mount --rbind /dev "$R/dev"

# A chroot is not enough: CRIU walks the mount tree and needs a real root.
mkdir -p "$R/.oldroot"
cd "$R"
pivot_root . .oldroot
cd /
umount -l /.oldroot
rmdir /.oldroot 2>/dev/null || true

# Give PID 1 stdio from inside this mount namespace: CRIU refuses to dump
# processes holding files from a mount namespace it cannot see.
exec </dev/null >/var/log/testbed-init.log 2>&1
echo ready >/run/testbed-init.ready
exec /usr/bin/tini -s -- /bin/sleep infinity
