#!/usr/bin/env bash
# shellcheck disable=SC2016  # the `bash -c` probe bodies expand their own arguments
# Make sure the services the tests and the demo talk to answer: RabbitMQ (with its management
# API and Prometheus plugin), Redis and PostgreSQL.
#
# For each service it prints one line: "ok", "started" (it was installed here but stopped, and
# this script started it), or "missing"/"down" with what to do. Exits non-zero if any is not up.
# Every wait has a deadline. It never stops or restarts anything.
#
# Checks use bash's /dev/tcp and the servers' own CLIs, nothing else. Overrides (environment):
#   REXEC_CHECK_HOST              host of all three services            (127.0.0.1)
#   REXEC_CHECK_AMQP_PORT         RabbitMQ AMQP port                    (5672)
#   REXEC_CHECK_MANAGEMENT_PORT   RabbitMQ management API port          (15672)
#   REXEC_CHECK_MANAGEMENT_USER / _PASSWORD  management API credentials (guest / guest)
#   REXEC_CHECK_REDIS_PORT        Redis port                            (6379)
#   REXEC_CHECK_POSTGRES_PORT     PostgreSQL port                       (5432)
#   REXEC_CHECK_NO_START=1        only check, never start anything
#   REXEC_CHECK_DEADLINE          seconds to wait for a service to come up (90)
# A service is started only when it is checked at its standard local address: a server that a
# different host or port points at is not one this machine's start commands would bring up.
set -uo pipefail

HOST=${REXEC_CHECK_HOST:-127.0.0.1}
AMQP_PORT=${REXEC_CHECK_AMQP_PORT:-5672}
MGMT_PORT=${REXEC_CHECK_MANAGEMENT_PORT:-15672}
MGMT_USER=${REXEC_CHECK_MANAGEMENT_USER:-guest}
MGMT_PASSWORD=${REXEC_CHECK_MANAGEMENT_PASSWORD:-guest}
REDIS_PORT=${REXEC_CHECK_REDIS_PORT:-6379}
PG_PORT=${REXEC_CHECK_POSTGRES_PORT:-5432}
NO_START=${REXEC_CHECK_NO_START:-0}
DEADLINE=${REXEC_CHECK_DEADLINE:-90}

COMPOSE_HINT="or run them in containers: docker compose up -d rabbitmq redis postgres (compose.yaml at the repo root)"
failures=0

report() { # service status detail
	printf '%-9s %-8s %s\n' "$1" "$2" "$3"
}

fail() { # service status detail
	report "$@"
	failures=$((failures + 1))
}

is_local() {
	[[ $HOST == 127.0.0.1 || $HOST == localhost || $HOST == ::1 ]]
}

# may_start PORT DEFAULT_PORT: true if this script may start the local service.
may_start() {
	[[ $NO_START != 1 ]] && is_local && [[ $1 == "$2" ]]
}

why_not_started() {
	if [[ $NO_START == 1 ]]; then
		printf ' (REXEC_CHECK_NO_START=1: not starting it)'
	else
		printf ' (not the standard local address: not starting anything)'
	fi
}

# --- probes: each bounded by `timeout` -------------------------------------------------------

