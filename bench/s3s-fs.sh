# Sourced by bench/s3.sh and bench/copy.sh: `start_s3s_fs DIR` starts s3s-fs (installed by
# scripts/setup.sh) on a free loopback port with its objects under DIR, stops it when the
# script exits, and exports the AWS_* variables that reach it; $port is its port.
start_s3s_fs() {
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  /var/lib/cairn-test/s3s-fs/bin/s3s-fs --host 127.0.0.1 --port "$port" --access-key bench --secret-key benchsecret "$1" \
    > s3s-fs.log 2>&1 &
  s3s_fs_pid=$!
  trap 'kill $s3s_fs_pid 2>/dev/null || true' EXIT
  for _ in $(seq 1 100); do (echo > /dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
  export AWS_ENDPOINT_URL=http://127.0.0.1:$port AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=benchsecret AWS_REGION=us-east-1
}
