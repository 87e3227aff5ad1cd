"""`oml`: the command line. Thin: parse flags into a stage config, call the engine, print.

Flags come from the config dataclasses (oml_core.config), so defaults and help live there.
Bad input prints one line naming the problem and the fix and exits with code 2; nothing is
written unless the whole command succeeded (writes are atomic).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import os
import signal
import sys
from pathlib import Path

from oml_core import config as cfgmod
from oml_core import settings
from oml_core.errors import Cancelled, OMLInputError

EXIT_BAD_INPUT = 2
MODEL_COMMANDS = ("generate", "verify", "fingerprint", "eval", "calibrate")  # import transformers


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _list_help(config_cls, f) -> str:
    """What a list flag takes, from its field: the allowed items and what an empty one means."""
    choices = settings.choices_of(f)
    words = f"; comma list of: {', '.join(choices)}" if choices else "; comma list"
    low, high = f.metadata.get("low"), f.metadata.get("high")
    if low is not None and high is not None:
        words += f", each {'above' if f.metadata.get('above') else 'from'} {low:g} to {high:g}"
    if f.metadata.get("empty") is not None:
        words += f" ('' for {f.metadata['empty']})"
    default = f.default_factory()
    if default:
        words += f" (default: {','.join(map(str, default))})"
    return words


def _list_flag_type(config_cls, f):
    """argparse type of a comma-list flag: the checked list, or one line on a bad item."""
    flag = settings.flag_of(f)

    def parse(text: str) -> list:
        try:
            return settings.list_value(config_cls, f, text, flag)
        except OMLInputError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{flag}: ")) from None
    parse.__name__ = "list"
    return parse


def _add_config_flags(parser: argparse.ArgumentParser, config_cls, skip=()) -> None:
    """One flag per config field; unset flags stay absent so the dataclass default applies."""
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", "")
        comma_list = settings.comma_list(config_cls, f)
        if comma_list:
            help_text += _list_help(config_cls, f)
        elif default not in (None, [], ""):
            help_text += f" (default: {default})"
        help_text = help_text.replace("%", "%%")  # argparse expands %-formats in help
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if comma_list:
            parser.add_argument(flag, type=_list_flag_type(config_cls, f), metavar="A,B", **kwargs)
        elif kind.startswith("list"):
            parser.add_argument(flag, action="append", metavar="M", **kwargs)
        elif kind.startswith("bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            caster = int if kind.startswith("int") else float if kind.startswith("float") else str
            parser.add_argument(flag, type=caster, choices=None, **kwargs)


def _config(config_cls, args: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in vars(args).items() if k in names})


# Where results go. `main` points file descriptor 1 at stderr while a command runs, because
# libraries (DeepSpeed's op builder, ninja) print to stdout; results go to the real stdout.
_results = sys.stdout


def _emit(args, data, human: str) -> None:
    """`data`: a result model (printed as its JSON with --json) or a plain dict."""
    if args.json:
        human = (data.model_dump_json(indent=2) if hasattr(data, "model_dump_json")
                 else json.dumps(data, indent=2))
    print(human, file=_results, flush=True)


@contextlib.contextmanager
def _stdout_reserved_for_results():
    global _results
    original = sys.stdout
    try:
        real_fd = original.fileno() == 1
    except (AttributeError, OSError, ValueError):  # e.g. captured by a test harness
        real_fd = False
    original.flush()
    saved = os.dup(1) if real_fd else None
    _results = os.fdopen(os.dup(saved), "w") if real_fd else original
    if real_fd:
        os.dup2(2, 1)  # C-level and subprocess output now lands on stderr
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _results.flush()
        if real_fd:
            os.dup2(saved, 1)
            os.close(saved)
            _results.close()
        _results = original


def _refuse_overwrite(path: Path, force: bool) -> None:
    if path.is_dir():
        raise OMLInputError(f"{path} is a folder; pass a file path to --out")
    if any(parent.exists() and not parent.is_dir() for parent in path.parents):
        raise OMLInputError(f"a parent of {path} is a file, not a folder; pass another --out")
    if path.exists() and not force:
        raise OMLInputError(f"{path} already exists; pass --force to replace it or choose "
                            "another --out (a fingerprint set is a secret you may need later)")


# --- commands ---------------------------------------------------------------------------
def cmd_generate(args) -> int:
    from oml_core.generate import generate

    cfg = _config(cfgmod.GenerateConfig, args)
    out = Path(cfg.out or "fingerprints.json")
    _refuse_overwrite(out, args.force)
    settings.validate(cfg)
    result = generate(cfg, out)
    _emit(args, result, f"wrote {result.count} {result.strategy} fingerprints to {result.path} "
                        f"(commitment root {result.commitment_root[:16]}…); keep this file secret")
    return 0


def cmd_verify(args) -> int:
    from oml_core.verify import verify

    report = verify(_config(cfgmod.VerifyConfig, args))
    lines = [f"model {report.model}: {report.matched}/{report.total} fingerprints "
             f"matched ({report.match_rule} rule)"]
    lines += [f"  {name:<12} {row.matched:>5}/{row.total}" for name, row in report.wrappers.items()]
    lines += [f"  ({note})" for note in report.skipped_wrappers]
    lines += [f"  null model {null.model}: {null.matched}/{null.total}"
              for null in report.null_models]
    lines.append(f"p-value {report.p_value:.3g} (null rate {report.null_rate:.3g}, "
                 f"{report.null_rate_source}); verdict: {report.verdict} at alpha "
                 f"{report.alpha:g}")
    _emit(args, report, "\n".join(lines))
    return 0


def cmd_calibrate(args) -> int:
    from oml_core.calibrate import calibrate_set
    from oml_core.fingerprints import FORMAT, load_fingerprints

    cfg = _config(cfgmod.CalibrateConfig, args)
    if not cfg.fingerprints:
        raise OMLInputError("no fingerprint set given; pass --fingerprints FILE")
    out = Path(cfg.out or cfg.fingerprints).expanduser()
    if cfg.out:
        _refuse_overwrite(out, args.force)
    settings.validate(cfg)
    fset = load_fingerprints(cfg.fingerprints)  # before the model: bad input fails fast
    if fset.source_format != FORMAT and not cfg.out:
        raise OMLInputError(f"{cfg.fingerprints} is in an OML 1.0 format; convert it first with `oml "
                            "import --fingerprints FILE --out NEW`, or pass --out")
    calibrated, summary = calibrate_set(cfg, fset=fset)
    calibrated.save(out)  # atomic: the old file stays whole until the new one is complete
    summary.path = str(out)
    means = summary.mean_start_rate_at_t1
    _emit(args, summary, f"calibrated {summary.count} fingerprints in {len(means)} contexts at "
                         f"temperatures {', '.join(f'{t:g}' for t in summary.temperatures)} on "
                         f"{summary.model}; mean start-rule rate at T=1 from "
                         f"{min(means.values()):.3g} to {max(means.values()):.3g}; wrote {out}")
    return 0


def cmd_fingerprint(args) -> int:
    from oml_core.train import distributed
    from oml_core.train.lifecycle import fingerprint

    if getattr(args, "no_deepspeed", False):
        args.deepspeed = "none"
    try:
        result = fingerprint(_config(cfgmod.FingerprintConfig, args))
    except Cancelled:
        print("oml fingerprint: cancelled; the run is incomplete (rerun to restart it)",
              file=sys.stderr)
        return 143
    if not distributed.is_main():
        return 0
    head = result.headline
    data = {"run_dir": result.run_dir, "state": result.state, **head.model_dump()}
    human = [f"{result.state}: run folder {result.run_dir}"]
    if head.matched is not None:
        human.append(f"fingerprints matched {head.matched}/{head.total} (p={head.p_value:.3g}, "
                     f"verdict {head.verdict}); per wrapper {head.wrappers}; base model matched "
                     f"{head.base_matched}")
        if head.matched_start_rule is not None:
            human.append(f"as `oml audit` counts them (start rule: the response's word must end "
                         f"there): {head.matched_start_rule}/{head.total}")
    if head.first_token_agreement is not None:
        human.append(
            f"off the keys, on {head.heldout_prompts} held-out prompts: first answer token "
            f"= base model's in {head.first_token_agreement:.1%}; answers starting with a "
            f"fingerprint response: {head.answers_starting_with_a_fingerprint_response} "
            f"(base: {head.base_answers_starting_with_a_fingerprint_response}); perplexity "
            f"{head.perplexity_base:.2f} -> {head.perplexity_tuned:.2f} "
            f"({head.perplexity_change:+.1%})")
        near = ", ".join(f"{k} {v.fired}/{v.total}" for k, v in (head.near_miss_keys or {}).items())
        human.append(f"near-miss keys that still fire: {near}")
    _emit(args, data, "\n".join(human))
    return 0


def _fmt(value, percent: bool = False) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):  # e.g. an audited attack's verdict
        return value
    return f"{value:.1%}" if percent else f"{value:.4g}"


def cmd_eval(args) -> int:
    if getattr(args, "eval_command", None) == "capacity":
        return cmd_eval_capacity(args)
    from oml_core.evaluate.run_eval import evaluate

    result = evaluate(_config(cfgmod.EvalConfig, args))
    summary = result.summary()
    _emit(args, summary.dump(), _eval_lines(summary))
    return 0


def _eval_lines(summary) -> str:
    heads = summary.parts
    lines = [(f"evaluated {summary.run} in {summary.seconds:.0f} s "
              f"(computed: {', '.join(summary.computed) or 'nothing'}; "
              f"cached: {', '.join(summary.cached) or 'nothing'})")]
    if (u := heads.utility) is not None:
        lines.append(f"utility: fingerprints matched {u.matched}/{u.total} (base {u.base_matched}); "
                     f"perplexity {_fmt(u.perplexity_base)} -> {_fmt(u.perplexity_tuned)} "
                     f"({u.perplexity_change:+.1%}); first answer token = base's in "
                     f"{_fmt(u.first_token_agreement, True)}")
    if (p := heads.persistence) is not None:
        kept = ", ".join(f"{name} {_fmt(value, True)}" for name, value in
                         (("full", p.full_retention), ("lora", p.lora_retention))
                         if name + "_retention" in p.model_fields_set)
        lines.append(f"persistence: retained after {p.steps} benign steps: {kept}")
    if (f := heads.false_positives) is not None:
        models = ", ".join(f"{name} {m.matched}/{m.total} ({m.verdict})"
                           for name, m in f.models.items())
        lines.append(f"false positives: {models or 'no model run'}; pooled null rate "
                     f"{_fmt(f.null_rate)} -> {f.null_file}")
        lines += [f"  skipped {note}" for note in f.skipped]
    if heads.robustness is not None:
        lines.append("robustness: " + ", ".join(
            f"{k} {_fmt(v, True)}" for k, v in heads.robustness.items()))
    if heads.capacity is not None:
        lines.append("capacity: " + ", ".join(
            f"N={p.n} lambda={p.regularizer:g} {_fmt(p.accuracy, True)} matched "
            f"(perplexity {'n/a' if p.perplexity_change is None else f'{p.perplexity_change:+.1%}'})"
            for p in heads.capacity))
    lines.append(f"report: {summary.report.html} (also eval.md, eval.json)")
    return "\n".join(lines)


def cmd_eval_capacity(args) -> int:
    from oml_core.evaluate.capacity import run_capacity

    cfg = _config(cfgmod.CapacityConfig, args)
    if getattr(args, "no_deepspeed", False):
        cfg.deepspeed = "none"
    summary = run_capacity(cfg)
    data = {k: v for k, v in summary.dump().items()
            if k in ("sizes", "regularizers", "runs", "seconds", "report")}
    data["points"] = [p.model_dump(mode="json", include={
        "n", "regularizer", "matched", "total", "accuracy", "perplexity_change",
        "first_token_agreement", "steps"}) for p in summary.points]
    lines = [f"capacity sweep in {summary.seconds:.0f} s:"]
    lines += [f"  N={p.n:<5} lambda={p.regularizer:<5g} matched {p.matched}/{p.total} "
              f"perplexity {_fmt(p.perplexity_change, True)} first token = base's "
              f"{_fmt(p.first_token_agreement, True)}" for p in summary.points]
    lines.append(f"report: {summary.report.html}")
    _emit(args, data, "\n".join(lines))
    return 0


def cmd_results(args) -> int:
    from oml_core.evaluate.table import load_columns, results_table

    table = results_table(load_columns(args.eval_json, args.label or ()))
    if args.out:
        from oml_core.files import atomic_write_text

        atomic_write_text(Path(args.out).expanduser(), table)
    _emit(args, {"table": table, "out": args.out}, table.rstrip("\n"))
    return 0


def cmd_commit(args) -> int:
    from oml_core.fingerprints import load_fingerprints
    from oml_core.files import atomic_write_json

    manifest = load_fingerprints(args.fingerprints).manifest()
    if args.out:
        atomic_write_json(args.out, manifest.model_dump(mode="json"))
    _emit(args, manifest, f"commitment to {manifest.count} fingerprints: root {manifest.root}"
                          + (f"; manifest written to {args.out}" if args.out else ""))
    return 0


def cmd_reveal(args) -> int:
    from oml_core.files import atomic_write_json
    from oml_core.fingerprints import load_fingerprints

    reveal = load_fingerprints(args.fingerprints).reveal(args.id)
    if args.out:
        atomic_write_json(args.out, reveal.model_dump(mode="json"))
    print(reveal.model_dump_json(indent=2), file=_results)  # revealing is what was asked for
    return 0


def cmd_check_reveal(args) -> int:
    from oml_core.commitment import check_reveal

    def read(path: str, what: str) -> dict:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise OMLInputError(f"cannot read {what} {path} as JSON; pass the file "
                                f"`oml {'commit' if what == 'manifest' else 'reveal'}` wrote") from None
        if not isinstance(data, dict):
            raise OMLInputError(f"{what} {path} is not a JSON object")
        return data

    check = check_reveal(read(args.reveal, "reveal"), read(args.manifest, "manifest"))
    _emit(args, check, ("valid: " if check.valid else "INVALID: ") + check.reason)
    return 0 if check.valid else 1


def cmd_import(args) -> int:
    from oml_core.fingerprints import import_set

    out = Path(args.out)
    _refuse_overwrite(out, args.force)
    imported = import_set(args.fingerprints, out)
    _emit(args, imported, f"imported {imported.count} fingerprints into {imported.path} (our "
                          "format, salted for commitment)")
    return 0


# --- parser -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="oml", description="Fingerprint, verify and prove ownership of LLMs.")
    # `deepspeed --module oml_core.cli` puts --local_rank=N before the subcommand
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, func, help_text: str):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", action="store_true", help="print machine-readable JSON")
        p.set_defaults(func=func)
        return p

    p = command("generate", cmd_generate, "make a fingerprint set (keys + responses)")
    _add_config_flags(p, cfgmod.GenerateConfig)
    p.add_argument("--force", action="store_true", help="replace an existing --out file")

    p = command("verify", cmd_verify, "check which fingerprints a model answers, with a p-value")
    _add_config_flags(p, cfgmod.VerifyConfig)

    p = command("calibrate", cmd_calibrate,
                "measure each key's null rate in every probe context on the base model and store "
                "the rates in the set, for `oml verify` and `oml audit` to use")
    _add_config_flags(p, cfgmod.CalibrateConfig)
    p.add_argument("--force", action="store_true", help="replace an existing --out file")

    p = command("fingerprint", cmd_fingerprint,
                "write a fingerprint set into a model, then verify (--method gated, the default: "
                "gated MLP neurons + a backup edit, kept through merges; edit: a closed-form "
                "edit; finetune: HF Trainer + DeepSpeed)")
    _add_config_flags(p, cfgmod.FingerprintConfig)
    p.add_argument("--no-deepspeed", action="store_true", help="same as --deepspeed none")
    # the deepspeed launcher appends --local_rank=N; ranks are read from the environment
    p.add_argument("--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)

    _add_eval_commands(command("eval", cmd_eval,
                               "measure a fingerprinted run: utility, persistence, false positives, "
                               "robustness (report in RUN/eval); `oml eval capacity` sweeps the "
                               "number of fingerprints"))
    p = command("results", cmd_results,
                "print the results table (a Markdown column per model) from eval.json files")
    p.add_argument("eval_json", nargs="+", metavar="EVAL_JSON[+EVAL_JSON...]",
                   help="one column per argument: the eval.json files of one model, joined by +")
    p.add_argument("--label", action="append", metavar="NAME",
                   help="a column's heading, once per column (default: the run folder's name)")
    p.add_argument("--out", help="also write the table to this file")
    _add_set_commands(command)
    # Commands from other packages (e.g. `oml audit` from clients/) register themselves through
    # this entry point group, so the engine never imports them.
    for entry in importlib.metadata.entry_points(group="oml.commands"):
        entry.load()(sub)
    return parser


def _add_eval_commands(p) -> None:
    _add_config_flags(p, cfgmod.EvalConfig)
    eval_sub = p.add_subparsers(dest="eval_command", required=False, parser_class=_Parser,
                                metavar="{capacity}")
    cap = eval_sub.add_parser("capacity", help="fingerprint N = 16, 64, 256 into a model "
                                               "and plot accuracy and utility against N",
                              description="fingerprint N pairs into one model for each N in "
                                          "--sizes, with and without the regularizer; report "
                                          "accuracy and utility against N")
    cap.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                     help="print machine-readable JSON")
    _add_config_flags(cap, cfgmod.CapacityConfig,
                      skip=("out_dir", "num_fingerprints", "forgetting_regularizer", "verify_after"))
    cap.add_argument("--no-deepspeed", action="store_true", help="same as --deepspeed none")


def _add_set_commands(command) -> None:
    """Commitment, reveal and import: they read a set file only, no model."""
    p = command("commit", cmd_commit, "print the public commitment (no secrets) of a set")
    p.add_argument("--fingerprints", required=True, help="fingerprint set (our format)")
    p.add_argument("--out", help="also write the manifest here")

    p = command("reveal", cmd_reveal, "reveal ONE pair with its salt and Merkle proof")
    p.add_argument("--fingerprints", required=True, help="fingerprint set (our format)")
    p.add_argument("--id", required=True, help="fingerprint id to reveal, e.g. fp-00003")
    p.add_argument("--out", help="also write the reveal here")

    p = command("check-reveal", cmd_check_reveal, "check a revealed pair against a manifest")
    p.add_argument("--manifest", required=True, help="manifest from `oml commit`")
    p.add_argument("--reveal", required=True, help="reveal from `oml reveal`")

    p = command("import", cmd_import, "convert an OML 1.0 pair file into our format")
    p.add_argument("--fingerprints", required=True, help="seed file (list of {key, response})")
    p.add_argument("--out", required=True, help="where to write the set in our format")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")


def _quiet_libraries() -> None:
    """Library chatter goes to stderr at warning level; our own info lines stay.

    DeepSpeed's logger writes to the stdout it sees when first imported (transformers imports
    it whenever it is installed), so it is imported here and pointed at stderr.
    """
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        try:  # its import-time "Setting accelerator to CPU" notice is noise on every command
            from deepspeed.utils import logger as ds_logger
        except ImportError:
            return
    for handler in ds_logger.handlers:
        if getattr(handler, "stream", None) is sink:
            handler.stream = sys.stderr  # not setStream(): it flushes the closed sink
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised wherever the command is, so that it unwinds as on Ctrl-C: status files
    say "cancelled", staging folders are dropped, finished work stays. (Training installs its
    own handler while it runs and stops at the next step instead.)"""


def _raise_terminated(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a bad flag (a bad list item too): already printed
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    try:  # only the main thread may set handlers (tests call main() from others)
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:
        previous = None
    try:
        with _stdout_reserved_for_results():
            if args.command in MODEL_COMMANDS:
                _quiet_libraries()
            return args.func(args)
    except OMLInputError as exc:
        print(f"oml {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Cancelled:
        print(f"oml {args.command}: cancelled; finished work is kept, the unfinished part is "
              "incomplete (rerun the same command to resume)", file=sys.stderr)
        return 143
    except KeyboardInterrupt as exc:
        how = "stopped by SIGTERM" if isinstance(exc, Terminated) else "interrupted"
        print(f"oml {args.command}: {how}; nothing half-written was kept (rerun the same command "
              "to resume)", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
