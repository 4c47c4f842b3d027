# Sourced by scripts/gpu_study.sh and scripts/multigpu.sh (not run on its own).
# prepare_taef2 TAEF2_DIR WORK_DIR RES PER_CLASS: copies the TAEF2 weights into WORK_DIR and, once, measures the
# latent normalisation on rendered shapes at RES px (WORK_DIR/latent_norm.json, read by load_autoencoder).
prepare_taef2() {
  local src=$1 w=$2 res=$3 per_class=$4
  mkdir -p "$w"
  cp "$src"/taef2_*.pth "$w"/
  if [ ! -f "$w/latent_norm.json" ]; then
    python tools/make_dataset.py --out "$w/../shapes_norm" --resolution "$res" --per-class "$per_class"
    python tools/measure_vae.py "taef2:$w" --images "$w/../shapes_norm" --size "$res" --device "${DEVICE:-cuda}" \
        --out "$w/latent_norm.json" --no-progress
  fi
}
