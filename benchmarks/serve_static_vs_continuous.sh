#!/usr/bin/env bash
# dllm serve at LLaDA-8B's shape (random bf16 weights) under Poisson arrivals: the server before the step
# scheduler (static batching, main at dd209a1) against this checkout's (continuous), same arrivals, through
# benchmarks/serve_load.py (the official openai client; each run prints a table and a JSON last line, also written
# to $OUT/{static,continuous}/serve_load.json when OUT is set).
#
#   OUT=/tmp/out bash benchmarks/serve_static_vs_continuous.sh          # on a GPU; RATES, REQUESTS to change the load
#   MODES=continuous OUT=/tmp/out bash benchmarks/serve_static_vs_continuous.sh   # one half only
#   CONFIG=<dir with a smaller LLaDA config.json> DEVICE=cpu REQUESTS=4 bash benchmarks/serve_static_vs_continuous.sh
#
# Set-up it does: (1) a LLaDA-8B-shaped directory (the real config from tests/data/checkpoints) with a word-level
# tokenizer over its 126,464 ids, since the real configs ship no tokenizer.json and the old server cannot run
# without one; (2) the old server installed apart (pip --target) from STATIC_SRC, a directory holding that
# checkout (default: `git archive dd209a1` of this repository); (3) a wrapper interpreter for serve_load.py's
# --python whose sitecustomize gives every LLM of the old code load_format="dummy" (its CLI has no --load-format).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-$(mktemp -d)}
RATES=${RATES:-2}
REQUESTS=${REQUESTS:-20}
PY=${PYTHON:-python3}
OUT=${OUT:-}
CONFIG=${CONFIG:-tests/data/checkpoints/LLaDA-8B-Instruct}
DEVICE=${DEVICE:-cuda}
MODES=${MODES:-continuous static}

MODEL="$WORK/llada8b"
mkdir -p "$MODEL"
cp "$CONFIG"/{config.json,generation_config.json} "$MODEL/"
"$PY" - "$MODEL" <<'PY'
import json, pathlib, sys
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
out = pathlib.Path(sys.argv[1])
cfg = json.loads((out / "config.json").read_text())
special = {126080: "<|startoftext|>", cfg["eos_token_id"]: "<|endoftext|>", cfg["mask_token_id"]: "<|mdm_mask|>"}
vocab = {special.get(i, f"w{i}"): i for i in range(cfg["vocab_size"])}
tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
tok.pre_tokenizer, tok.decoder = pre_tokenizers.WhitespaceSplit(), decoders.WordPiece(prefix="##")
PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                        mask_token="<|mdm_mask|>", pad_token="<|endoftext|>").save_pretrained(str(out))
PY

if [[ " $MODES " == *" static "* ]]; then
if [ -z "${STATIC_SRC:-}" ]; then
    STATIC_SRC="$WORK/static_src"
    mkdir -p "$STATIC_SRC"
    git archive dd209a1 -- . ':(exclude)dllm/zoo/models' ':(exclude)tests' ':(exclude)benchmarks' | tar -x -C "$STATIC_SRC"
fi
"$PY" -m pip install -q --no-deps --no-build-isolation --target "$WORK/staticlib" "$STATIC_SRC"
mkdir -p "$WORK/patch"
cat > "$WORK/patch/sitecustomize.py" <<'PYEOF'
import dllm.api as _api
_init = _api.LLM.__init__


def __init__(self, *args, **kwargs):
    kwargs["load_format"] = "dummy"
    _init(self, *args, **kwargs)


_api.LLM.__init__ = __init__
PYEOF
cat > "$WORK/static_python" <<SH
#!/bin/sh
PYTHONPATH="$WORK/staticlib:$WORK/patch" exec "$(command -v "$PY")" "\$@"
SH
chmod +x "$WORK/static_python"
fi

common=(--serve "$MODEL" --token-prompts 64 --serve-arg=--dtype --serve-arg=bfloat16 --serve-arg=--device
        --serve-arg="$DEVICE" --serve-arg=--cache --serve-arg=dual --serve-arg=--strategy --serve-arg=reference
        --rates "$RATES" --requests "$REQUESTS" --max-concurrency 32 --max-tokens 256 --block-length 32
        --ignore-eos --no-mixed)
for mode in $MODES; do
    extra=(--serve-arg=--load-format --serve-arg=dummy)
    [ "$mode" = static ] && extra=(--python "$WORK/static_python")
    [ -n "$OUT" ] && mkdir -p "$OUT/$mode"
    OUT=${OUT:+$OUT/$mode} "$PY" benchmarks/serve_load.py "${common[@]}" "${extra[@]}" --label "$mode"
done
