#!/bin/bash
# The toy world's Mod-Adapter and its ablations (docs/results.md, "The Mod-Adapter on the world"), trained with the
# pack's own commands only. Run from the repository root:
#   bash benchmarks/world_adapters.sh [stage ...]      (default: the shipped adapter, then its ablations, in order)
# The shipped recipe (issue 25, docs/results.md "Why lighting and background"): one expert per world word
# (router-ten, pre-ten) and σ drawn towards high noise (--timestep-shift 3) for 3,000 steps (ten-shift3-full). The
# earlier recipe (4 k-means experts, no shift) and its ablations keep their stage names (full, ablate-full,
# no-pretrain, one-expert, linear-router, pooled) and run when named.
# Resumable: a finished stage (its adapter.safetensors) is skipped, an interrupted one resumes from its newest
# checkpoint, so the script can be stopped and started again at any time. Logs: $OUT/adapters/<stage>.log.
set -u
WORLD=${WORLD:-world}                 # the shipped world (a diffusers FLUX.1 folder and an image encoder)
OUT=${OUT:-out/world}
PRE_STEPS=${PRE_STEPS:-2000}
TRAIN_STEPS=${TRAIN_STEPS:-3000}      # the shipped adapter
# The ablations share a smaller budget than the shipped adapter (2 CPU cores cannot train five adapters for
# 3000 steps in one session); "ablate-full" is the full model trained on that same budget.
ABLATION_STEPS=${ABLATION_STEPS:-1000}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
M=$OUT/pairs/manifest.jsonl
A=$OUT/adapters
FLUX="--flux $WORLD/flux --base-model toy-world"
ENC="--image-encoder ModAdapter-World-ViT-8 --image-encoder-weights $WORLD/image_encoder/open_clip_model.safetensors
     --image-encoder-config $WORLD/image_encoder/ModAdapter-World-ViT-8.json"
PRE_LOOP="--steps $PRE_STEPS --batch-size 64 --lr 5e-4 --warmup-steps 100 --lr-schedule cosine --min-lr-ratio 0.05
          --save-every 250 --device cpu"
TRAIN_REST="--batch-size 32 --lr 3e-4 --warmup-steps 100 --lr-schedule cosine --min-lr-ratio 0.05 --save-every 250
            --device cpu --resolution 64 --max-sequence-length 48"
TRAIN_LOOP="--steps $TRAIN_STEPS $TRAIN_REST"
ABLATE_LOOP="--steps $ABLATION_STEPS $TRAIN_REST"
mkdir -p "$A"
echo '{"num_experts": 1}' > "$A/one-expert.json"
echo '{"router": "linear"}' > "$A/linear-router.json"
echo '{"image_reading": "pooled"}' > "$A/pooled.json"
echo '{"num_experts": 10}' > "$A/ten-experts.json"

log() { echo "$(date '+%F %T') $*" >> "$A/pipeline.log"; }
resume_flag() { ls -d "$1"/checkpoint-* > /dev/null 2>&1 && echo "--resume $1"; }

run_stage() {  # name, out folder, command...
    local name=$1 out=$2; shift 2
    [ -f "$out/adapter.safetensors" ] && { log "$name: done already"; return 0; }
    log "$name: start"
    local started=$(date +%s)
    # shellcheck disable=SC2046
    "$@" $(resume_flag "$out") --out "$out" >> "$A/$name.log" 2>&1
    local rc=$?
    log "$name: rc $rc after $(( $(date +%s) - started )) s"
    return $rc
}

