#!/usr/bin/env bash
# prepare.sh: download the real data and model files that the full mini_qwen recipe uses, with the
# ModelScope CLI (`modelscope download`). Run `bash prepare.sh --help` for usage; `--dry-run` prints the
# plan without touching the network. The demo configs (configs/demo_*.yaml) use mini_data/ and need nothing
# from here. The Python packages for a GPU machine without internet: `python -m tools.deps wheels DIR`.
#
# Resumable: every item gets a `.prepare_done` marker in its target folder once its download has succeeded
# and been checked; items with a marker are skipped, and modelscope resumes partially downloaded files.
set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
cd -- "$SCRIPT_DIR"

# ----------------------------------------------------------------------------------------------------------
# What the recipe uses (edit here)
# ----------------------------------------------------------------------------------------------------------

# Pretraining (configs/pt.yaml): IndustryCorpus2, high-quality tier, 10 industries x {chinese, english}.
PT_REPO="BAAI/IndustryCorpus2"
PT_TIER="high"
PT_LANGUAGES=(chinese english)
PT_INDUSTRIES=(
    accommodation_catering_hotel
    artificial_intelligence_machine_learning
    computer_communication
    computer_programming_code
    film_entertainment
    literature_emotion
    news_media
    tourism_geography
    current_affairs_government_administration
    mathematics_statistics
)
# The five largest English folders (8.9 to 42 GB each) are too big to take whole: from each of these
# industry/language folders only the first PT_FIRST_N files are fetched (rank_*.parquet, sorted by name),
# as the original mini_qwen did (its prepare.sh and README data table, ~16B tokens in all).
PT_FIRST_N=3
PT_FIRST_N_FILES_ONLY=(
    mathematics_statistics/english
    current_affairs_government_administration/english
    computer_communication/english
    literature_emotion/english
    film_entertainment/english
)
PT_APPROX_MB_PER_FILE=520   # a rank_*.parquet file of the high tier is ~0.5 GB

# SFT (configs/sft.yaml): Infinity-Instruct subsets 7M and Gen (folders of parquet files).
SFT_REPO="BAAI/Infinity-Instruct"
SFT_SUBSETS=(7M Gen)

# DPO (configs/dpo.yaml): Infinity-Preference, train + test parquet.
DPO_REPO="BAAI/Infinity-Preference"

# Tokenizer and configs of the base model (no weights: mini_qwen trains from scratch).
MODEL_REPO="Qwen/Qwen2.5-0.5B-Instruct"
MODEL_FILES=(config.json generation_config.json tokenizer.json tokenizer_config.json vocab.json merges.txt)

# Evaluation sets for the benchmark harness, whole repositories, as they are on ModelScope.
# These ids are the ones OpenCompass lists as its ModelScope sources (opencompass/ceval-exam is also linked
# from ModelScope download URLs); not verified against the hub from here, and their file layout (csv folders
# or zip archives) is not checked: if one has moved, fix the id here.
EVAL_SETS=(
    "ceval opencompass/ceval-exam"
    "cmmlu opencompass/cmmlu"
    "mmlu opencompass/mmlu"
)

