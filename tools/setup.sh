#!/usr/bin/env bash
# Installs everything speechssl needs on a fresh Debian machine (Python 3.10+, no GPU needed):
#   1. Debian packages: TTS engines + text for the demo corpus, sox, libsndfile;
#   2. a virtual environment at .venv (or $SPEECHSSL_VENV) with the exact versions in
#      tools/requirements-lock.txt and speechssl installed editable with its test extras.
# Safe to re-run: it only installs what is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

APT_PACKAGES=(espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts
              sox libsndfile1 fortunes fortunes-min wordnet-base wamerican)
VENV=${SPEECHSSL_VENV:-.venv}
PYTHON=${PYTHON:-python3}

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "[setup] installing Debian packages: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.speechssl-installed"
want="$(cat tools/requirements-lock.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing Python packages (torch is a large download the first time)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -c tools/requirements-lock.txt -e '.[test]'
  echo "$want" > "$stamp"
fi
"$VENV/bin/python" -c "import torch, torchaudio, speechssl; print(f'[setup] ok: torch {torch.__version__}, torchaudio {torchaudio.__version__}, speechssl {speechssl.__version__}')"
