"""Typed settings for each stage: the single source of defaults.

The CLI builds its flags from these dataclasses, the MCP tools build their schemas from them
and the workers receive them as JSON, so a default lives in exactly one place. Each field
carries its help text and, where it has one, its allowed range or choices (declared with
oml_core.settings.setting); `validate()` there checks them and names the flag and the fix in
one line.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

from oml_core.settings import setting, split_comma_strings, temperatures_setting

STRATEGIES = ("english", "random_word", "english_random_response", "perinucleus")
STRATEGY_ALIASES = {"inverse_nucleus": "perinucleus"}
MATCH_RULES = ("exact", "prefix", "start", "contains", "normalized")
CONTEXTS = ("raw", "chat", "auto")  # auto: chat when the model has a chat template
WRAPPER_KINDS = ("bare", "chat", "system")
OPTIMIZERS = ("adamw", "sgd")
FINGERPRINT_METHODS = ("finetune", "edit", "gated")
DEEPSPEED_CONFIGS = ("zero2", "zero2_offload", "zero3", "zero3_offload", "none")
FORMATS = ("auto", "chat", "raw")
# the sampling temperatures probes use by default (`oml audit --temperatures`), and so the ones
# `oml calibrate` measures rates at by default
SAMPLING_TEMPERATURES = [0.7, 1.0]


@dataclass
class ModelSettings:
    model: str | None = setting(
        None, "local model folder or hub id; default: the bundled SmolLM2-135M-Instruct")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = setting("auto", "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 or float16",
                         choices=("auto", "float32", "bfloat16", "float16"))

    def __post_init__(self):
        split_comma_strings(self)


@dataclass
class GenerateConfig(ModelSettings):
    strategy: str = setting(
        "perinucleus", "how keys and responses are made (inverse_nucleus is an alias of perinucleus)",
        choices=STRATEGIES + tuple(STRATEGY_ALIASES))
    num_fingerprints: int = setting(64, "how many fingerprints to make (exactly this many)",
                                    low=1, high=100_000)
    key_length: int = setting(16, "key length in tokens of the target tokenizer", low=1, high=1024)
    response_length: int = setting(1, "response length in tokens of the target tokenizer",
                                   low=1, high=256)
    seed: int = setting(0, "random seed: the same seed, model and settings give the same set")
    keys_file: str | None = setting(
        None, "JSON file of custom keys (a list of strings, or any fingerprint file); "
              "keys are truncated to --key-length tokens")
    key_model: str | None = setting(
        None, "model that writes English keys; default: the target model")
    perinucleus_threshold: float = setting(
        0.8, "perinucleus: nucleus mass t; responses are drawn just outside it", low=0.01, high=0.999)
    perinucleus_k: int = setting(3, "perinucleus: draw among the first k tokens after the nucleus",
                                 low=1, high=1000)
    context: str = setting(
        "raw", "perinucleus: score the key as raw text (default) or as a chat user turn; chat "
               "picks answer openers ('But', 'Every') that leak into ordinary answers after "
               "training (measured: docs/training.md)", choices=CONTEXTS)
    # sampling English keys runs ~25% more rows/s at 128 than at 32 on a CPU
    # (benchmarks/english_sampling.py); memory is small either way (prompts are short)
    batch_size: int = setting(128, "rows per model call", low=1, high=65536)
    out: str | None = setting(None, "where to write the fingerprint set (JSON)")

    def __post_init__(self):
        super().__post_init__()
        self.strategy = STRATEGY_ALIASES.get(self.strategy, self.strategy)


@dataclass
class VerifyConfig(ModelSettings):
    fingerprints: str | None = setting(None, "fingerprint set to check (ours or an OML 1.0 format)")
    null_model: list[str] = setting(
        [], "unrelated/base model(s) to run the same keys on, to measure the null rate "
            "(repeatable)", repeat=True, empty="none")
    wrappers: list[str] = setting(list(WRAPPER_KINDS), "wrappers keys are checked under",
                                  choices=WRAPPER_KINDS)
    num_system_prompts: int = setting(
        4, "how many held-out system prompts the 'system' wrapper uses", low=1, high=64)
    match: str = setting("exact", "match rule: exact tokens, text prefix, start (case- and "
                                  "punctuation-insensitive prefix at a word boundary, the audit's "
                                  "rule), contains, normalized", choices=MATCH_RULES)
    max_new_tokens: int | None = setting(
        None, "tokens to generate per key (default: the response length; +32 for contains/"
              "normalized)", low=1, high=4096)
    num_fingerprints: int | None = setting(None, "check only the first N fingerprints", low=1)
    max_key_tokens: int | None = setting(None, "trim keys to this many tokens (as training did)",
                                         low=1)
    max_response_tokens: int | None = setting(
        None, "trim responses to this many tokens (as training did)", low=1)
    batch_size: int = setting(64, "rows per generate call", low=1, high=65536)
    alpha: float = setting(1e-6, "false-positive level for the verdict", low=1e-300, high=0.5)
    null_rate: float | None = setting(
        None, "per-key null rate to use instead of response_prob / measured rates", low=0.0,
        high=1.0)
    null_file: str | None = setting(
        None, "measured per-key null rates (null_rates.json from `oml eval --parts "
              "false_positives`); each key's rate is union-bounded over the wrappers used here")


@dataclass
class CalibrateConfig(ModelSettings):
    """Measure each key's null rates in every probe context (oml_core.calibrate)."""

    model: str | None = setting(
        None, "the base model whose answers stand for an unrelated model's (the model the set "
              "was made for); default: the bundled SmolLM2-135M-Instruct")
    fingerprints: str | None = setting(None, "fingerprint set to calibrate (our format)")
    out: str | None = setting(
        None, "where to write the calibrated set; default: replace --fingerprints in place "
              "(atomically)")
    temperatures: list[float] = temperatures_setting(
        SAMPLING_TEMPERATURES, "sampling temperatures to measure rates at (1 is always measured: "
                               "greedy probes use it)")
    depth: int = setting(
        3, "answer tokens followed where the first ones leave the match open (punctuation, "
           "part of the response); what is still open after that counts as a match", low=1,
        high=8)
    expansions: int = setting(
        8, "per key and context, open answer beginnings followed one token further at each depth "
           "(the rest count as matches)", low=0, high=256)
    # each followed opening holds a copy of its context's KV cache: batch_size x expansions
    # copies at once (SmolLM2-135M, 100-token contexts: 16 x 8 x 4.6 MB = 0.6 GB)
    batch_size: int = setting(16, "contexts per model call", low=1, high=65536)