tcp_open() { # host port
	timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

amqp_answers() { # host port: the broker replies to the AMQP 0-9-1 header with a method frame
	timeout 3 bash -c '
		export LC_ALL=C
		exec 3<>"/dev/tcp/$1/$2" || exit 1
		printf "AMQP\000\000\011\001" >&3
		IFS= read -r -d "" -n 1 -t 3 frame <&3
		printf -v method "\001"
		[[ $frame == "$method" ]]' _ "$1" "$2" 2>/dev/null
}

redis_answers() { # host port: PING gets +PONG
	timeout 3 bash -c '
		exec 3<>"/dev/tcp/$1/$2" || exit 1
		printf "PING\r\n" >&3
		IFS= read -r -t 3 reply <&3
		[[ $reply == "+PONG"* ]]' _ "$1" "$2" 2>/dev/null
}

postgres_answers() { # host port
	if command -v pg_isready >/dev/null 2>&1; then
		pg_isready -q -h "$1" -p "$2" -t 3
	else
		tcp_open "$1" "$2"
	fi
}

http_status() { # host port path [basic-auth]: prints the HTTP status code, or nothing
	local request
	request=$(printf 'GET %s HTTP/1.0\r\nHost: %s\r\nConnection: close' "$3" "$1")
	[[ -n ${4:-} ]] && request+=$(printf '\r\nAuthorization: Basic %s' "$4")
	timeout 4 bash -c '
		exec 3<>"/dev/tcp/$1/$2" || exit 1
		printf "%s\r\n\r\n" "$3" >&3
		IFS=" " read -r -t 4 _ code _ <&3 && printf "%s" "$code"' _ "$1" "$2" "$request" 2>/dev/null
}

# wait_for SECONDS COMMAND...: poll COMMAND every half second until it succeeds or time runs out.
wait_for() {
	local limit=$((SECONDS + $1))
	shift
	until "$@"; do
		((SECONDS < limit)) || return 1
		sleep 0.5
	done
}

# --- RabbitMQ ---------------------------------------------------------------------------------

management_status() {
	local auth
	auth=$(printf '%s:%s' "$MGMT_USER" "$MGMT_PASSWORD" | base64 | tr -d '\n')
	http_status "$HOST" "$MGMT_PORT" /api/overview "$auth"
}

management_answers() {
	[[ $(management_status) == 200 ]]
}

prometheus_answers() {
	[[ $(http_status "$HOST" 15692 /metrics) == 200 ]]
}

check_rabbitmq() {
	local status=ok
	if ! amqp_answers "$HOST" "$AMQP_PORT"; then
		if ! command -v rabbitmq-server >/dev/null 2>&1; then
			fail rabbitmq missing "no broker answers on $HOST:$AMQP_PORT and rabbitmq-server is not installed: apt-get install -y rabbitmq-server; $COMPOSE_HINT"
			return
		fi
		if ! may_start "$AMQP_PORT" 5672; then
			fail rabbitmq down "no broker answers on $HOST:$AMQP_PORT$(why_not_started): start RabbitMQ there; $COMPOSE_HINT"
			return
		fi
		# -detached returns at once; the node boots in the background (about 6 s here).
		if ! rabbitmq-server -detached >/dev/null 2>&1; then
			fail rabbitmq down "'rabbitmq-server -detached' failed (not root?): see /var/log/rabbitmq/"
			return
		fi
		if ! wait_for "$DEADLINE" amqp_answers "$HOST" "$AMQP_PORT"; then
			fail rabbitmq down "started rabbitmq-server, but $HOST:$AMQP_PORT did not answer within ${DEADLINE}s: see /var/log/rabbitmq/"
			return
		fi
		status=started
	fi

	# The tests create a vhost through the management API; operators read metrics on 15692.
	local plugins="" code
	code=$(management_status)
	if [[ $code == 401 ]]; then
		fail rabbitmq down "the management API on $HOST:$MGMT_PORT refused user '$MGMT_USER' (set REXEC_CHECK_MANAGEMENT_USER/_PASSWORD)"
		return
	fi
	if [[ $code != 200 ]] || { may_start "$AMQP_PORT" 5672 && ! prometheus_answers; }; then
		if may_start "$AMQP_PORT" 5672 && command -v rabbitmq-plugins >/dev/null 2>&1; then
			# Works offline against the running node; a no-op for plugins already enabled.
			if ! timeout 60 rabbitmq-plugins enable rabbitmq_management rabbitmq_prometheus >/dev/null 2>&1; then
				fail rabbitmq down "AMQP answers on $HOST:$AMQP_PORT, but 'rabbitmq-plugins enable rabbitmq_management rabbitmq_prometheus' failed: run it by hand to see why"
				return
			fi
			plugins="; enabled the management and prometheus plugins"
			if ! wait_for 60 management_answers; then
				fail rabbitmq down "enabled the management plugin, but its API on $HOST:$MGMT_PORT did not answer within 60s: see /var/log/rabbitmq/"
				return
			fi
		elif [[ $code != 200 ]]; then
			fail rabbitmq down "AMQP answers on $HOST:$AMQP_PORT, but the management API on $HOST:$MGMT_PORT does not (HTTP ${code:-no answer}): rabbitmq-plugins enable rabbitmq_management rabbitmq_prometheus"
			return
		fi
	fi
	report rabbitmq "$status" "$HOST:$AMQP_PORT, management API on :$MGMT_PORT$plugins"
}

# --- Redis ------------------------------------------------------------------------------------

check_redis() {
	if redis_answers "$HOST" "$REDIS_PORT"; then
		report redis ok "$HOST:$REDIS_PORT"
		return
	fi
	if tcp_open "$HOST" "$REDIS_PORT"; then
		fail redis down "something listens on $HOST:$REDIS_PORT but does not answer PING with +PONG (a password? another server?)"
		return
	fi
	if ! command -v redis-server >/dev/null 2>&1; then
		fail redis missing "nothing answers on $HOST:$REDIS_PORT and redis-server is not installed: apt-get install -y redis-server; $COMPOSE_HINT"
		return
	fi
	if ! may_start "$REDIS_PORT" 6379; then
		fail redis down "nothing answers on $HOST:$REDIS_PORT$(why_not_started): start redis-server there; $COMPOSE_HINT"
		return
	fi
	# The same command that starts it on this kind of machine: keeps nothing on disk.
	local dir=/var/lib/redis log=/var/log/redis/ci.log
	[[ -d $dir && -w $dir ]] || dir=${TMPDIR:-/tmp}
	[[ -d ${log%/*} && -w ${log%/*} ]] || log=${TMPDIR:-/tmp}/rexec-redis.log
	if ! redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
		--dir "$dir" --logfile "$log" >/dev/null 2>&1; then
		fail redis down "redis-server failed to start: see $log"
		return
	fi
	if ! wait_for 20 redis_answers "$HOST" "$REDIS_PORT"; then
		fail redis down "started redis-server but $HOST:$REDIS_PORT did not answer within 20s: see $log"
		return
	fi
	report redis started "$HOST:$REDIS_PORT (log: $log)"
}

# --- PostgreSQL -------------------------------------------------------------------------------

check_postgres() {
	if postgres_answers "$HOST" "$PG_PORT"; then
		report postgres ok "$HOST:$PG_PORT"
		return
	fi
	local version=""
	if [[ -d /etc/postgresql ]]; then
		# shellcheck disable=SC2012  # cluster versions are plain numbers
		version=$(ls /etc/postgresql | sort -V | tail -n 1)
	fi
	if ! command -v pg_ctlcluster >/dev/null 2>&1 || [[ -z $version || ! -d /etc/postgresql/$version/main ]]; then
		fail postgres missing "nothing answers on $HOST:$PG_PORT and no PostgreSQL cluster is installed: apt-get install -y postgresql (the tests connect as postgres@$HOST without a password: allow 'trust' for local TCP in pg_hba.conf, or set REXEC_TEST_POSTGRES); $COMPOSE_HINT"
		return
	fi
	if ! may_start "$PG_PORT" 5432; then
		fail postgres down "nothing answers on $HOST:$PG_PORT$(why_not_started): start PostgreSQL there; $COMPOSE_HINT"
		return
	fi
	# pg_ctlcluster waits for the server itself; bound it all the same.
	if ! timeout "$DEADLINE" pg_ctlcluster --skip-systemctl-redirect "$version" main start >/dev/null 2>&1 &&
		! postgres_answers "$HOST" "$PG_PORT"; then
		fail postgres down "pg_ctlcluster $version main start failed: see /var/log/postgresql/"
		return
	fi
	if ! wait_for 30 postgres_answers "$HOST" "$PG_PORT"; then
		fail postgres down "started PostgreSQL $version but $HOST:$PG_PORT did not answer within 30s: see /var/log/postgresql/"
		return
	fi
	report postgres started "$HOST:$PG_PORT (cluster $version/main)"
}

check_rabbitmq
check_redis
check_postgres

if ((failures > 0)); then
	echo "services: $failures of 3 not available; see the lines above" >&2
	exit 1
fi
