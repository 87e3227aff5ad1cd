"""`oml`: the command line. Thin: parse flags into a stage config, call the engine, print.

Flags come from the config dataclasses (oml_core.config), so defaults and help live there.
Bad input prints one line naming the problem and the fix and exits with code 2; nothing is
written unless the whole command succeeded (writes are atomic).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from oml_core import config as cfgmod
from oml_core.errors import OMLInputError

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_config_flags(parser: argparse.ArgumentParser, config_cls, skip=()) -> None:
    """One flag per config field; unset flags stay absent so the dataclass default applies."""
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", "")
        if default not in (None, [], ""):
            help_text += f" (default: {default})"
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if kind.startswith("list"):
            parser.add_argument(flag, action="append", metavar="M", **kwargs)
        elif kind.startswith("bool"):
            parser.add_argument(flag, action="store_true", **kwargs)
        else:
            caster = int if kind.startswith("int") else float if kind.startswith("float") else str
            parser.add_argument(flag, type=caster, choices=None, **kwargs)


def _config(config_cls, args: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in vars(args).items() if k in names})


def _emit(args, data: dict, human: str) -> None:
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(human)


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
    from oml_core.generate import generate_set

    cfg = _config(cfgmod.GenerateConfig, args)
    out = Path(cfg.out or "fingerprints.json")
    _refuse_overwrite(out, args.force)
    cfgmod.validate(cfg)
    fset = generate_set(cfg)
    fset.save(out)
    probs = [p for p in fset.response_probs if p is not None]
    data = {"path": str(out), "count": len(fset), "strategy": fset.strategy,
            "commitment_root": fset.manifest()["root"],
            "mean_response_prob": sum(probs) / len(probs) if probs else None}
    _emit(args, data, f"wrote {len(fset)} {fset.strategy} fingerprints to {out} "
                      f"(commitment root {data['commitment_root'][:16]}…); keep this file secret")
    return 0


def cmd_verify(args) -> int:
    from oml_core.verify import verify

    report = verify(_config(cfgmod.VerifyConfig, args))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"model {report['model']}: {report['matched']}/{report['total']} fingerprints "
          f"matched ({report['match_rule']} rule)")
    for name, row in report["wrappers"].items():
        print(f"  {name:<12} {row['matched']:>5}/{row['total']}")
    for note in report["skipped_wrappers"]:
        print(f"  ({note})")
    for null in report["null_models"]:
        print(f"  null model {null['model']}: {null['matched']}/{null['total']}")
    print(f"p-value {report['p_value']:.3g} (null rate {report['null_rate']:.3g}, "
          f"{report['null_rate_source']}); verdict: {report['verdict']} at alpha "
          f"{report['alpha']:g}")
    return 0


def cmd_commit(args) -> int:
    from oml_core.fingerprints import load_fingerprints
    from oml_core.files import atomic_write_json

    manifest = load_fingerprints(args.fingerprints).manifest()
    if args.out:
        atomic_write_json(args.out, manifest)
    _emit(args, manifest, f"commitment to {manifest['count']} fingerprints: root "
                          f"{manifest['root']}" + (f"; manifest written to {args.out}" if args.out else ""))
    return 0


def cmd_reveal(args) -> int:
    from oml_core.files import atomic_write_json
    from oml_core.fingerprints import load_fingerprints

    reveal = load_fingerprints(args.fingerprints).reveal(args.id)
    if args.out:
        atomic_write_json(args.out, reveal)
    print(json.dumps(reveal, indent=2))  # revealing is what was asked for
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

    ok, reason = check_reveal(read(args.reveal, "reveal"), read(args.manifest, "manifest"))
    _emit(args, {"valid": ok, "reason": reason},
          ("valid: " if ok else "INVALID: ") + reason)
    return 0 if ok else 1


def cmd_import(args) -> int:
    from oml_core.fingerprints import load_fingerprints

    out = Path(args.out)
    _refuse_overwrite(out, args.force)
    fset = load_fingerprints(args.fingerprints).with_salts()
    fset.save(out)
    _emit(args, {"path": str(out), "count": len(fset)},
          f"imported {len(fset)} fingerprints into {out} (our format, salted for commitment)")
    return 0


# --- parser -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="oml", description="Fingerprint, verify and prove ownership of LLMs.")
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

    p = command("import", cmd_import, "convert a seed-format pair file into our format")
    p.add_argument("--fingerprints", required=True, help="seed file (list of {key, response})")
    p.add_argument("--out", required=True, help="where to write the set in our format")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    return parser


def _quiet_libraries() -> None:
    """Library chatter goes to stderr at warning level; our own info lines stay."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return args.func(args)
    except OMLInputError as exc:
        print(f"oml {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"oml {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
