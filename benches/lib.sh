# What the bench scripts share; each sources it from the repository root.
#
#   bench_install NAME TOOL:PACKAGE...   apt-installs the packages of the missing tools
#   bench_build NAME                     builds pullgate (release) and sets PULLGATE
#   bench_work NAME                      makes WORK, removed at exit with every pid in PIDS
#   port                                 a free port on 127.0.0.1
#   machine_busy                         the whole machine's busy clock ticks (/proc/stat)

bench_install() {
  local name=$1 tool need=()
  shift
  for tool in "$@"; do
    command -v "${tool%%:*}" >/dev/null || need+=("${tool##*:}")
  done
  ((${#need[@]})) || return 0
  echo "$name: installing ${need[*]}"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
}

bench_build() {
  echo "$1: building pullgate (release)"
  cargo build --release --quiet
  PULLGATE=$PWD/target/release/pullgate
}

bench_work() {
  WORK=$(mktemp -d "/tmp/pullgate-${1%.sh}.XXXXXX")
  PIDS=()
  trap bench_cleanup EXIT
}

bench_cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

machine_busy() {
  # user nice system idle iowait irq softirq steal: everything but idle and iowait.
  read -r _ user nice system _idle _iowait irq softirq steal _ < /proc/stat
  echo $((user + nice + system + irq + softirq + steal))
}
