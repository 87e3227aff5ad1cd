#!/usr/bin/env bash
# The main job on the bundled SmolLM2-135M-Instruct, start to finish, on CPU.
# Fine-tuning arrives with the next milestone; until then the demo generates a perinucleus
# set, checks the *base* model against it (it must not match), commits to the set publicly and
# proves one pair's membership.
set -euo pipefail
out=${OML_DEMO_DIR:-runs/demo}
mkdir -p "$out"
n=${OML_DEMO_FINGERPRINTS:-32}

echo "== 1. generate $n perinucleus fingerprints on the bundled model"
oml generate --strategy perinucleus --num-fingerprints "$n" --key-length 16 \
  --response-length 1 --seed 7 --out "$out/fingerprints.json" --force

echo "== 2. verify the base model (not fingerprinted yet: expect no_match)"
oml verify --fingerprints "$out/fingerprints.json" --json > "$out/verify-base.json"
python - "$out/verify-base.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"base model: {r['matched']}/{r['total']} matched, p={r['p_value']:.3g}, verdict={r['verdict']}")
print("per wrapper:", {k: v["matched"] for k, v in r["wrappers"].items()})
PY

echo "== 3. publish a commitment (no secrets in it)"
oml commit --fingerprints "$out/fingerprints.json" --out "$out/commitment.json"

echo "== 4. reveal one pair with its Merkle proof, and check it against the commitment"
oml reveal --fingerprints "$out/fingerprints.json" --id fp-00000 --out "$out/reveal-fp-00000.json" > /dev/null
oml check-reveal --manifest "$out/commitment.json" --reveal "$out/reveal-fp-00000.json"
echo "demo outputs in $out/"
