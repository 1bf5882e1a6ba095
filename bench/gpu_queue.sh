#!/usr/bin/env bash
# Run benchmark jobs on this machine's GPUs, as many at once as the cards allow (bench/jobs/ holds
# job files for it).
#
#   bench/gpu_queue.sh JOBS LOGDIR
# JOBS: one job a line, "<GPUs it needs> <shell command>" ('#' lines and blank lines skipped).
# Jobs start in file order, each as soon as enough cards are free (a job waits for the ones
# before it), with CUDA_VISIBLE_DEVICES set to its cards, MASTER_PORT to a port of its own
# (29500 + line number) and its output in LOGDIR/job<line>.log. Waits for every job; the exit
# status is the number of jobs that failed. $GPU_COUNT overrides the number of cards found.
set -uo pipefail
jobs_file=$1; logdir=$2
mkdir -p "$logdir"
total=${GPU_COUNT:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[ "$total" -gt 0 ] || { echo "gpu_queue: no GPU found (GPU_COUNT overrides)" >&2; exit 2; }

needs=(); commands=(); lines=()
n=0
while IFS= read -r line || [ -n "$line" ]; do
  n=$((n + 1))
  [[ "$line" =~ ^[[:space:]]*(#|$) ]] && continue
  need=${line%%[[:space:]]*}
  if ! [[ "$need" =~ ^[0-9]+$ ]] || [ "$need" -lt 1 ] || [ "$need" -gt "$total" ]; then
    echo "gpu_queue: $jobs_file line $n: needs 1 to $total GPUs first, got '$need'" >&2; exit 2
  fi
  needs+=("$need"); commands+=("${line#"$need"}"); lines+=("$n")
done < "$jobs_file"

free=(); for ((g = 0; g < total; g++)); do free+=("$g"); done
declare -A cards_of  # running job's pid -> its cards
failed=0

finish_one() {  # wait for any running job, give its cards back
  local pid status
  wait -n -p pid; status=$?
  [ "$status" -eq 0 ] || failed=$((failed + 1))
  read -r -a back <<< "${cards_of[$pid]}"
  free+=("${back[@]}")
  unset "cards_of[$pid]"
}

for i in "${!commands[@]}"; do
  while [ "${#free[@]}" -lt "${needs[$i]}" ]; do finish_one; done
  mine=("${free[@]:0:${needs[$i]}}"); free=("${free[@]:${needs[$i]}}")
  visible=$(IFS=,; echo "${mine[*]}")
  log=$logdir/job${lines[$i]}.log
  echo "gpu_queue: line ${lines[$i]} on cards $visible:${commands[$i]}"
  CUDA_VISIBLE_DEVICES=$visible MASTER_PORT=$((29500 + lines[i])) bash -c "${commands[$i]}" > "$log" 2>&1 &
  cards_of[$!]="${mine[*]}"
done
while [ "${#cards_of[@]}" -gt 0 ]; do finish_one; done
echo "gpu_queue: ${#commands[@]} jobs, $failed failed"
exit "$failed"
