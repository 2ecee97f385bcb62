#!/usr/bin/env bash
# A real throwaway PostgreSQL server for the tests and development (Debian 12, PostgreSQL 15).
# Runs as root without systemd; the server itself runs as the unprivileged user `postgres`
# (initdb and postgres refuse to run as root). Usage:
#   scripts/dev-postgres.sh up     # installs the Debian packages if missing, inits and starts the cluster
#   scripts/dev-postgres.sh down   # stops it (fast mode)
#   scripts/dev-postgres.sh url    # prints the SQLAlchemy URL of database batchprod
# The cluster's data dir is ${PG_CI_DIR:-/tmp/pg-ci}; it listens on 127.0.0.1:${PG_CI_PORT:-55432} and on a
# unix socket in the data dir. Trust auth for every local connection: a test server, never a real one.
# Notes:
# - Before installing, createcluster.d is told not to create Debian's default cluster `main`, which the
#   package would otherwise create (and, where services may start, run on port 5432).
# - fsync, synchronous_commit and full_page_writes are off: a crash loses the cluster, which is fine here.
# - A postmaster.pid whose PID is not a live postgres (left by a killed server, PID since reused) is removed.
# - PID 1 here does not reap at once: after `down` the postmaster stays <defunct> for ~1-2 s (down waits up
#   to 5 s for it to go). A killed server's leftovers are handled by `up` (a zombie does not count as alive).
set -euo pipefail
D=${PG_CI_DIR:-/tmp/pg-ci}
P=${PG_CI_PORT:-55432}
U=postgres   # OS user the server runs as

url() { echo "postgresql+psycopg://batchprod:batchprod@127.0.0.1:$P/batchprod"; }

bindir() {   # the directory holding initdb and pg_ctl: PATH first, then the newest /usr/lib/postgresql/*/bin
  local b
  if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
    b=$(dirname "$(readlink -f "$(command -v pg_ctl)")")
    [ -x "$b/initdb" ] && [ -x "$b/postgres" ] && { echo "$b"; return 0; }
  fi
  for b in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$b/initdb" ] && [ -x "$b/pg_ctl" ] && [ -x "$b/postgres" ] && { echo "$b"; return 0; }
  done
  return 1
}

alive() {    # is the PID in $D/postmaster.pid a live (not zombie) postgres?
  local pid
  pid=$(head -1 "$D/postmaster.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 1
  case "$(cat "/proc/$pid/comm" 2>/dev/null)" in postgres|postmaster) ;; *) return 1 ;; esac
  [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]
}

as_pg() { (cd / && runuser -u "$U" -- "$@"); }   # cd /: the server user may not see the caller's cwd

ready() { "$B/pg_isready" -q -h 127.0.0.1 -p "$P" -d postgres -U postgres 2>/dev/null; }

down() {
  B=$(bindir) || return 0
  [ -f "$D/postmaster.pid" ] || return 0
  local pid; pid=$(head -1 "$D/postmaster.pid" 2>/dev/null || true)
  if alive; then
    as_pg "$B/pg_ctl" -D "$D" -m fast -w -t 60 stop >/dev/null || true
    for _ in $(seq 50); do [ -e "/proc/$pid" ] || break; sleep 0.1; done   # PID 1 reaps the <defunct> lazily
  fi
  alive && { echo "postgres (PID $(head -1 "$D/postmaster.pid")) did not stop" >&2; return 1; }
  rm -f "$D/postmaster.pid" "$D"/.s.PGSQL.*   # only left behind by a server that died without cleaning up
  return 0
}

setup_db() {  # role and database batchprod; safe to repeat
  local psql=("$B/psql" -X -q -h "$D" -p "$P" -U postgres -d postgres -v ON_ERROR_STOP=1 -tA)
  "${psql[@]}" -c "DO \$\$ BEGIN
      IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'batchprod') THEN CREATE ROLE batchprod; END IF;
    END \$\$; ALTER ROLE batchprod WITH LOGIN PASSWORD 'batchprod';"
  [ "$("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = 'batchprod'")" = 1 ] ||
    "${psql[@]}" -c "CREATE DATABASE batchprod OWNER batchprod"
  "${psql[@]}" -c "ALTER DATABASE batchprod OWNER TO batchprod"
}

up() {
  if ! B=$(bindir); then
    mkdir -p /etc/postgresql-common/createcluster.d
    echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/batchprod-ci.conf
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    B=$(bindir) || { echo "postgresql installed but no initdb/pg_ctl found" >&2; return 1; }
  fi
  id -u "$U" >/dev/null 2>&1 || useradd --system --user-group --home-dir /nonexistent --no-create-home \
                                        --shell /usr/sbin/nologin "$U"
  if [ -f "$D/postmaster.pid" ] && alive && ready; then
    setup_db; echo "postgres already up"; return 0
  fi
  if [ ! -f "$D/PG_VERSION" ]; then   # no cluster yet (initdb removes what it made when it fails)
    rmdir "$D" 2>/dev/null || true
    [ ! -e "$D" ] || { echo "$D exists but is not a PostgreSQL data dir: remove it or set PG_CI_DIR" >&2; return 1; }
    install -d -o "$U" -g "$(id -gn "$U")" -m 0700 "$D"
    as_pg "$B/initdb" -D "$D" -U postgres -A trust -E UTF8 --locale=C --no-sync >"$D.initdb.log" 2>&1 ||
      { echo "initdb failed:" >&2; cat "$D.initdb.log" >&2; return 1; }
    rm -f "$D.initdb.log"
    echo "include_if_exists = 'ci.conf'" >> "$D/postgresql.conf"
  fi
  chown -R "$U:$(id -gn "$U")" "$D"; chmod 0700 "$D"
  cat > "$D/ci.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $P
unix_socket_directories = '$D'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200
CONF
  chown "$U:" "$D/ci.conf"
  if [ -f "$D/postmaster.pid" ] && ! alive; then
    rm -f "$D/postmaster.pid" "$D"/.s.PGSQL.*
  fi
  if ! alive; then   # pg_ctl -w returns as soon as the server accepts connections, or has died
    as_pg "$B/pg_ctl" -D "$D" -l "$D/server.log" -w -t 60 start >/dev/null 2>&1 || true
  fi
  for _ in $(seq 300); do
    alive || break
    ready && { setup_db; echo "postgres up"; return 0; }
    sleep 0.2
  done
  echo "postgres failed to come up (died, or not ready within 60 s; 127.0.0.1:$P, data dir $D). Its log:" >&2
  tail -20 "$D/server.log" >&2 || true
  return 1
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  url) url ;;
  *) echo "usage: $0 up|down|url" >&2; exit 2 ;;
esac
