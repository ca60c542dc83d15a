#!/usr/bin/env bash
# Every CUDA path of the project and its GPU benchmarks in ONE go (<= 8 minutes on an H200), then one summary table.
#
#   bash bench/gpu_check.sh                          # on a GPU machine, from the repository root
#   GPU_QUICK=1 PY=.venv/bin/python bash bench/gpu_check.sh   # the same paths on the CPU, tiny sizes: checks the script
#
# A GPU image without ruamel.yaml / webdataset / braceexpand gets them as wheels from an ignored .whl/ folder
# (README, "GPU check"); they are installed into /tmp/site first. Output: $OUT (default /tmp/gpu_out): log.txt (every
# step's whole output), summary.md (the table printed last), logs/ (one file per step).
#
# Phase A (correctness, steps in parallel): bench/gpu_probe.py (autocast dtype in the training forward, bf16 vs fp32
# losses, fp16 GradScaler, a NaN caught, decoding on the device); each entry script for one short epoch on a small
# shapes world in fp32 and bf16 (pretrain, retrieval, caption, vqa, nlvr, ve, then capfilt and
# evaluate_compositional on their models), pretraining also compiled; torchrun --nproc_per_node 1 (NCCL on CUDA);
# every `blip` verb with the device, fp32 and --bf16. Phase B (speed, one at a time): the benchmarks of bench/, the
# BLIP-base step at batch 64 under set_sync_debug_mode("error"). CEILING=1 adds the batch ceilings (their own call).
set -u
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
OUT=${OUT:-/tmp/gpu_out}; W=${WORK:-/tmp/gpu_check}
mkdir -p "$OUT/logs" "$W"; rm -f "$OUT/summary.tsv"
LOG=$OUT/log.txt; : > "$LOG"
if [ -d .whl ] && [ -z "${GPU_QUICK:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || { echo "wheel install failed" | tee -a "$LOG"; exit 3; }
fi
PY=${PY:-python3}
if [ -n "${GPU_QUICK:-}" ]; then
  D=cpu; TB=2; TB2=4; STEPS=2; EVAL="--images 6 --texts 12 --k 4 --image-size 64 --caption-images 2 --caption-batch 2"
  CAP="--batch 2 --image-size 64 --batches 1"; INFER="--batch 2 --image-size 64 --repeats 1 --folder-batches 1 --bf16"
  NCCL=gloo; JOBS=${JOBS:-2}; SCALE=4   # two CPU cores: every limit x4
else
  D=cuda; TB=64; TB2=128; STEPS=10; EVAL="--images 300 --texts 1500 --k 64 --rerank-batch 512 --caption-images 64 --caption-batch 64 --precisions bf16,tf32"
  CAP="--batch 64 --batches 3 --precision bf16"; INFER="--batch 64 --repeats 3 --folder-batches 32 --workers 12 --bf16"
  NCCL=nccl; JOBS=${JOBS:-12}; SCALE=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$LOG" 2>&1
fi
VERSIONS=$($PY -c "import torch, transformers, timm; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '| transformers', transformers.__version__, '| timm', timm.__version__, '| device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" 2>&1)
echo "$VERSIONS" | tee -a "$LOG"
command -v java >/dev/null || SCORE="score_captions=false"   # caption metrics tokenise with Java (PTB)

bg() {  # bg NAME SECONDS CMD...: `step` in the background, at most $JOBS at a time
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 0.2; done
  step "$@" &
}
T0=$(date +%s); BUDGET=${BUDGET:-$(( 470 * SCALE ))}   # seconds: a step that would start later is skipped, named
step() {  # step NAME SECONDS CMD...: run with a time limit; its output to logs/NAME.log; one summary row
  local name=$1 limit=$(( $2 * SCALE )); shift 2
  local start=$(date +%s%N) rc status note
  if [ $(( $(date +%s) - T0 )) -gt "$BUDGET" ]; then
    printf "%s\t%s\t%s\t%s\t%s\n" "$start" "$name" "SKIPPED" 0 "over the ${BUDGET}s budget: rerun with SKIP_PATHS=1" \
      >> "$OUT/summary.tsv"; return; fi
  timeout "$limit" "$@" > "$OUT/logs/$name.log" 2>&1; rc=$?
  local secs=$(( ($(date +%s%N) - start) / 1000000000 ))
  if [ $rc -eq 0 ]; then status=ok; note=""
  elif [ $rc -eq 124 ]; then status="TIMEOUT ${limit}s"; note=$(tail -n 1 "$OUT/logs/$name.log")
  else status="FAIL rc $rc"; note=$(grep -E "Error|error:|Exception|FAIL" "$OUT/logs/$name.log" | tail -n 1)
       [ -z "$note" ] && note=$(tail -n 1 "$OUT/logs/$name.log"); fi
  { echo "=== $name: $* ($status, ${secs}s)"; cat "$OUT/logs/$name.log"; } >> "$LOG"
  printf "%s\t%s\t%s\t%s\t%s\n" "$start" "$name" "$status" "$secs" "$(echo "$note" | cut -c1-160 | tr '\t|' ' /')" \
    >> "$OUT/summary.tsv"
}

# ---- phase A: correctness on the device ----------------------------------------------------------------------------
if [ -z "${SKIP_PATHS:-}" ]; then
SHAPES="{out_dir: $W/world, n_train: 64, n_val: 16, n_test: 16, image_size: 32, seed: 0}"
WORLD=(--set "shapes=$SHAPES" image_root=$W/world ann_root=$W/world max_epoch=1 num_workers=2 log_every=1)
# the worlds the parallel steps read, made first (two writers of one world would race)
$PY - "$W" "$SHAPES" >> "$LOG" 2>&1 <<'PY'
import sys
from blip.training.config import load_config
from data.worlds import ensure_shapes_world
from data.shapes_probes import ensure_pair_world
from data.shapes_ve import ensure_shapes_ve_world
w, shapes = sys.argv[1], sys.argv[2]
ensure_shapes_world(load_config("configs/shapes_main.yaml"))
ensure_shapes_ve_world(load_config("configs/shapes_ve.yaml", [f"shapes={shapes}", f"image_root={w}/world", f"ann_root={w}/world"]))
ensure_pair_world({"out_dir": f"{w}/pairs", "n_train": 16, "n_val": 4, "n_test": 4, "image_size": 32, "seed": 0, "probe_groups": 10})
PY
bg probe 240 $PY bench/gpu_probe.py --device $D
for P in fp32 bf16; do
  bg main_job_$P 240 $PY pretrain.py --config configs/shapes_main.yaml --device $D --output-dir $W/main_$P --overwrite --set precision=$P
  bg pretrain_$P 180 $PY pretrain.py --config configs/shapes_pretrain.yaml --device $D --output-dir $W/pretrain_$P --overwrite "${WORLD[@]}" precision=$P train_file=[$W/world/pretrain.json]
  bg retrieval_$P 180 $PY train_retrieval.py --config configs/shapes_retrieval.yaml --device $D --output-dir $W/retrieval_$P --overwrite "${WORLD[@]}" precision=$P
  bg caption_$P 180 $PY train_caption.py --config configs/shapes_caption.yaml --device $D --output-dir $W/caption_$P --overwrite "${WORLD[@]}" precision=$P coco_gt_root=$W/world meteor=false ${SCORE:-}
  bg vqa_$P 180 $PY train_vqa.py --config configs/shapes_vqa.yaml --device $D --output-dir $W/vqa_$P --overwrite "${WORLD[@]}" precision=$P vqa_root=$W/world
  bg nlvr_$P 180 $PY train_nlvr.py --config configs/shapes_nlvr.yaml --device $D --output-dir $W/nlvr_$P --overwrite "${WORLD[@]}" precision=$P
  bg ve_$P 180 $PY train_ve.py --config configs/shapes_ve.yaml --device $D --output-dir $W/ve_$P --overwrite "${WORLD[@]}" precision=$P
done
bg pretrain_compiled 300 $PY pretrain.py --config configs/shapes_pretrain.yaml --device $D --output-dir $W/pretrain_compiled --overwrite "${WORLD[@]}" precision=bf16 train_file=[$W/world/pretrain.json] --compile
bg torchrun_${NCCL} 180 $PY -m torch.distributed.run --standalone --nproc_per_node 1 pretrain.py --config configs/shapes_pretrain.yaml --device $D --output-dir $W/torchrun --overwrite "${WORLD[@]}" precision=bf16 train_file=[$W/world/pretrain.json]
wait
for P in fp32 bf16; do
  bg capfilt_$P 180 $PY capfilt.py --config configs/shapes_capfilt.yaml --device $D --output-dir $W/capfilt_$P --set "shapes=$SHAPES" train_file=[$W/world/pretrain.json] noise_file=$W/world/pretrain_noise.json precision=$P captioner=$W/caption_fp32/model.safetensors filter=$W/retrieval_fp32/model.safetensors shard_size=32
done
bg compositional 180 $PY evaluate_compositional.py --device $D --model $W/retrieval_fp32/model.safetensors --task retrieval --captioner $W/caption_fp32/model.safetensors --probe shapes $W/pairs/probes.json $W/pairs --out $W/compositional --limit 40
IMGS=$W/world/images; CK=$W/caption_fp32/model.safetensors; RK=$W/retrieval_fp32/model.safetensors; VK=$W/vqa_fp32/model.safetensors
for P in fp32 bf16; do
  F=$([ $P = bf16 ] && echo --bf16); V=(--device $D --workers 2 --batch-size 8 --no-progress $F)
  bg verb_caption_$P 120 $PY -m blip caption $IMGS --checkpoint $CK "${V[@]}" -o $W/v_$P/caps.jsonl --overwrite
  bg verb_caption_sample_$P 120 $PY -m blip caption $IMGS --checkpoint $CK "${V[@]}" --sample --num-captions 2 -o $W/v_$P/samples.jsonl --overwrite
  bg verb_answer_$P 120 $PY -m blip answer $IMGS --checkpoint $VK --question "what color is the shape?" "${V[@]}" -o $W/v_$P/answers.jsonl --overwrite
  bg verb_answer_rank_$P 120 $PY -m blip answer $IMGS --checkpoint $VK --question "what color is the shape?" --rank --answer-list $W/world/answer_list.json "${V[@]}" -o $W/v_$P/ranked.jsonl --overwrite
  bg verb_itm_$P 120 $PY -m blip itm $IMGS --checkpoint $RK --task retrieval --text "a red circle" --text "two blue squares" "${V[@]}" -o $W/v_$P/itm.jsonl --overwrite
  bg verb_explain_$P 120 $PY -m blip explain "$(find $IMGS -name '*.png' | sort | head -1)" --text "a red circle on the left" --checkpoint $RK --task retrieval --device $D $F -o $W/v_$P/explain
  bg verb_classify_$P 120 $PY -m blip classify $IMGS --checkpoint $RK --task retrieval --labels circle,square,triangle --rerank 2 "${V[@]}" -o $W/v_$P/classes.jsonl --overwrite
  ( step verb_embed_$P 120 $PY -m blip embed $IMGS --checkpoint $RK --task retrieval "${V[@]}" -o $W/v_$P/gallery.safetensors --overwrite &&
    step verb_search_$P 120 $PY -m blip search --gallery $W/v_$P/gallery.safetensors --query "a red circle" --k 3 --rerank 5 --checkpoint $RK --task retrieval "${V[@]}" ) &
done
bg verb_caption_torchrun 120 $PY -m torch.distributed.run --standalone --nproc_per_node 1 -m blip caption $IMGS --checkpoint $CK --device $D --no-progress -o $W/v_torchrun/caps.jsonl --overwrite
wait
fi

# ---- phase B: the benchmarks, one at a time -----------------------------------------------------------------------
if [ -z "${SKIP_BENCH:-}" ]; then
  SYNC=$([ $D = cuda ] && echo --sync-debug)   # the timed steps under set_sync_debug_mode("error"): no host sync
  # in the order of what matters most, should the budget run out
  step bench_train_bf16_b$TB 120 $PY bench/bench_train.py --device $D --precision bf16 --batch $TB --steps $STEPS $SYNC
  step bench_train_bf16_b$TB2 120 $PY bench/bench_train.py --device $D --precision bf16 --batch $TB2 --steps $STEPS
  step bench_infer 200 $PY bench/bench_infer.py --device $D $INFER
  step bench_eval 200 $PY bench/bench_eval.py --device $D $EVAL
  step bench_train_bf16_compiled_b$TB2 240 $PY bench/bench_train.py --device $D --precision bf16 --batch $TB2 --steps $STEPS --compile
  step bench_train_bf16_vitL_b$TB 120 $PY bench/bench_train.py --device $D --precision bf16 --batch $TB --steps $STEPS --vit large
  step bench_capfilt 120 $PY bench/bench_capfilt.py --device $D $CAP
  if [ -n "${CEILING:-}" ]; then   # the largest batch that fits, BLIP-base and ViT-L at 224 and 384 (a call of its own)
    for V in base large; do for S in 224 384; do
      step bench_ceiling_${V}_$S 300 $PY bench/bench_train.py --device $D --precision bf16 --vit $V --image-size $S --batch 64 --steps 3 --ceiling
    done; done
  fi
fi

# ---- the summary: every path, then each benchmark's figures -------------------------------------------------------
{
  echo; echo "## gpu_check $(date -u +%Y-%m-%dT%H:%MZ): $VERSIONS"
  echo; echo "| # | path | status | s | note |"; echo "|---|---|---|---|---|"
  sort -n "$OUT/summary.tsv" | awk -F'\t' '{printf "| %d | %s | %s | %s | %s |\n", NR, $2, $3, $4, $5}'
  echo; echo "main job (configs/shapes_main.yaml) on $D, last evaluation:"
  for P in fp32 bf16; do
    [ -f $W/main_$P/metrics.jsonl ] && $PY -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1]) if '\"eval\"' in l][-1]; print('  $P', {k: round(r[k], 3) for k in ('r_mean', 'image_feat_cosine', 'text_feat_cosine') if k in r})" $W/main_$P/metrics.jsonl 2>/dev/null
  done
  grep -h "^check " "$OUT/logs/probe.log" 2>/dev/null | sed 's/^/  /'
  for f in "$OUT"/logs/bench_*.log; do
    [ -f "$f" ] || continue; echo; echo "### $(basename "$f" .log)"; grep -E "^\||img/s|MFU|speed|x " "$f" | tail -n 14
  done
} > "$OUT/summary.md"
cat "$OUT/summary.md" | tee -a "$LOG"
! grep -qv "	ok	" "$OUT/summary.tsv"
