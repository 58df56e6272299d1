#!/usr/bin/env bash
# Prepare bench/gpu.py for the lent GPU machine, as it is: no network there, Python 3.12 with torch,
# torchvision, transformers, timm, pyarrow, numpy, pillow, opencv, scikit-image, pyyaml, rich, fsspec and
# nvidia-ml-py, but no open_clip, ftfy, pydantic, ray, duckdb or faiss (/work/.library/device/KINDS.md).
# Not carried: ray and faiss (their wheels alone exceed the 64 MiB a call may carry).
#
#   bash bench/gpu_device.sh            # here: fetch the wheels into .whl/ (git-ignored), print the command
#   PY=3.11 DEST=DIR bash bench/gpu_device.sh   # the same wheels for another Python (make gpu-device-check)
#
# Only what the benchmark's sections need and the image lacks travels: curate imports ray, duckdb, faiss,
# s3fs, fastapi, img2dataset, kenlm and py3langid only inside the code that uses them; without ray the
# Ray-runner run is skipped with one line, without FAISS k-means and SemDeDup run through torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-3.12}
DEST=${DEST:-.whl}
# name==version (the versions the project's own tests run with): pure-Python wheels, pydantic-core (compiled, one
# per Python version) and duckdb (~24 MiB: every curate.run uses it for its global steps -- unique_uid, the fit
# views -- so the clip section's runs need it; the perplexity and recaption sections do not)
WHEELS=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.5 pydantic==2.14.4 pydantic-core==2.50.5
        annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 duckdb==2.0.1)
mkdir -p "$DEST"
if [ "$DEST" = .whl ]; then grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude; fi
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${WHEELS[@]}"
bytes=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "wheels in $DEST: $(ls "$DEST"/*.whl | wc -l) files, $((bytes / 1024 / 1024)) MiB ($bytes bytes; keep under ~50 MiB)"
[ "$bytes" -lt $((50 * 1024 * 1024)) ] || { echo "too large for the device's 64 MiB tree" >&2; exit 1; }
[ "$DEST" = .whl ] || exit 0
cat <<'CMD'

The device command (one call, carry [".whl"], timeout_s 590; the bench stops starting sections after 420 s):

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && nvidia-smi -L && PYTHONUNBUFFERED=1 timeout 570 python3 bench/gpu.py --out $OUT/gpu.json --budget 420 --tmp /tmp 2>&1 | tee $OUT/gpu.log
CMD
