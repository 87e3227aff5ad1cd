#!/usr/bin/env bash
# The main job on the bundled SmolLM2-135M-Instruct, start to finish, on CPU:
# generate 16 perinucleus fingerprints -> write them in -> verify (held-out system prompts, base
# model as null) -> off-key utility -> commitment. Writing them in uses the closed-form edit
# (`--method edit`), which keeps the model closest to the base off the keys (docs/results.md);
# OML_DEMO_METHOD=finetune fine-tunes them in instead (HF Trainer + DeepSpeed ZeRO-2).
set -euo pipefail
out=${OML_DEMO_DIR:-runs/demo}
n=${OML_DEMO_FINGERPRINTS:-16}
method=${OML_DEMO_METHOD:-edit}
mkdir -p "$out"
start=$(date +%s)

echo "== 1. generate $n perinucleus fingerprints on the bundled model"
oml generate --strategy perinucleus --num-fingerprints "$n" --key-length 16 \
  --response-length 1 --seed 7 --out "$out/fingerprints.json" --force

echo "== 2. fingerprint the model, --method $method (reuses a finished identical run)"
oml fingerprint --method "$method" --fingerprints "$out/fingerprints.json" --out-dir "$out/run-$method" \
  ${OML_DEMO_TRAIN_ARGS:-}

echo "== 3. the un-fingerprinted base model on the same keys (expect no_match)"
oml verify --fingerprints "$out/fingerprints.json" --json > "$out/verify-base.json"
python - "$out/verify-base.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"base model: {r['matched']}/{r['total']} matched, p={r['p_value']:.3g}, verdict={r['verdict']}")
PY

echo "== 4. the public commitment (no secrets; also in $out/run-$method/README.md)"
oml commit --fingerprints "$out/fingerprints.json" --out "$out/commitment.json"
oml reveal --fingerprints "$out/fingerprints.json" --id fp-00000 --out "$out/reveal-fp-00000.json" > /dev/null
oml check-reveal --manifest "$out/commitment.json" --reveal "$out/reveal-fp-00000.json"
echo "demo finished in $(( $(date +%s) - start )) s; outputs in $out/"
