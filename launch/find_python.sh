# Sourced by the launch scripts: sets `python` to the interpreter u2moe is installed in, so that a
# launch works without an activated environment. In order: $PYTHON; the .venv next to the
# repository (setup.sh's); the environment of the `u2moe` command on PATH; python3.
# Needs `repo_dir` (the repository root) set by the caller.
find_python() {
  local u2moe_bin
  if [ -n "${PYTHON:-}" ]; then python=$PYTHON; return; fi
  if [ -x "$repo_dir/.venv/bin/python" ]; then python=$repo_dir/.venv/bin/python; return; fi
  if u2moe_bin=$(command -v u2moe); then
    # A virtual environment's scripts sit beside its interpreter.
    for python in "$(dirname "$u2moe_bin")"/python3 "$(dirname "$u2moe_bin")"/python; do
      [ -x "$python" ] && return
    done
    # Elsewhere (a system or user install), the script's own #! line names it.
    python=$(sed -n '1s/^#!//p' "$u2moe_bin")
    [ -n "$python" ] && [ -x "$python" ] && return
  fi
  python=python3
}
find_python