# GRPO (math word problems with a checkable final number): "NAME REPO INCLUDE", each into data/grpo/NAME/.
# gsm8k: AI-ModelScope/gsm8k, English GSM8K. Verified as a ModelScope dataset id on EvalScope's benchmark page
#   (https://evalscope.readthedocs.io/en/v1.6.0/benchmarks/gsm8k.html, "GSM8K": "Dataset ID AI-ModelScope/gsm8k",
#   subset main, train split "train", evaluation split "test"); EvalScope's gsm8k adapter (dataset_id) and a verl
#   tutorial (`modelscope download --dataset AI-ModelScope/gsm8k`, linking
#   https://www.modelscope.cn/datasets/AI-ModelScope/gsm8k) name the same id. Columns: question, answer (a worked
#   solution with <<a*b=c>> calculator notes, last line "#### <number>"). Subsets main and socratic, one folder
#   each; only main/ is fetched (train + test). That the folders hold parquet files ("Convert dataset to
#   Parquet", 3 Jan 2025) comes from a third-party write-up, not from the hub itself; the file names inside
#   main/ (on Hugging Face: train-00000-of-00001.parquet, test-00000-of-00001.parquet) are not verified.
# gsm8k_zh: testUser/GSM8K_zh, a Chinese GSM8K (a GPT-3.5 translation, one loader says; its column names are
#   those code uses for meta-math/GSM8K_zh on Hugging Face, so likely a copy; not checked). Its modelscope.cn
#   page itself was not found; the id is verified from a tutorial README that links it as a ModelScope dataset
#   (https://modelscope.cn/datasets/testUser/GSM8K_zh/summary, SwanLab "easy r1" Qwen-R1-Zero GRPO example),
#   code that loads it with MsDataset.load('testUser/GSM8K_zh', subset_name='default', split='train'), and a
#   script that fetches https://modelscope.cn/datasets/testUser/GSM8K_zh/resolve/master/GSM8K_zh.json. That one
#   file holds both splits (column split: train 7473 / test 1319, per one third-party loader; not checked). Its
#   columns are NOT question/answer in Chinese: question_zh (the Chinese question), answer_zh (the Chinese
#   solution, with no "#### <number>" line, per the same loader), answer_only (the final number), split, and
#   question / answer (presumably GSM8K's English originals; not checked). A GRPO loader must read question_zh
#   and answer_only (and may append "#### <answer_only>" to answer_zh).
GRPO_SETS=(
    "gsm8k AI-ModelScope/gsm8k main/*.parquet"
    "gsm8k_zh testUser/GSM8K_zh GSM8K_zh.json"
)

# APPROXIMATE download sizes in MB: estimates, not measured by this script. IndustryCorpus2 and
# Infinity-Instruct/-Preference: the sizes in the original mini_qwen README (pt: whole high-tier folders;
# folders in PT_FIRST_N_FILES_ONLY count PT_FIRST_N x PT_APPROX_MB_PER_FILE instead). Model, eval and grpo
# sets: rough guesses (grpo:gsm8k: openai/gsm8k's Hugging Face card gives main a download_size of ~2.7 MB).
# Used for the --dry-run plan and the free-disk-space check.
APPROX_SIZE_MB='
pt:accommodation_catering_hotel/chinese                 371
pt:accommodation_catering_hotel/english                 718
pt:artificial_intelligence_machine_learning/chinese     267
pt:artificial_intelligence_machine_learning/english    1600
pt:computer_communication/chinese                      5100
pt:computer_communication/english                     13000
pt:computer_programming_code/chinese                    273
pt:computer_programming_code/english                    512
pt:film_entertainment/chinese                          2200
pt:film_entertainment/english                          8900
pt:literature_emotion/chinese                          4500
pt:literature_emotion/english                         12000
pt:news_media/chinese                                   319
pt:news_media/english                                  3100
pt:tourism_geography/chinese                           1900
pt:tourism_geography/english                           3100
pt:current_affairs_government_administration/chinese   8700
pt:current_affairs_government_administration/english  35000
pt:mathematics_statistics/chinese                       172
pt:mathematics_statistics/english                     42000
sft:7M                                                 5700
sft:Gen                                                2700
dpo                                                     210
model                                                    12
eval:ceval                                               20
eval:cmmlu                                               20
eval:mmlu                                               250
grpo:gsm8k                                                3
grpo:gsm8k_zh                                            15
'

ALL_PARTS=(pt sft dpo model eval grpo)
MARKER=".prepare_done"
DISK_MARGIN_PERCENT=10      # free space needed: planned total + 10% + 1 GB
DISK_MARGIN_MB=1000
NETWORK_CHECK_SECONDS=20    # connectivity check before the first download
LIST_TIMEOUT_SECONDS="${PREPARE_LIST_TIMEOUT:-300}"   # listing a folder's files (first-N rule)

