#!/usr/bin/env bash
# The main job on the bundled SmolLM2-135M-Instruct, start to finish, on CPU:
# generate 16 perinucleus fingerprints -> write them in -> verify (held-out system prompts, base
# model as null) -> off-key utility -> commitment -> serve the fingerprinted model with
# `transformers serve` on loopback and audit it as a suspect endpoint. Writing them in uses
# `oml fingerprint`'s default, `--method gated` (gated neurons plus a backup edit: the keys hold
# through merges, GGUF quantization and LoRA fine-tuning; docs/results.md);
# OML_DEMO_METHOD=edit or finetune writes them in the other ways (finetune: HF Trainer + DeepSpeed ZeRO-2).
set -euo pipefail
out=${OML_DEMO_DIR:-runs/demo}
n=${OML_DEMO_FINGERPRINTS:-16}
method=${OML_DEMO_METHOD:-gated}
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
echo "== 5. audit the fingerprinted model as a suspect endpoint: transformers serve on loopback"
# the keys' null rates in every probe context (what the audit's p-value stands on); greedy
# probes only need temperature 1
oml calibrate --fingerprints "$out/fingerprints.json" --temperatures 1 --out "$out/fingerprints-calibrated.json" --force
port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error transformers serve --host 127.0.0.1 --port "$port" \
  --device cpu > "$out/serve.log" 2>&1 &
serve_pid=$!
trap 'kill "$serve_pid" 2>/dev/null || true' EXIT
for _ in $(seq 1 180); do
  python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/health', timeout=2)" 2>/dev/null && break
  kill -0 "$serve_pid" 2>/dev/null || { echo "transformers serve exited; see $out/serve.log"; exit 1; }
  sleep 1
done
rm -rf "$out/audit"  # a fresh audit each run (the port, hence the endpoint, changes)
# the default audit is sequential: keys a round at a time, stopping once the evidence decides;
# --reuse-keys because this endpoint is our own (a real suspect gets fresh keys from the ledger)
rc=0
OML_DEMO_NO_API_KEY= oml audit --base-url "http://127.0.0.1:$port/v1" --model "$out/run-$method/model" \
  --fingerprints "$out/fingerprints-calibrated.json" --dialect transformers --reuse-keys \
  --api-key-env OML_DEMO_NO_API_KEY --out "$out/audit" --json > "$out/audit.json" || rc=$?
kill "$serve_pid" 2>/dev/null || true
python - "$out/audit.json" "$rc" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"audit of the served model: verdict={r['verdict']} (p={r['p_value']:.3g}), "
      f"{r['calls_this_run']} calls, {r['keys_probed']} of {r['keys_probed'] + r['keys_not_sent']} "
      f"keys spent (exit {sys.argv[2]}); report: {r['reports']['html']}")
PY
echo "demo finished in $(( $(date +%s) - start )) s; outputs in $out/"
