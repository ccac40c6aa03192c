#!/usr/bin/env bash
# The mini_qwen pipeline, in order. Each stage starts only after the one it depends on has finished.
#
#   bash run.sh demo [--gpus N]               tiny CPU run: PT -> SFT -> DPO -> eval report (a few minutes)
#   bash run.sh pt|sft|dpo|rm [--gpus N] [--bg] [extra --flags for the stage]
#   bash run.sh grpo [--gpus N] [--bg] [--demo]   GRPO on math problems, after DPO (an extra stage, not in `all`)
#   bash run.sh all [--gpus N] [--bg]         full recipe: PT -> SFT -> DPO -> eval report
#   bash run.sh eval [mini_qwen_eval.py flags]
#   bash run.sh ablation [tools/ablation.py flags]   the original's pt1-pt3 experiments plus pt4, overlaid
#   bash run.sh bench [--tiny]                every GPU figure of docs/BENCHMARKS.md, one table (--tiny: CPU, tiny model)
#   bash run.sh gpu-check                     the first thing to run on a GPU: FA2 packing, ZeRO-2's fp32 save, memory
#                                             plan vs measured peak, tokens/s and MFU (tools/gpu_check.py, one table)
#   bash run.sh serve --model_path DIR [--port 8000] [--host H] [--api_key K]   OpenAI-compatible API on 127.0.0.1
#                                             and a chat page at http://127.0.0.1:8000/chat
#   bash run.sh export DIR OUT.gguf [--outtype f16|bf16|q8_0|f32]   GGUF for llama.cpp / ollama (+ OUT.Modelfile)
#
# --gpus N  prepares the stage's data with every core (`--prepare_only`, one plain process), then trains under
#           `accelerate launch` with N processes (DeepSpeed ZeRO-2, accelerate_config.yaml); without it, plain
#           `python` on one GPU (or the CPU), which prepares the data itself.
# --ddp     with --gpus: plain DDP (accelerate_config_ddp.yaml) instead of ZeRO-2, for 80 GB GPUs (--memory_plan).
# --lean    pretraining with configs/pt_lean.yaml (bf16 weights and moments, checkpointing): one 16 GB GPU.
# --demo    `all` and the stages with the demo recipes (configs/demo_*.yaml: mini_data, tiny model, CPU).
# --bg      runs under nohup, logging to logs/output_<stage>.log, and prints the log path and the pid.
set -euo pipefail
cd "$(dirname "$0")"

usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

[[ $# -ge 1 ]] || usage 1
command=$1
shift
gpus=1
background=0
accelerate_config=accelerate_config.yaml
pt_recipe=pt
recipe_prefix=
extra=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --gpus) gpus=$2; shift 2 ;;
    --gpus=*) gpus=${1#--gpus=}; shift ;;
    --bg) background=1; shift ;;
    --ddp) accelerate_config=accelerate_config_ddp.yaml; shift ;;
    --lean) pt_recipe=pt_lean; shift ;;
    --demo) recipe_prefix=demo_; shift ;;
    -h|--help) usage 0 ;;
    *) extra+=("$1"); shift ;;
  esac
done
[[ $gpus =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: --gpus needs a positive number, got '$gpus'" >&2; exit 2; }
if [[ $command == demo || -n $recipe_prefix ]]; then
  # The demo trains on the CPU, where each step allocates and frees ~0.6 GB of logits (151,936-token vocabulary).
  # glibc hands such blocks back to the kernel at every free and page-faults them in again: half of each step was
  # system time. Keeping them in the (huge-page) heap halved the tiny model's step time here (docs/BENCHMARKS.md).
  export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296}
fi

stage() {  # stage NAME [flags...]: one training stage with its YAML recipe
  local name=$1 recipe=$recipe_prefix$1
  shift
  [[ $name == pt && -z $recipe_prefix ]] && recipe=$pt_recipe
  local stage_command=("mini_qwen_$name.py" --config "configs/$recipe.yaml" "$@")
  if [[ $gpus -gt 1 ]]; then
    # Data first, in one process with every core: the launched ranks then only memory-map it, and no rank waits
    # in a collective while another prepares (NCCL would time out).
    python "${stage_command[@]}" --prepare_only
    accelerate launch --config_file "$accelerate_config" --num_processes "$gpus" "${stage_command[@]}"
  else
    python "${stage_command[@]}"
  fi
}

pipeline() {  # pipeline RESULTS_DIR [PT flags...]: PT -> SFT -> DPO -> eval, each stage after the one it needs
  local results=$1 started=$SECONDS times=()
  shift
  stage pt "$@"
  times+=("pt $((SECONDS - started)) s"); started=$SECONDS
  stage sft
  times+=("sft $((SECONDS - started)) s"); started=$SECONDS
  stage dpo
  times+=("dpo $((SECONDS - started)) s"); started=$SECONDS
  python mini_qwen_eval.py --model_path "$results/pt" "$results/sft" "$results/dpo" --prompts default \
    --output_dir "$results/eval" --pipeline_report "$results" ${recipe_prefix:+--max_new_tokens 32}
  times+=("eval and report $((SECONDS - started)) s")
  local joined
  joined=$(printf '%s, ' "${times[@]}")
  echo "time per stage: ${joined%, }; total $SECONDS s"
}

demo() {
  recipe_prefix=demo_
  pipeline results/demo "$@"
  echo "demo finished: checkpoints, loss.png and report.md in results/demo/{pt,sft,dpo}; results/demo/report.md links them"
}

all() {
  if [[ -n $recipe_prefix ]]; then demo "$@"; else pipeline results "$@"; fi
}

case $command in
  demo|all) target=$command ;;
  pt|sft|dpo|rm|grpo) target="stage $command" ;;
  eval) target="python mini_qwen_eval.py" ;;
  ablation) target="python -m tools.ablation" ;;
  bench) target="python -m tools.benchmark suite" ;;
  gpu-check) target="python -m tools.gpu_check" ;;
  serve) target="python -m tools.serve" ;;
  export) target="python -m tools.export_gguf" ;;
  -h|--help) usage 0 ;;
  *) echo "run.sh: unknown command '$command'" >&2; usage 2 ;;
esac

if [[ $background -eq 1 ]]; then
  mkdir -p logs
  log="logs/output_$command.log"
  # Re-enter this script in the foreground under nohup, so a chain still runs its stages one after another.
  flags=()
  [[ $accelerate_config == accelerate_config_ddp.yaml ]] && flags+=(--ddp)
  [[ $pt_recipe == pt_lean ]] && flags+=(--lean)
  [[ -n $recipe_prefix ]] && flags+=(--demo)
  nohup bash "$0" "$command" --gpus "$gpus" "${flags[@]}" "${extra[@]}" > "$log" 2>&1 &
  echo "started '$command' in the background: pid $!, log $log (tail -f $log)"
else
  # shellcheck disable=SC2086  # $target is a function name plus its stage argument
  $target "${extra[@]}"
fi
