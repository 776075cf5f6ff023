#!/bin/sh
# mmdebstrap customize hook of the database guest (see build-db.sh): runs on the host after the
# packages are installed, with the chroot's /proc, /sys and /dev mounted by mmdebstrap.
#   customize.sh ROOT DBDIR
# Installs ftvm-init and the MariaDB settings, initialises the data directory with them (so the
# first boot does not), creates the sysbench database and user, and strips what a VM that runs
# only mariadbd never reads.
set -eu
root=$1
src=$2
say() { echo "guest-db-build: $*" >&2; }

install -m 0755 "$src/ftvm-init" "$root/sbin/ftvm-init"
install -m 0644 "$src/ftvm.cnf" "$root/etc/mysql/mariadb.conf.d/90-ftvm.cnf"
echo ftvm-db >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tftvm-db\n' >"$root/etc/hosts"

# A fresh data directory made with our settings (Debian's postinst may have made one with its
# defaults: other redo log size), then the sysbench database and user, in bootstrap mode (no
# network, no socket).
say "initialising the MariaDB data directory"
rm -rf "$root/var/lib/mysql"
mkdir -p "$root/var/lib/mysql" "$root/run/mysqld"
chroot "$root" chown mysql:mysql /var/lib/mysql /run/mysqld
chroot "$root" mariadb-install-db --user=mysql --datadir=/var/lib/mysql \
  --skip-test-db --skip-name-resolve --auth-root-authentication-method=socket >&2
chroot "$root" mariadbd --user=mysql --bootstrap --log-warnings=0 <"$src/setup.sql" >&2
# The bootstrap server stops cleanly at the end of its input (redo log checkpointed).
rm -rf "$root/run/mysqld"/* "$root/var/log/mysql"/*

say "stripping docs, man pages, locales"
rm -rf "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
  "$root"/usr/share/lintian "$root"/usr/share/linda "$root"/var/cache/man/*
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
# MariaDB's server messages: keep English only.
for d in "$root"/usr/share/mysql "$root"/usr/share/mariadb; do
  [ -d "$d" ] || continue
  for l in "$d"/*/; do
    if [ -f "$l/errmsg.sys" ] && [ "$(basename "$l")" != english ]; then rm -rf "$l"; fi
  done
done
# MariaDB's ~40 command line tools are ~4 MB each (statically linked helpers): keep what the guest
# and a person debugging it use (the dpkg database then lists files that are gone: this root is
# never upgraded, it is rebuilt).
keep=" mariadb mariadb-admin mariadb-dump mariadb-install-db my_print_defaults resolveip mysql mysqladmin mysqldump mysql_install_db "
for pkg in mariadb-client mariadb-client-core mariadb-server mariadb-server-core; do
  chroot "$root" dpkg-query -L "$pkg" 2>/dev/null || true
done | grep '^/usr/bin/' | sort -u | while read -r f; do
  case $keep in *" ${f##*/} "*) continue ;; esac
  rm -f "$root$f"
done
# Not /tmp, /var/lib/apt/lists or /var/cache/apt: mmdebstrap cleans those itself after this
# hook, and its apt configuration lives in the chroot's /tmp until then (without it, its final
# "apt-get update" with no sources runs with the HOST's configuration and empties the host's apt
# lists: seen here).
rm -rf "$root"/var/cache/debconf/*-old "$root"/var/log/*.log "$root"/var/log/apt/*
