#!/bin/bash
# sequential vs fixed-plan audit of a fingerprinted model behind transformers serve (docs/performance.md);
# F / M: the run's fingerprint set and model folder, TAG a name for the results (defaults: the
# demo's edit run as measured); the set is calibrated once into /tmp/seqm/cal-$TAG.json;
# ONLY_DEFAULT=1 skips the (slow) exhaustive audit
set -u
cd "$(dirname "$0")/.."
mkdir -p /tmp/seqm
B=.venv/bin
F=${F:-/tmp/oml-scratch/smol/run-edit/fingerprints.json}
M=${M:-/tmp/oml-scratch/smol/run-edit/model}
TAG=${TAG:-edit}
BASE=$HOME/.cache/oml/models/SmolLM2-135M-Instruct
export OML_AUDIT_NONE=none OML_PROGRESS=0 HF_HUB_OFFLINE=1
[ -f /tmp/seqm/cal-$TAG.json ] || { /usr/bin/time -v $B/oml calibrate --fingerprints $F --temperatures 1 --out /tmp/seqm/cal-$TAG.json 2>&1 | egrep "Elapsed|error|Error" ; }
$B/transformers serve --host 127.0.0.1 --port 8431 --device cpu > /tmp/seqm/serve.log 2>&1 &
SP=$!
for i in $(seq 1 120); do curl -s http://127.0.0.1:8431/health >/dev/null && break; sleep 1; done
run() { name=$1; shift; rm -rf /tmp/seqm/$name; s=$(date +%s.%N); $B/oml audit --base-url http://127.0.0.1:8431/v1 --dialect transformers --fingerprints /tmp/seqm/cal-$TAG.json --reuse-keys --json --api-key-env OML_AUDIT_NONE --out /tmp/seqm/$name "$@" > /tmp/seqm/$name.json 2>/tmp/seqm/$name.err; rc=$?; e=$(date +%s.%N); python3 -c "
import json;d=json.load(open('/tmp/seqm/$name.json'))
print('$name', 'rc=$rc', d['verdict'], 'p=%.3g'%d['p_value'], 'keys', d['keys_probed'], 'calls', d['calls_this_run'], 'matched %s/%s'%(d['matched'],d['total']), 's=%.0f'%($e-$s))" 2>/dev/null || echo "$name rc=$rc failed: $(tail -2 /tmp/seqm/$name.err)"; }
run default-$TAG --model $M                       # the default: sequential, 3 probes a key
[ "${ONLY_DEFAULT:-0}" = 1 ] || run exhaustive-$TAG --model $M --exhaustive  # the fixed plan: every layer, variant, sample
run default-base-$TAG --model $BASE              # the base model (innocent): no_match expected
kill $SP; wait $SP 2>/dev/null
