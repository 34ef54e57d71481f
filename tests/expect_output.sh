#!/bin/sh
# expect_output.sh PATTERN COMMAND [ARG...]
# Runs COMMAND and passes only when it exits 0 and its output (stdout and stderr) has a line
# matching PATTERN (grep -E). CTest's PASS_REGULAR_EXPRESSION alone ignores the exit status: an
# example that printed the expected line and then threw passed. Exit status 77 (a skip) passes
# through.
pattern=$1
shift
out=$("$@" 2>&1)
rc=$?
printf '%s\n' "$out"
if [ "$rc" -ne 0 ]; then
  echo "expect_output: '$1' exited with status $rc" >&2
  exit "$rc"
fi
if ! printf '%s\n' "$out" | grep -Eq -- "$pattern"; then
  echo "expect_output: no line of the output matches '$pattern'" >&2
  exit 1
fi
