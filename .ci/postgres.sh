#!/usr/bin/env bash
# Debian's PostgreSQL on 127.0.0.1 for the distributed-HPO test: install it if
# missing, start the packaged cluster, create a role and a database, and print
# the SQLAlchemy URL. As root (or with sudo) it uses Debian's packaged cluster;
# otherwise it runs a private throwaway cluster as the current user.
set -euo pipefail
if [ "$(id -u)" != 0 ] && ! { command -v sudo >/dev/null && sudo -n true 2>/dev/null; }; then
  bindir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  dir=$(mktemp -d) port=55432
  "$bindir/initdb" -D "$dir/data" -A trust -U mae_ops >&2
  "$bindir/pg_ctl" -w -D "$dir/data" -l "$dir/log" -o "-c listen_addresses=127.0.0.1 -p $port -k $dir" start >&2
  "$bindir/createdb" -h 127.0.0.1 -p "$port" -U mae_ops mae_ops_test >&2
  echo "postgresql+psycopg://mae_ops@127.0.0.1:$port/mae_ops_test"
  exit 0
fi
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
as_postgres() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi; }

if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  as_root apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq postgresql >&2
fi
version=$(ls /usr/lib/postgresql | sort -V | tail -1)
pg_lsclusters -h | grep -q "^$version main " || as_root pg_createcluster "$version" main >&2
# listen on loopback only; the packaged pg_hba.conf asks for passwords on 127.0.0.1
pg_lsclusters -h | grep -q "^$version main .* online" || \
  as_root pg_ctlcluster "$version" main start -o "-c listen_addresses=127.0.0.1" >&2
port=$(pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $3}')
as_postgres psql -q -p "$port" -v ON_ERROR_STOP=1 >&2 <<SQL
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mae_ops') THEN
    CREATE ROLE mae_ops LOGIN PASSWORD 'mae_ops';
  END IF;
END \$\$;
SQL
as_postgres psql -p "$port" -tAc "SELECT 1 FROM pg_database WHERE datname = 'mae_ops_test'" | grep -q 1 || \
  as_postgres createdb -p "$port" -O mae_ops mae_ops_test >&2
echo "postgresql+psycopg://mae_ops:mae_ops@127.0.0.1:$port/mae_ops_test"
