#!/usr/bin/env bash
# Redis on loopback for the Redis tests and benchmarks. Our machines already run one on
# 127.0.0.1:6379; on a machine without it, this installs Debian's redis-server and starts a
# private instance bound to loopback with persistence off.
#
#   scripts/redis.sh start    # use the running Redis, or install and start one
#   scripts/redis.sh stop     # stops only an instance this script started
#   scripts/redis.sh status
#
# Port: ${SMARTCLOUDOPS_REDIS_PORT:-6379}.
set -euo pipefail
cd "$(dirname "$0")/.."

PORT="${SMARTCLOUDOPS_REDIS_PORT:-6379}"
DIR=".cache/redis"
PIDFILE="$DIR/redis.pid"

answers() {
  # PING over a raw socket in a subshell: works without redis-cli, and a refused connection
  # stays quiet.
  (
    exec 3<>"/dev/tcp/127.0.0.1/$PORT" || exit 1
    printf 'PING\r\n' >&3
    read -r -t 2 reply <&3 || exit 1
    [[ "$reply" == +PONG* || "$reply" == -NOAUTH* ]]
  ) 2>/dev/null
}

start() {
  if answers; then
    echo "redis answers on 127.0.0.1:$PORT"
    return
  fi
  if ! command -v redis-server >/dev/null; then
    echo "installing redis-server (Debian)"
    if [ "$(id -u)" -eq 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    else
      sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    fi
  fi
  mkdir -p "$DIR"
  redis-server --bind 127.0.0.1 --port "$PORT" --save '' --appendonly no \
    --daemonize yes --pidfile "$PWD/$PIDFILE" --dir "$PWD/$DIR" --logfile "$PWD/$DIR/redis.log"
  for _ in $(seq 1 100); do
    if answers; then echo "redis started on 127.0.0.1:$PORT"; return; fi
    sleep 0.1
  done
  echo "redis did not start; see $DIR/redis.log" >&2
  exit 1
}

stop() {
  if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    kill "$(cat "$PIDFILE")"
    rm -f "$PIDFILE"
    echo "stopped the redis this script started"
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) if answers; then echo "redis answers on 127.0.0.1:$PORT"; else echo "no redis on 127.0.0.1:$PORT"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
