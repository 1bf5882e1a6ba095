#!/usr/bin/env bash
# Command-line options for the recipes, after WeNet's tools/parse_options.sh (rewritten here).
# Source it after setting the defaults: every `--name value` (or `--name=value`) sets the shell
# variable `name` (hyphens become underscores: --stop-stage 3 sets stop_stage), which must exist
# already; `--help` prints the variables with their current values. Arguments after the options
# are left in "$@".
#
#   stage=0; stop_stage=6
#   . "$(dirname "$0")/../parse_options.sh"
_po_usage() {
  echo "usage: $0 [--option value ...]; options (current value):" >&2
  for _po_name in $_po_names; do echo "  --${_po_name//_/-} ${!_po_name}" >&2; done
}
# The variables a caller may set: those assigned at the start of a line of the script and
# already set when this file is sourced.
_po_names=""
for _po_name in $(sed -n 's/^\([a-z][a-z0-9_]*\)=.*/\1/p' "$0" | awk '!seen[$0]++'); do
  if [ -n "${!_po_name+set}" ]; then _po_names="$_po_names $_po_name"; fi
done
while [ $# -gt 0 ]; do
  case "$1" in
    --help|-h) _po_usage; exit 0 ;;
    --*=*) _po_key=${1%%=*}; _po_value=${1#*=}; shift ;;
    --*)
      _po_key=$1
      if [ $# -lt 2 ]; then echo "$0: option $1 needs a value" >&2; exit 1; fi
      _po_value=$2; shift 2 ;;
    *) break ;;
  esac
  _po_name=${_po_key#--}; _po_name=${_po_name//-/_}
  if ! [[ " $_po_names " == *" $_po_name "* ]]; then
    echo "$0: unknown option $_po_key" >&2; _po_usage; exit 1
  fi
  printf -v "$_po_name" '%s' "$_po_value"
done
unset _po_key _po_value _po_name