# shellcheck disable=SC2086
stage() {
    case $1 in
    pairs) [ -f "$M" ] || mod-adapter world make-pairs --out "$OUT/pairs" --count 20000 ;;
    validate) mod-adapter validate "$M" ;;
    router) [ -f "$A/router.safetensors" ] || mod-adapter fit-router --manifest "$M" $FLUX --experts 4 \
                --out "$A/router.safetensors" >> "$A/router.log" 2>&1 ;;
    pre-full) run_stage pre-full "$A/pre-full" mod-adapter pretrain --manifest "$M" $FLUX $ENC \
                  --router "$A/router.safetensors" --preset world $PRE_LOOP ;;
    full) run_stage full "$A/full" mod-adapter train --manifest "$M" $FLUX $ENC \
              --init "$A/pre-full/adapter.safetensors" $TRAIN_LOOP ;;
    ablate-full) run_stage ablate-full "$A/ablate-full" mod-adapter train --manifest "$M" $FLUX $ENC \
                     --init "$A/pre-full/adapter.safetensors" $ABLATE_LOOP ;;
    no-pretrain) run_stage no-pretrain "$A/no-pretrain" mod-adapter train --manifest "$M" $FLUX $ENC --preset world \
                     --router "$A/router.safetensors" $ABLATE_LOOP ;;
    pre-one-expert) run_stage pre-one-expert "$A/pre-one-expert" mod-adapter pretrain --manifest "$M" $FLUX $ENC \
                        --preset world --config "$A/one-expert.json" $PRE_LOOP ;;
    one-expert) run_stage one-expert "$A/one-expert" mod-adapter train --manifest "$M" $FLUX $ENC \
                    --init "$A/pre-one-expert/adapter.safetensors" $ABLATE_LOOP ;;
    pre-linear-router) run_stage pre-linear-router "$A/pre-linear-router" mod-adapter pretrain --manifest "$M" $FLUX \
                           $ENC --preset world --config "$A/linear-router.json" $PRE_LOOP ;;
    linear-router) run_stage linear-router "$A/linear-router" mod-adapter train --manifest "$M" $FLUX $ENC \
                       --init "$A/pre-linear-router/adapter.safetensors" $ABLATE_LOOP ;;
    pre-pooled) run_stage pre-pooled "$A/pre-pooled" mod-adapter pretrain --manifest "$M" $FLUX $ENC \
                    --router "$A/router.safetensors" --preset world --config "$A/pooled.json" $PRE_LOOP ;;
    pooled) run_stage pooled "$A/pooled" mod-adapter train --manifest "$M" $FLUX $ENC \
                --init "$A/pre-pooled/adapter.safetensors" $ABLATE_LOOP ;;
    # The shipped recipe: one expert per world word, and σ drawn towards high noise, where lighting and background
    # change the loss (docs/results.md, "Why lighting and background").
    router-ten) [ -f "$A/router-ten.safetensors" ] || mod-adapter fit-router --manifest "$M" $FLUX --experts 10 \
                    --out "$A/router-ten.safetensors" >> "$A/router-ten.log" 2>&1 ;;
    pre-ten) run_stage pre-ten "$A/pre-ten" mod-adapter pretrain --manifest "$M" $FLUX $ENC \
                 --router "$A/router-ten.safetensors" --preset world --config "$A/ten-experts.json" $PRE_LOOP ;;
    ten-shift3-full) run_stage ten-shift3-full "$A/ten-shift3-full" mod-adapter train --manifest "$M" $FLUX $ENC \
                         --init "$A/pre-ten/adapter.safetensors" $TRAIN_LOOP --timestep-shift 3 ;;
    # Its ablations, at the ablation budget: the same recipe (ten-shift3), without the shift (ten), with 4 k-means
    # experts (four-shift3) and with one expert (one-expert-shift3)
    ten-shift3) run_stage ten-shift3 "$A/ten-shift3" mod-adapter train --manifest "$M" $FLUX $ENC \
                    --init "$A/pre-ten/adapter.safetensors" $ABLATE_LOOP --timestep-shift 3 ;;
    ten) run_stage ten "$A/ten" mod-adapter train --manifest "$M" $FLUX $ENC \
             --init "$A/pre-ten/adapter.safetensors" $ABLATE_LOOP ;;
    four-shift3) run_stage four-shift3 "$A/four-shift3" mod-adapter train --manifest "$M" $FLUX $ENC \
                     --init "$A/pre-full/adapter.safetensors" $ABLATE_LOOP --timestep-shift 3 ;;
    one-expert-shift3) run_stage one-expert-shift3 "$A/one-expert-shift3" mod-adapter train --manifest "$M" $FLUX \
                           $ENC --init "$A/pre-one-expert/adapter.safetensors" $ABLATE_LOOP --timestep-shift 3 ;;
    *) echo "unknown stage $1"; return 2 ;;
    esac
}

STAGES=${*:-pairs validate router-ten pre-ten ten-shift3-full ten-shift3 ten pre-one-expert one-expert-shift3 router
             pre-full four-shift3}
for s in $STAGES; do stage "$s" || { log "stopped at $s"; exit 1; }; done
log "all stages done"
