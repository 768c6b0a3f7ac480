#!/usr/bin/env bash
# ProtoNets on TDC Metabolism with the assignment's configuration.
# Usage: ./run_bio.sh [DIR]; DIR defaults to $DATADIR, else ./data/metabolism. DIR holds
# metabolism_data_new.pkl or the raw TDC files; run_metabolism.py builds the pickle from the
# files on its first run, downloading the missing ones (or copying them from $TDC_MIRROR).
set -euo pipefail
datadir="${1:-${DATADIR:-./data/metabolism}}"
if [[ ! -d "$datadir" ]]; then
    echo "run_bio.sh: $datadir does not exist yet; run_metabolism.py will download the TDC" \
         "files into it (set TDC_MIRROR to a folder holding them to copy them instead)." >&2
fi
exec python3 "$(dirname "$0")/run_metabolism.py" --num_way 2 --num_support 5 --num_query 10 \
    --batch_size 4 --num_train_iterations 8000 --learning_rate 0.0005 --datadir "$datadir" \
    --device gpu
