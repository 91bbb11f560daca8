#!/usr/bin/env bash
# Launch one of the paper's tables as a Hydra multirun (definitions: conf/sweep/tableN.yaml).
#
#   sweeps/run_table.sh table2                      # jobs one after another on this machine
#   sweeps/run_table.sh table2 local                # submitit: one process per job, in parallel
#   sweeps/run_table.sh table2 slurm hydra.launcher.partition=gpu
#   sweeps/run_table.sh table1 slurm model.pretrained=/weights/ViT-B-16.pt data_root=/data
#
# Relaunching the same command resumes: variants with a finished result.json (same result
# key) under the sweep directory are skipped. Then: python analysis/make_tables.py
# On SLURM the launcher prints the array job id and its log folder (<sweep dir>/.submitit):
# squeue -j <id> follows it, scancel <id> stops it; a job that hits its time limit is
# requeued and skips what it had finished (README: "Running on SLURM").
set -euo pipefail
table=${1:?usage: sweeps/run_table.sh table1|table2|table3|table4 [basic|local|slurm] [overrides...]}
launcher=${2:-basic}
shift $(( $# >= 2 ? 2 : 1 ))
case "$launcher" in
  basic) launch=() ;;
  local) launch=(hydra/launcher=local) ;;
  slurm) launch=(hydra/launcher=slurm) ;;
  *) echo "unknown launcher '$launcher': use basic, local or slurm" >&2; exit 2 ;;
esac
exec python -m sclip_lab.run -m "+sweep=$table" "${launch[@]}" "$@"
