# Sourced by the launchers: finds the repository and the Python that has fedpft-dist installed.
#   FEDPFT_PYTHON  interpreter to use (default: the repository's .venv, else python3 on PATH)
FEDPFT_HOME=${FEDPFT_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
if [ -z "${FEDPFT_PYTHON:-}" ]; then
  if [ -x "$FEDPFT_HOME/.venv/bin/python" ]; then FEDPFT_PYTHON=$FEDPFT_HOME/.venv/bin/python
  else FEDPFT_PYTHON=$(command -v python3); fi
fi
export FEDPFT_HOME FEDPFT_PYTHON
