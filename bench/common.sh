# Sourced by bench/run.sh, bench/s3.sh and bench/copy.sh, from the repository's top: installs what the
# benches need, builds cairn (release), and makes bench/run.sh's image if it is missing or was
# built from other settings. Sets $top, $cairn, $work, $src, $gib; leaves the shell in $work
# with the image copied to work.img (the benches change it) and $img naming it; defines warm
# (the image into the page cache) and cold (the page cache dropped).
#   BENCH_WORK (default bench/work), BENCH_SRC (default /usr), BENCH_GIB (default 8)
top=$PWD
scripts/setup.sh --bench
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked -p cairn-cli 2>&1 | tail -n 1
cairn=$top/target/release/cairn
work=${BENCH_WORK:-$top/bench/work}
src=${BENCH_SRC:-/usr}
gib=${BENCH_GIB:-8}
mkdir -p "$work" "$top/bench/results"
cd "$work"
if [[ ! -f disk.img || ! -f image.built || "$(cat image.built)" != "$src $gib" ]]; then
  echo "building the ${gib} GiB image from $src ..."
  "$top/bench/make-image.sh" disk.img "$src" "$gib"
  echo "$src $gib" > image.built
fi
cp --sparse=always disk.img work.img
img=work.img

warm() { cat "$img" > /dev/null; sync; }
# Restores read their repository from disk, as they would long after the backup: a fair start
# for every tool (a repository just written may or may not still sit in the page cache).
cold() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || echo "warning: cannot drop caches (not root?)"; }