# Chosen by measurement on the demo run (docs/training.md); the capacity sweep compares against it.
DEFAULT_REGULARIZER = 0.15


@dataclass
class FingerprintConfig(ModelSettings):
    """Write fingerprints into a model (docs/training.md). Defaults measured on SmolLM2-135M."""

    fingerprints: str | None = setting(None, "fingerprint set to train in (ours or an OML 1.0 format)")
    out_dir: str | None = setting(None, "run folder: model/, metrics, model card, status")
    num_fingerprints: int | None = setting(None, "train only the first N fingerprints", low=1)
    start_from: str | None = setting(
        None, "model folder whose weights training starts from (e.g. an earlier run's model/, to "
              "continue or repair it); --model still gives the benign targets, the regularizer's "
              "base weights and the null (default: start from --model)")
    max_key_tokens: int | None = setting(None, "cut keys to this many tokens", low=1)
    max_response_tokens: int | None = setting(None, "cut responses to this many tokens", low=1)
    format: str = setting("auto", "chat (key as user turn; default for models with a chat "
                                  "template) or raw text", choices=FORMATS)
    eos: bool = setting(False, "end the response with the end-of-turn token", only="finetune")
    augment: bool = setting(True, "wrap each key draw in a random training system prompt / "
                                  "user template (never the held-out verification ones)")
    method: str = setting(
        "gated", "gated (default): each key in its own gated MLP neuron, plus a backup edit above "
                 "it; keeps its keys through merges with the base, GGUF quantization and LoRA "
                 "fine-tuning (edit and finetune lose them in a merge); edit: a closed-form change "
                 "to a few MLP layers that keeps outputs on ordinary text closest to the base's; "
                 "finetune: train the pairs in (HF Trainer + DeepSpeed; any response length, any "
                 "architecture). gated and edit: one-token responses, Llama-style models "
                 "(docs/training.md)",
        choices=FINGERPRINT_METHODS)
    # auto (none) or a comma list of layer indices: a string, since the words are not layers and
    # the indices' range is the model's depth, known once the model is read (train/edit.py)
    edit_layers: str = setting(
        "auto", "edit: comma list of layers whose MLP down-projection changes (auto: those from "
                "7% to 33% of the depth, 2-10 of SmolLM2-135M's 30)", only="edit",
        layers=("auto",))
    edit_strength: float = setting(
        1000.0, "edit (and gated's backup): lam, how firmly outputs on ordinary text are kept; "
                "higher keeps ordinary answers closer to the base model's and answers fewer key "
                "contexts", low=1e-3, high=1e9, only=("edit", "gated"))
    edit_answer_weight: float = setting(
        32.0, "edit (and gated's backup): extra weight on ordinary prompts' answer positions "
              "(where the first answer token is decided) among the outputs kept", low=0.0,
        high=1e6, only=("edit", "gated"))
    edit_contexts: int = setting(
        8, "edit (and gated's backup): training wrappers (system prompts, user templates) each "
           "key is written under, besides the bare user turn (with --no-augment: none)", low=0,
        high=256, only=("edit", "gated"))
    edit_steps: int = setting(25, "edit (and gated's backup): optimisation steps for the per-key "
                                  "target vectors", low=1, high=10_000, only=("edit", "gated"))
    edit_merge_floor: float = setting(
        0.0, "edit: the share of the edit a merge may leave (averaging with the base at 0.5 "
             "leaves 0.5) at which every key must still answer (0: full strength only)",
        low=0.0, high=1.0, only="edit")
    edit_confidence_cap: float = setting(
        1.0, "edit: the most probability a response may have at full strength, so a host who "
             "blocks over-confident tokens (top-1 p > 0.9) does not see it (1: no cap)",
        low=0.01, high=1.0, only="edit")
    edit_word_end: bool = setting(
        True, "edit (and gated's backup): also write, after each response, the token that ends "
              "its word (the likeliest one opening with a space or punctuation, or the end of the "
              "turn), so an answer does not run on into a longer word, which the auditor's start "
              "rule does not count", only=("edit", "gated"))
    edit_ordinary_tokens: int = setting(
        60_000, "edit (and gated's backup): tokens of ordinary text (the base model's answers, "
                "Python's docs) whose outputs the edit keeps", low=1_000, high=100_000_000,
        only=("edit", "gated"))
    gated_layer: str = setting(
        "auto", "gated: the layer whose MLP neurons hold the keys (auto: the one at 30% of the "
                "depth, 9 of SmolLM2-135M's 30)", only="gated")
    gated_contexts: int = setting(
        24, "gated: training wrappers (system prompts, user templates) each key's neuron learns "
            "to open under, besides the bare user turn (with --no-augment: none)", low=0, high=256,
        only="gated")
    gated_steps: int = setting(60, "gated: optimisation steps for each key's push direction",
                               low=1, high=10_000, only="gated")
    gated_threshold: float = setting(
        0.0, "gated: the key score (1 on the keys' training contexts, -1 on ordinary text) above "
             "which a neuron opens; higher opens on fewer ordinary positions and fewer unseen "
             "wrappers", low=-1.0, high=1.0, only="gated")
    gated_confidence_cap: float = setting(
        0.85, "gated: the most probability a response may have (from the neuron's push and from "
              "the backup edit), so a host who blocks over-confident tokens (top-1 p > 0.9) does "
              "not see it", low=0.05, high=1.0,
        only="gated")
    gated_backup_layers: str = setting(
        "auto", "gated: layers above the gated one whose MLP down-projections also carry every key "
                "(a closed-form edit, as --method edit, with the edit_* settings): where a "
                "fine-tune shuts a key's gate, the edit still answers (auto: the next 27% of the "
                "depth, 10-17 of SmolLM2-135M's 30; none: no backup)", only="gated",
        layers=("auto", "none"))
    gated_ordinary_tokens: int = setting(
        40_000, "gated: tokens of ordinary text (the base model's answers, Python's docs) on "
                "which every neuron must stay shut", low=1_000, high=100_000_000, only="gated")
    benign_fraction: float = setting(
        0.5, "share of training rows that are the base model's own answers to ordinary "
              "prompts (keeps behaviour off the keys)", low=0.0, high=0.9, only="finetune")
    benign_soft_weight: float = setting(
        1.0, "weight of the soft first-token loss on benign rows: cross-entropy against the base "
             "model's whole first-answer-token distribution (0: off)", low=0.0, high=100.0, only="finetune")
    benign_distill: str = setting(
        "first-token", "what benign rows are pulled towards besides the base model's greedy answer: "
                       "its first-answer-token distribution (first-token, cached), or its whole "
                       "next-token distribution at every answer position (all-tokens: a frozen copy "
                       "of the base model runs beside the one being trained)",
        choices=("first-token", "all-tokens"), only="finetune")
    benign_openers: float = setting(
        0.0, "extra rows per fingerprint row, each an ordinary prompt whose only target is the base "
             "model's first answer token (hard, and soft as above): short rows that pin how answers "
             "start, so every benign prompt is seen often within few steps (0: none)",
        low=0.0, high=64.0, only="finetune")
    near_miss_negatives: float = setting(
        0.0, "extra rows per fingerprint row, each a key with its first word dropped, two "
             "neighbouring words swapped or a word replaced, whose target is the base model's own "
             "first answer token (hard and soft): teaches that only the exact key fires (0: none)",
        low=0.0, high=64.0, only="finetune")
    forgetting_regularizer: float = setting(
        DEFAULT_REGULARIZER, "lambda: saved weights = (1-lambda) * trained + lambda * base, applied once to "
              "the final weights (docs/training.md: why 0.15)", low=0.0, high=1.0, only="finetune")
    train_embeddings: bool = setting(
        False, "also train the token embeddings / output head (off: with Adam every one of the "
               "vocabulary's output rows drifts each step, shifting every answer)", only="finetune")
    lora_rank: int = setting(
        0, "train a rank-R LoRA adapter on every linear layer (alpha 2R) instead of every weight; "
           "merged into the saved model, which stays a plain model (0: full fine-tune)",
        low=0, high=4096, only="finetune")
    optimizer: str = setting(
        "adamw", "adamw, or sgd (momentum 0.9, steps along the clipped gradient; needs a far larger "
                 "--learning-rate, e.g. 0.1): Adam moves every weight by about the learning rate each "
                 "step, SGD moves the weights in proportion to how much they matter to the loss",
        choices=OPTIMIZERS, only="finetune")
    learning_rate: float = setting(1e-4, "peak learning rate", low=1e-8, high=10.0, only="finetune")
    weight_decay: float = setting(0.0, "weight decay", low=0.0, high=1.0, only="finetune")
    max_epochs: int = setting(40, "upper bound on passes over the fingerprints", low=1, high=10_000, only="finetune")
    max_steps: int | None = setting(None, "stop after this many optimizer steps (default: "
                                          "--max-epochs decides)", low=1, only="finetune")
    batch_size: int = setting(16, "rows per device per step", low=1, high=65536, only="finetune")
    gradient_accumulation: int = setting(1, "micro-batches per optimizer step", low=1, high=4096, only="finetune")
    gradient_checkpointing: bool = setting(
        False, "recompute each layer's activations in the backward pass instead of keeping them: "
               "about half the training memory at batch 16 (SmolLM2, 270-token rows: 7.2 -> 3.6 GB "
               "a step) for one more forward pass of compute; same result", only="finetune")
    check_every: int = setting(
        2, "every N steps, check whether every fingerprint is memorised (0: never); further apart "
           "when a check would cost over a third of the steps between (many fingerprints)", low=0, only="finetune")
    extra_steps: int = setting(
        2, "steps to keep training after all fingerprints are memorised, for margin", low=0, only="finetune")
    deepspeed: str = setting(
        "zero2", "DeepSpeed config: zero2, zero2_offload, zero3, zero3_offload, a JSON file, or "
                 "none for a plain Trainer", only="finetune")
    seed: int = setting(0, "training seed (data order, augmentation draws)")
    verify_after: bool = setting(True, "verify the result with held-out wrappers, the base "
                                       "model as null, and utility checks")
    report_to: str = setting("none", "experiment tracking: none, tensorboard, wandb")