usage() {
    cat <<EOF
Usage: bash prepare.sh [--only PART[,PART...]]... [--dry-run] [--force] [-h|--help]

Downloads the data and model files of the full mini_qwen recipe from ModelScope (modelscope CLI):
  pt     BAAI/IndustryCorpus2, high tier, 10 industries x chinese/english  -> data/pt/<industry>/<language>/high/
         (the five largest English folders: only the first ${PT_FIRST_N} files, see PT_FIRST_N_FILES_ONLY)
  sft    BAAI/Infinity-Instruct subsets 7M and Gen                          -> data/sft/7M, data/sft/Gen
  dpo    BAAI/Infinity-Preference train and test                            -> data/dpo/
  model  Qwen/Qwen2.5-0.5B-Instruct configs and tokenizer files, no weights -> models/Qwen2.5-0.5B-Instruct/
  eval   C-Eval, CMMLU, MMLU (benchmark sets)                               -> data/eval/{ceval,cmmlu,mmlu}/
  grpo   GSM8K (AI-ModelScope/gsm8k, main) and GSM8K_zh (testUser/GSM8K_zh) -> data/grpo/{gsm8k,gsm8k_zh}/
Without --only, every part is fetched (~50 GB in all, mostly pt; see --dry-run).

Options:
  --only PART   fetch only these parts (pt, sft, dpo, model, eval, grpo); repeatable or comma-separated
  --dry-run     print the plan (what, source, include pattern, target, approximate size) and a total, then
                exit; needs neither network nor modelscope
  --force       skip the free-disk-space check
  -h, --help    show this help

Resumable: a finished item leaves a ${MARKER} file in its target folder and is skipped next time; rerun
after an interruption, and modelscope resumes partial files. Paths are relative to this script's folder.
EOF
}

die() {
    printf 'prepare.sh: %s\n' "$*" >&2
    exit 1
}

log() {
    printf '%s\n' "$*"
}

# ----------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------
DRY_RUN=0
FORCE=0
SELECTED=()

add_parts() {
    local value=$1 part p known
    local parts=()
    [[ -n "$value" ]] || { printf 'prepare.sh: --only needs a value (%s)\n' "${ALL_PARTS[*]}" >&2; exit 2; }
    IFS=',' read -ra parts <<< "$value"
    for part in "${parts[@]}"; do
        known=0
        for p in "${ALL_PARTS[@]}"; do
            [[ "$part" == "$p" ]] && known=1
        done
        if (( ! known )); then
            printf "prepare.sh: unknown --only value '%s' (choose from: %s)\n" "$part" "${ALL_PARTS[*]}" >&2
            exit 2
        fi
        SELECTED+=("$part")
    done
}

while (( $# )); do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --dry-run) DRY_RUN=1 ;;
        --force) FORCE=1 ;;
        --only)
            (( $# >= 2 )) || add_parts ""
            add_parts "$2"
            shift
            ;;
        --only=*) add_parts "${1#--only=}" ;;
        *) printf "prepare.sh: unknown option '%s' (see bash prepare.sh --help)\n" "$1" >&2; exit 2 ;;
    esac
    shift
