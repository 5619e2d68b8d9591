# Sourced by scripts/test and scripts/bench-kbs: a private PostgreSQL server on loopback, in a
# directory of the caller's, removed by the caller.

# pg_bin: the newest installed PostgreSQL server's bin directory, or nothing.
pg_bin() {
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true
}

# run_pg CMD…: as the postgres user when root (the server refuses to run as root), from / (the
# caller's directory may be closed to that user).
run_pg() {
    (cd / && if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi)
}

# pg_start BIN DIR PORT [SERVER OPTIONS]: a new cluster in DIR/data (user postgres, trust),
# started on 127.0.0.1:PORT with its socket in DIR; waits until it accepts connections.
pg_start() {
    local bin=$1 dir=$2 port=$3
    shift 3
    if [ "$(id -u)" = 0 ]; then chown postgres "$dir"; fi
    run_pg "$bin/initdb" -D "$dir/data" -A trust -U postgres >/dev/null
    run_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
        -o "-h 127.0.0.1 -p $port -k $dir $*" start >/dev/null
}

# pg_stop BIN DIR: stops the server pg_start started in DIR, at once.
pg_stop() {
    run_pg "$1/pg_ctl" -D "$2/data" -m immediate stop >/dev/null 2>&1 || true
}