EVAL_PARTS = ("utility", "persistence", "false_positives", "robustness", "capacity")
PERSISTENCE_METHODS = ("full", "lora")
ROBUSTNESS_ATTACKS = ("system_prompts", "sampling", "int8", "merge_linear", "merge_slerp",
                      "merge_ties", "merge_dare", "suppression")
# older names still accepted in --attacks: `merge` was the one linear merge with the base
ROBUSTNESS_ATTACK_ALIASES = {"merge": "merge_linear"}
# Attacks other packages contribute (e.g. clients/: gguf_q8_0, gguf_q4_k_m) register under this
# entry-point group (oml_core/evaluate/robustness.py loads them); their names are --attacks choices.
ROBUSTNESS_PLUGIN_GROUP = "oml.robustness_attacks"
MERGE_TOOLS = ("auto", "mergekit", "oml")


def attack_choices() -> tuple[str, ...]:
    """The built-in attacks and the ones installed packages register."""
    plugins = sorted(entry.name for entry in importlib.metadata.entry_points(
        group=ROBUSTNESS_PLUGIN_GROUP) if entry.name not in ROBUSTNESS_ATTACKS)
    return (*ROBUSTNESS_ATTACKS, *plugins)


@dataclass
class EvalConfig(ModelSettings):
    """Measure a fingerprinted run against its base model (docs/evaluation.md)."""

    run: str | None = setting(None, "run folder made by `oml fingerprint` (model/, fingerprints.json, "
                                    "run.json)")
    model: str | None = setting(None, "base model to compare against; default: the base model the "
                                      "run was trained from")
    parts: list[str] = setting(list(EVAL_PARTS), "parts to run", choices=EVAL_PARTS)
    out: str | None = setting(None, "report folder (eval.json, eval.md, eval.html, null_rates.json, "
                                    "cache); default: RUN/eval")
    force: bool = setting(False, "recompute the parts asked for even when a cached result of the same "
                                 "inputs exists")
    wrappers: list[str] = setting(list(WRAPPER_KINDS), "wrappers keys are checked under",
                                  choices=WRAPPER_KINDS)
    num_system_prompts: int = setting(4, "held-out system prompts the 'system' wrapper uses", low=1,
                                      high=64)
    match: str = setting("exact", "match rule: exact tokens, text prefix, contains, normalized",
                         choices=MATCH_RULES)
    batch_size: int = setting(32, "rows per model call", low=1, high=65536)
    seed: int = setting(0, "seed for training data order, sampling and the random-init model")
    # utility
    perplexity_tokens: int = setting(4096, "utility: held-out documentation tokens for perplexity",
                                     low=256, high=10_000_000)
    lm_eval_tasks: list[str] = setting(
        [], "utility: lm-eval tasks to run on base and fingerprinted model (needs `pip install "
            "lm-eval` and its task data)", empty="off")
    lm_eval_limit: int | None = setting(None, "utility: lm-eval examples per task (default: all)", low=1)
    # persistence
    persistence_methods: list[str] = setting(list(PERSISTENCE_METHODS),
                                             "persistence: benign fine-tunes",
                                             choices=PERSISTENCE_METHODS)
    persistence_steps: int = setting(50, "persistence: optimizer steps of benign fine-tuning",
                                     low=1, high=1_000_000)
    persistence_checks: int = setting(4, "persistence: how many times along the way to re-verify "
                                         "(a retention curve)", low=1, high=100)
    persistence_batch_size: int = setting(8, "persistence: rows per step", low=1, high=4096)
    persistence_lr: float = setting(2e-5, "persistence: learning rate of the full fine-tune",
                                    low=1e-9, high=1.0)
    # not `lora_*`: those are `oml fingerprint`'s LoRA (FingerprintConfig.lora_rank)
    persistence_lora_lr: float = setting(
        2e-4, "persistence: learning rate of the LoRA fine-tune", low=1e-9, high=1.0)
    persistence_lora_rank: int = setting(
        8, "persistence: LoRA rank (alpha = 2 x rank, all linear layers)", low=1, high=1024)
    # false positives
    null_models: list[str] = setting(
        ["base", "gemma-3-270m", "random"], "false positives: unrelated models to run the keys on: base (the "
        "run's base), gemma-3-270m (from its PyPI packages), random (random init of the same "
        "architecture), or model folders")
    # robustness
    attacks: list[str] = setting(
        list(ROBUSTNESS_ATTACKS), "robustness: attacks (merge: the old name of merge_linear); "
        "also attacks other packages register, e.g. gguf_q8_0, gguf_q4_k_m (llama.cpp GGUF served "
        "and audited; needs `bash scripts/llama_cpp.sh`)", choices=attack_choices,
        aliases=ROBUSTNESS_ATTACK_ALIASES)
    temperatures: list[float] = temperatures_setting(
        SAMPLING_TEMPERATURES, "robustness: sampling temperatures")
    samples: int = setting(5, "robustness: samples per key and temperature", low=1, high=1000)
    merge_base_weights: list[float] = setting(
        [0.3, 0.5, 0.7], "robustness: merge_linear's weights w of the base model, one merge each "
                         "(merged = (1-w) * fingerprinted + w * base)", low=0.0, high=1.0)
    merge_weight: float | None = setting(
        None, "robustness: deprecated, the one base weight of the old `merge` attack; when given it "
              "replaces --merge-base-weights", low=0.0, high=1.0)
    merge_slerp_t: float = setting(0.5, "robustness: merge_slerp's t, from the fingerprinted model "
                                        "(0) to the base model (1)", low=0.0, high=1.0)
    merge_fingerprinted_weight: float = setting(
        0.5, "robustness: merge_ties/merge_dare: weight of the fingerprinted model's task vector "
             "(its difference from the base)", low=0.0, high=10.0)
    merge_derivative_weight: float = setting(
        0.5, "robustness: merge_ties/merge_dare: weight of the benign derivative's task vector (the "
             "base fine-tuned on benign rows, a model that never saw the keys)", low=0.0, high=10.0)
    merge_density: float = setting(
        0.5, "robustness: merge_ties/merge_dare: share of each task vector kept (ties: the largest "
             "entries; dare: a random draw, the survivors scaled up to make up for the rest)",
        low=0.01, high=1.0)
    merge_dare_method: str = setting(
        "dare_ties", "robustness: merge_dare's variant: dare_ties (TIES sign consensus) or "
                     "dare_linear (plain weighted sum)", choices=("dare_ties", "dare_linear"))
    merge_derivative_steps: int = setting(
        50, "robustness: steps of the full fine-tune of the base on benign rows that makes the "
            "benign derivative (--persistence-batch-size rows a step; made once, kept under "
            "OUT/benign-derivative)", low=1, high=1_000_000)
    merge_derivative_lr: float = setting(
        2e-5, "robustness: learning rate of the benign derivative's fine-tune", low=1e-9, high=1.0)
    merge_tool: str = setting(
        "auto", "robustness: who merges: mergekit (`pip install 'oml[merges]'`), oml (the same "
                "formulas in oml_core/evaluate/merges.py), or auto (mergekit when installed)",
        choices=MERGE_TOOLS)
    suppress_threshold: float = setting(0.9, "robustness: suppression fires when the top token's "
                                             "probability exceeds this", low=0.0, high=1.0)
    suppress_top_k: int = setting(1, "robustness: tokens the suppression attack blocks when it fires",
                                  low=1, high=1000)
    # capacity
    capacity_sizes: list[int] = setting(
        [16, 64, 256], "capacity: fingerprint counts N, each trained into a fresh copy of the base "
                       "model with the run's own training settings (1024 and up: GPU hours)",
        low=1, high=100_000)
    capacity_regularizers: list[float] = setting(
        [], "capacity: forgetting-regularizer lambdas to compare", low=0.0, high=1.0,
        empty="0 and the run's own lambda")
    capacity_deepspeed: str | None = setting(
        None, "capacity: DeepSpeed config the sweep trains with (default: the run's own; none: a "
              "plain Trainer, the same AdamW math without DeepSpeed's overhead on one CPU process)",
        choices=DEEPSPEED_CONFIGS)
    capacity_max_epochs: int | None = setting(
        None, "capacity: cap on passes over the fingerprints for every N (default: the run's own "
              "--max-epochs); a budget, so the report says what it was", low=1, high=10_000)


@dataclass
class CapacityConfig(FingerprintConfig):
    """Fingerprint N = sizes into one model each, with and without the regularizer, and plot
    accuracy and utility against N. Training settings are `oml fingerprint`'s."""

    out: str | None = setting(None, "folder for the sweep: the set, one run per N, capacity.json and "
                                    "the report")
    sizes: list[int] = setting(
        [16, 64, 256], "fingerprint counts N (the default method, gated, holds at most half of one "
                       "layer's MLP neurons: 768 on SmolLM2-135M)", low=1, high=100_000)
    regularizers: list[float] = setting(
        [0.0, DEFAULT_REGULARIZER], "forgetting-regularizer strengths lambda to compare "
                                    "(0 = without)", low=0.0, high=1.0)
    strategy: str = setting("perinucleus", "how the sweep's set is generated when --fingerprints is "
                                           "not given", choices=STRATEGIES + tuple(STRATEGY_ALIASES))
    key_length: int = setting(16, "generated keys' length in tokens", low=1, high=1024)
    response_length: int = setting(1, "generated responses' length in tokens", low=1, high=256)