done
(( ${#SELECTED[@]} )) || SELECTED=("${ALL_PARTS[@]}")

part_selected() {
    local p
    for p in "${SELECTED[@]}"; do
        [[ "$p" == "$1" ]] && return 0
    done
    return 1
}

# ----------------------------------------------------------------------------------------------------------
# The plan: one item per target folder
# ----------------------------------------------------------------------------------------------------------
I_PART=(); I_LABEL=(); I_TYPE=(); I_REPO=(); I_INCLUDE=(); I_LOCAL=(); I_TARGET=(); I_MB=(); I_FIRST_N=()

approx_mb() {
    local key k v
    key=$1
    while read -r k v; do
        if [[ -n "$k" && "$k" == "$key" ]]; then
            printf '%s\n' "$v"
            return 0
        fi
    done <<< "$APPROX_SIZE_MB"
    printf '0\n'   # unknown: counted as 0 and shown as "size unknown"
}

# add_item PART LABEL TYPE REPO INCLUDE LOCAL_DIR TARGET MB FIRST_N
# INCLUDE: space-separated glob patterns relative to the repository root ("" = the whole repository);
# with FIRST_N > 0, only the first FIRST_N files (sorted by name) that match INCLUDE are fetched.
# LOCAL_DIR: the --local-dir given to modelscope (repository paths are kept under it); TARGET: the folder
# that holds the item (and its marker).
add_item() {
    I_PART+=("$1"); I_LABEL+=("$2"); I_TYPE+=("$3"); I_REPO+=("$4"); I_INCLUDE+=("$5")
    I_LOCAL+=("$6"); I_TARGET+=("$7"); I_MB+=("$8"); I_FIRST_N+=("$9")
}

build_plan() {
    local industry lang folder whole mb first_n key entry name repo subset include
    if part_selected pt; then
        for industry in "${PT_INDUSTRIES[@]}"; do
            for lang in "${PT_LANGUAGES[@]}"; do
                folder="$industry/$lang/$PT_TIER"
                whole=$(approx_mb "pt:$industry/$lang")
                first_n=0
                for key in "${PT_FIRST_N_FILES_ONLY[@]}"; do
                    [[ "$key" == "$industry/$lang" ]] && first_n=$PT_FIRST_N
                done
                if (( first_n > 0 )); then
                    mb=$(( first_n * PT_APPROX_MB_PER_FILE ))
                    (( whole > 0 && whole < mb )) && mb=$whole
                    add_item pt "pretraining $folder" dataset "$PT_REPO" "$folder/rank_*.parquet" \
                        data/pt "data/pt/$folder" "$mb" "$first_n"
                else
                    add_item pt "pretraining $folder" dataset "$PT_REPO" "$folder/*.parquet" \
                        data/pt "data/pt/$folder" "$whole" 0
                fi
            done
        done
    fi
    if part_selected sft; then
        for subset in "${SFT_SUBSETS[@]}"; do
            add_item sft "SFT subset $subset" dataset "$SFT_REPO" "$subset/*.parquet" \
                data/sft "data/sft/$subset" "$(approx_mb "sft:$subset")" 0
        done
    fi
    if part_selected dpo; then
        add_item dpo "preference pairs (train + test)" dataset "$DPO_REPO" "*.parquet" \
            data/dpo data/dpo "$(approx_mb dpo)" 0
    fi
    if part_selected model; then
        add_item model "base model configs + tokenizer (no weights)" model "$MODEL_REPO" "${MODEL_FILES[*]}" \
            models/Qwen2.5-0.5B-Instruct models/Qwen2.5-0.5B-Instruct "$(approx_mb model)" 0
    fi
    if part_selected eval; then
        for entry in "${EVAL_SETS[@]}"; do
            read -r name repo <<< "$entry"
            add_item eval "benchmark $name" dataset "$repo" "" \
                "data/eval/$name" "data/eval/$name" "$(approx_mb "eval:$name")" 0
        done
    fi
    if part_selected grpo; then
        for entry in "${GRPO_SETS[@]}"; do
            read -r name repo include <<< "$entry"
            add_item grpo "math word problems $name" dataset "$repo" "$include" \
                "data/grpo/$name" "data/grpo/$name" "$(approx_mb "grpo:$name")" 0
        done
    fi
}

fmt_mb() {
    local mb=$1
    if (( mb >= 1000 )); then
        printf '%d.%d GB' $(( mb / 1000 )) $(( (mb % 1000) / 100 ))
    else
        printf '%d MB' "$mb"
    fi
}

is_done() {
    [[ -f "${I_TARGET[$1]}/$MARKER" ]]
}

print_plan() {
    local i n total=0 left=0 done_count=0 size status include
    n=${#I_PART[@]}
    if (( DRY_RUN )); then
        log "prepare.sh plan (dry run: nothing is downloaded); parts: ${SELECTED[*]}"
    else
        log "prepare.sh plan; parts: ${SELECTED[*]}"
    fi
    for (( i = 0; i < n; i++ )); do
        if (( I_MB[i] > 0 )); then size="~$(fmt_mb "${I_MB[i]}")"; else size="size unknown"; fi
        status=""
        if is_done "$i"; then
            status="  [done: $MARKER present, skipped]"
            done_count=$(( done_count + 1 ))
        else
            left=$(( left + I_MB[i] ))
        fi
        total=$(( total + I_MB[i] ))
        include=${I_INCLUDE[i]:-"(whole repository)"}
        if (( I_FIRST_N[i] > 0 )); then
            include="$include  (first ${I_FIRST_N[i]} files only, sorted by name)"
        fi
        log "[${I_PART[i]}] ${I_LABEL[i]}  ${size}${status}"
        log "      source:  ${I_TYPE[i]} ${I_REPO[i]}"
        log "      include: $include"
        log "      target:  ${I_TARGET[i]}/"
    done
    log "total: $n items, ~$(fmt_mb "$total") (approximate); $done_count already done, ~$(fmt_mb "$left") left to download"
    TOTAL_LEFT_MB=$left
}

# ----------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------
require_modelscope() {
    local hint="pip install modelscope"
    [[ -f requirements.txt ]] && hint="pip install -r requirements.txt"
    command -v modelscope >/dev/null 2>&1 || die "modelscope not installed (no 'modelscope' command on PATH): $hint"
    local help
    help=$(modelscope download --help 2>&1) || die "'modelscope download --help' failed: reinstall modelscope ($hint)"
    # Flags differ between modelscope versions: prefer the documented ones, fall back to the legacy ones.
    if [[ "$help" == *--repo-type* ]]; then MS_REPO_TYPE_FLAG=1; else MS_REPO_TYPE_FLAG=0; fi
    if [[ "$help" == *--local-dir* ]]; then MS_LOCAL_DIR_FLAG="--local-dir"; else MS_LOCAL_DIR_FLAG="--local_dir"; fi
}

# Nearest existing folder of a path, so that df works before the target exists.
existing_parent() {
    local p=$1
    while [[ ! -d "$p" ]]; do
        p=$(dirname -- "$p")
    done
    printf '%s\n' "$p"
}

check_disk() {
    local i n dir mount avail_kb need have_kb existing_kb fs j found
    local mounts=() needs=() avails=()
    n=${#I_PART[@]}
    for (( i = 0; i < n; i++ )); do
        is_done "$i" && continue
        need=${I_MB[i]}
        if [[ -d "${I_TARGET[i]}" ]]; then   # a partial download already holds part of it
            existing_kb=$(du -sk -- "${I_TARGET[i]}" 2>/dev/null | { read -r kb _ && printf '%s' "$kb"; }) || existing_kb=0
            need=$(( need - ${existing_kb:-0} / 1000 ))
            (( need < 0 )) && need=0
        fi
        dir=$(existing_parent "${I_TARGET[i]}")
        { read -r _; read -r fs _ _ avail_kb _ mount; } < <(df -Pk -- "$dir") \
            || die "cannot read free disk space of $dir (df failed); pass --force to skip this check"
        [[ -n "$mount" ]] || mount=$fs
        found=-1
        for (( j = 0; j < ${#mounts[@]}; j++ )); do
            [[ "${mounts[j]}" == "$mount" ]] && found=$j
        done
        if (( found < 0 )); then
            mounts+=("$mount"); needs+=("$need"); avails+=("$avail_kb")
        else
            needs[found]=$(( needs[found] + need ))
        fi
    done
    for (( j = 0; j < ${#mounts[@]}; j++ )); do
        need=$(( needs[j] + needs[j] * DISK_MARGIN_PERCENT / 100 + DISK_MARGIN_MB ))
        have_kb=${avails[j]}
        if (( have_kb / 1000 < need )); then
            die "not enough free disk space on ${mounts[j]}: need ~$(fmt_mb "$need") (~$(fmt_mb "${needs[j]}") planned + ${DISK_MARGIN_PERCENT}% + $(fmt_mb "$DISK_MARGIN_MB") margin), have $(fmt_mb $(( have_kb / 1000 ))); free space, pick parts with --only, or pass --force to skip this check"
        fi
    done
}

check_network() {
    local endpoint="${MODELSCOPE_ENDPOINT:-https://www.modelscope.cn}"
    [[ "$endpoint" == http://* || "$endpoint" == https://* ]] || endpoint="https://$endpoint"
    if command -v curl >/dev/null 2>&1; then
        curl -sS -o /dev/null -I --connect-timeout 10 --max-time "$NETWORK_CHECK_SECONDS" -- "$endpoint" >/dev/null 2>&1 \
            || die "cannot reach $endpoint within ${NETWORK_CHECK_SECONDS}s: no network? (check the connection or proxy, or set MODELSCOPE_ENDPOINT) then rerun prepare.sh"
    fi   # without curl, modelscope's own timeouts and retries report a missing network (~30 s)
}

# The Python interpreter that runs modelscope (for listing a folder's files).
ms_python() {
    local ms line words cand
    local cands=()
    [[ -n "${PYTHON:-}" ]] && cands+=("$PYTHON")
    ms=$(command -v modelscope)
    if IFS= read -r line < "$ms" && [[ "$line" == '#!'* ]]; then
        read -ra words <<< "${line#'#!'}"
        if [[ "${words[0]:-}" == */env && -n "${words[1]:-}" ]]; then cands+=("${words[1]}"); else cands+=("${words[0]:-}"); fi
    fi
    cands+=(python3 python)
    for cand in "${cands[@]}"; do
        [[ -n "$cand" && "$cand" == *python* ]] || continue
        if "$cand" -c 'import modelscope.hub.api' >/dev/null 2>&1; then
            printf '%s\n' "$cand"
            return 0
        fi
    done
    return 1
}

# Print the first N files (sorted by name) of FOLDER in dataset REPO whose names match GLOB.
list_first_files() {
    local repo=$1 folder=$2 glob=$3 n=$4 py
    local runner=()
    if ! py=$(ms_python); then
        printf 'prepare.sh: cannot import modelscope from python3 (needed to list %s/%s)\n' "$repo" "$folder" >&2
        return 1
    fi
    command -v timeout >/dev/null 2>&1 && runner=(timeout "$LIST_TIMEOUT_SECONDS")
    "${runner[@]}" "$py" - "$repo" "$folder" "$glob" "$n" <<'PY'
import fnmatch
import posixpath
import sys

from modelscope.hub.api import HubApi

repo, folder, glob, n = sys.argv[1], sys.argv[2].strip("/"), sys.argv[3], int(sys.argv[4])
api = HubApi()


def list_paths(root):
    paths, previous = [], None
    for page in range(1, 1000):
        files = api.get_dataset_files(repo, root_path=root, recursive=True, page_number=page, page_size=200)
        if not files or files == previous:
            break
        previous = files
        for f in files:
            if (f.get("Type") or f.get("type") or "blob") != "tree":
                paths.append((f.get("Path") or f.get("path") or "").lstrip("/"))
    return paths


found = []
try:
    for root in (folder, "/" + folder, "/"):
        found = sorted({p for p in list_paths(root)
                        if posixpath.dirname(p) == folder and fnmatch.fnmatch(posixpath.basename(p), glob)})
        if found:
            break
except Exception as err:  # one line, not a traceback: prepare.sh adds what to do
    sys.exit(f"prepare.sh: listing {repo}/{folder}: {type(err).__name__}: {str(err)[:300]}")
if not found:
    sys.exit(f"prepare.sh: no file matching {folder}/{glob} in {repo}")
print("\n".join(found[:n]))
PY
}

# ----------------------------------------------------------------------------------------------------------
# Download
# ----------------------------------------------------------------------------------------------------------
has_glob() {
    [[ "$1" == *[\*\?\[]* ]]
}

download_item() {
    local i=$1 pattern file listing exact_ok
    local repo=${I_REPO[i]} local_dir=${I_LOCAL[i]} target=${I_TARGET[i]} label=${I_LABEL[i]}
    local patterns=() cmd=(modelscope download)
    log ""
    log "==> [${I_PART[i]}] $label: ${I_TYPE[i]} $repo -> $target/"
    mkdir -p -- "$local_dir" "$target"

    if (( I_FIRST_N[i] > 0 )); then
        pattern=${I_INCLUDE[i]}
        listing=$(list_first_files "$repo" "$(dirname -- "$pattern")" "$(basename -- "$pattern")" "${I_FIRST_N[i]}") \
            || die "listing the files of $repo/$(dirname -- "$pattern") failed: no network? rerun prepare.sh to resume"
        while IFS= read -r file; do
            [[ -n "$file" ]] && patterns+=("$file")
        done <<< "$listing"
        log "    first ${I_FIRST_N[i]} files: ${patterns[*]}"
    elif [[ -n "${I_INCLUDE[i]}" ]]; then
        read -ra patterns <<< "${I_INCLUDE[i]}"
    fi

    if (( MS_REPO_TYPE_FLAG )); then
        cmd+=(--repo-type "${I_TYPE[i]}" "$repo")
    else
        cmd+=("--${I_TYPE[i]}" "$repo")
    fi
    (( ${#patterns[@]} )) && cmd+=(--include "${patterns[@]}")
    cmd+=("$MS_LOCAL_DIR_FLAG" "$local_dir")
    log "    ${cmd[*]}"
    "${cmd[@]}" || die "download of $repo ($label) failed: no network? rerun prepare.sh to resume"

    # Check that what the recipe needs arrived before marking the item done.
    exact_ok=1
    if (( ${#patterns[@]} )); then
        for pattern in "${patterns[@]}"; do
            if has_glob "$pattern"; then
                file=$(find "$target" -type f -name "$(basename -- "$pattern")" -not -path '*/._____temp/*' -print -quit)
            elif [[ -f "$local_dir/$pattern" ]]; then
                file="$local_dir/$pattern"
            else
                file=""
            fi
            if [[ -z "$file" ]]; then
                exact_ok=0
                break
            fi
        done
    else
        file=$(find "$target" -type f -not -name '.*' -print -quit)
        [[ -n "$file" ]] || { exact_ok=0; pattern="(any file)"; }
    fi
    (( exact_ok )) || die "download of $repo ($label) ended, but nothing matching '$pattern' is in $target/: has the repository layout changed? see https://www.modelscope.cn/${I_TYPE[i]}s/$repo"

    {
        printf 'source: %s %s\n' "${I_TYPE[i]}" "$repo"
        printf 'include: %s\n' "${patterns[*]:-(whole repository)}"
        printf 'finished: %s\n' "$(date -u '+%Y-%m-%dT%H:%M:%SZ')"
    } > "$target/$MARKER"
    log "    done ($target/$MARKER written)"
}

main() {
    local i n pending=0
    build_plan
    print_plan
    if (( DRY_RUN )); then
        log "dry run: nothing was downloaded"
        return 0
    fi
    n=${#I_PART[@]}
    for (( i = 0; i < n; i++ )); do
        is_done "$i" || pending=$(( pending + 1 ))
    done
    if (( pending == 0 )); then
        log "nothing to do: every selected item is already done"
        return 0
    fi
    require_modelscope
    if (( FORCE )); then
        log "--force: free-disk-space check skipped"
    else
        check_disk
    fi
    check_network
    for (( i = 0; i < n; i++ )); do
        if is_done "$i"; then
            log "skip [${I_PART[i]}] ${I_LABEL[i]}: already done"
            continue
        fi
        download_item "$i"
    done
    log ""
    log "all selected items are done (~$(fmt_mb "$TOTAL_LEFT_MB") approximate downloaded)"
}

main
