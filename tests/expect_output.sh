#!/bin/sh
# expect_output.sh PATTERN COMMAND [ARG...]
# Runs COMMAND and passes only when it exits 0 and its output (stdout and stderr) has a line
# matching PATTERN (grep -E). CTest's PASS_REGULAR_EXPRESSION alone ignores the exit status: an
# example that printed the expected line and then threw passed. Exit status 77 (a skip) passes
# through. The output is passed on as it comes, so that a test stopped at its timeout still
# shows how far it got.
pattern=$1
shift
dir=$(mktemp -d) || exit 1
trap 'rm -rf "$dir"' EXIT
# Runs once the command ends, when the signal was sent to this shell alone.
trap 'exit 143' TERM
trap 'exit 130' INT
{
  "$@" 2>&1
  echo $? >"$dir/status"
} | tee "$dir/output"
rc=$(cat "$dir/status" 2>/dev/null)
if [ -z "$rc" ]; then
  echo "expect_output: '$1' ended without an exit status (killed with the pipeline?)" >&2
  exit 1
fi
if [ "$rc" -eq 77 ]; then
  exit 77
fi
if [ "$rc" -ne 0 ]; then
  echo "expect_output: '$1' exited with status $rc" >&2
  exit "$rc"
fi
if ! grep -Eq -- "$pattern" "$dir/output"; then
  echo "expect_output: no line of the output matches '$pattern'" >&2
  exit 1
fi
