#!/usr/bin/env bash
# The mini_qwen pipeline, in order. Each stage starts only after the one it depends on has finished.
#
#   bash run.sh demo                          tiny CPU run: PT -> SFT -> DPO -> eval report (a few minutes)
#   bash run.sh pt|sft|dpo [--gpus N] [--bg] [extra --flags for the stage]
#   bash run.sh all [--gpus N] [--bg]         full recipe: PT -> SFT -> DPO -> eval report
#   bash run.sh eval [mini_qwen_eval.py flags]
#   bash run.sh ablation [utils/ablation.py flags]   the original's pt1-pt3 experiments plus pt4, overlaid
#
# --gpus N  runs the stage under `accelerate launch` with N processes (DeepSpeed ZeRO-2, accelerate_config.yaml);
#           without it, plain `python` on one GPU (or the CPU).
# --ddp     with --gpus: plain DDP (accelerate_config_ddp.yaml) instead of ZeRO-2, for 40-80 GB GPUs.
# --lean    pretraining with configs/pt_lean.yaml (bf16 weights and moments, checkpointing): one 16 GB GPU.
# --bg      runs under nohup, logging to logs/output_<stage>.log, and prints the log path and the pid.
set -euo pipefail
cd "$(dirname "$0")"

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

[[ $# -ge 1 ]] || usage 1
command=$1
shift
gpus=1
background=0
accelerate_config=accelerate_config.yaml
pt_recipe=pt
extra=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --gpus) gpus=$2; shift 2 ;;
    --gpus=*) gpus=${1#--gpus=}; shift ;;
    --bg) background=1; shift ;;
    --ddp) accelerate_config=accelerate_config_ddp.yaml; shift ;;
    --lean) pt_recipe=pt_lean; shift ;;
    -h|--help) usage 0 ;;
    *) extra+=("$1"); shift ;;
  esac
done
[[ $gpus =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: --gpus needs a positive number, got '$gpus'" >&2; exit 2; }

launcher() {
  if [[ $gpus -gt 1 ]]; then
    echo accelerate launch --config_file "$accelerate_config" --num_processes "$gpus"
  else
    echo python
  fi
}

stage() {  # stage NAME [flags...]: one training stage with its YAML recipe
  local name=$1 recipe=$1
  shift
  [[ $name == pt ]] && recipe=$pt_recipe
  # shellcheck disable=SC2046  # the launcher's words are meant to split
  $(launcher) "mini_qwen_$name.py" --config "configs/$recipe.yaml" "$@"
}

demo() {
  python demo/demo_pt.py "$@"
  python demo/demo_sft.py
  python demo/demo_dpo.py
  python mini_qwen_eval.py --model_path results/demo/pt results/demo/sft results/demo/dpo --prompts default \
    --max_new_tokens 48 --output_dir results/demo/eval
  echo "demo finished: checkpoints and loss.png in results/demo/{pt,sft,dpo}, report in results/demo/eval/report.md"
}

all() {
  stage pt "$@"
  stage sft
  stage dpo
  python mini_qwen_eval.py --model_path results/pt results/sft results/dpo --prompts default --output_dir results/eval
}

case $command in
  demo|all) target=$command ;;
  pt|sft|dpo) target="stage $command" ;;
  eval) target="python mini_qwen_eval.py" ;;
  ablation) target="python utils/ablation.py" ;;
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
  nohup bash "$0" "$command" --gpus "$gpus" "${flags[@]}" "${extra[@]}" > "$log" 2>&1 &
  echo "started '$command' in the background: pid $!, log $log (tail -f $log)"
else
  # shellcheck disable=SC2086  # $target is a function name plus its stage argument
  $target "${extra[@]}"
fi
