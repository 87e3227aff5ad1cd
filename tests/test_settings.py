"""List-valued settings: typed lists whose items `validate` checks, comma lists on the command
line, arrays with enum / bounded items in the MCP schemas."""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import TypeAdapter

from clients.config import AuditConfig, validate_audit
from oml_core import cli
from oml_core.config import EVAL_PARTS, CapacityConfig, EvalConfig, FingerprintConfig, VerifyConfig
from oml_core.errors import OMLInputError
from oml_core.settings import validate
from oml_mcp.schemas import config_parameters


def _main(capsys, *argv) -> tuple[int, str]:
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse refuses a bad flag value itself
        code = exc.code
    return code, capsys.readouterr().err.strip()


# --- validate ---------------------------------------------------------------------------------

@pytest.mark.parametrize("config, message", [
    (EvalConfig(parts=["utility", "speed"]), "--parts: 'speed' is not one of: utility, persistence"),
    (EvalConfig(parts=[]), "--parts: no value given; pass at least one (one or more of: utility"),
    (EvalConfig(attacks=["int4"]), "--attacks: 'int4' is not one of"),
    (EvalConfig(temperatures=[0.7, 0.0]), "--temperatures: 0 is out of range; pass values above 0"),
    (EvalConfig(temperatures=[float("nan")]), "--temperatures: nan is out of range"),
    (EvalConfig(merge_base_weights=[1.5]), "--merge-base-weights: 1.5 is out of range"),
    (EvalConfig(capacity_sizes=[0]), "--capacity-sizes: 0 is out of range"),
    (EvalConfig(capacity_sizes=[2.5]), "--capacity-sizes: 2.5 is not a whole number"),
    (EvalConfig(persistence_methods=["qlora"]), "--persistence-methods: 'qlora' is not one of"),
    (VerifyConfig(wrappers=["bare", "shouting"]), "--wrappers: 'shouting' is not one of"),
    (CapacityConfig(regularizers=[0, 2]), "--regularizers: 2 is out of range"),
    (AuditConfig(layers=["user", "voice"]), "--layers: 'voice' is not one of: raw, user"),
    (AuditConfig(answer_match="exact"), "--answer-match 'exact' is not one of: start, anywhere"),
    (FingerprintConfig(edit_layers="2,x"), "--edit-layers '2,x': give auto or a comma list"),
    (FingerprintConfig(gated_backup_layers="all"), "--gated-backup-layers 'all': give auto, none"),
])
def test_validate_rejects_a_bad_item_in_one_line(config, message):
    with pytest.raises(OMLInputError) as caught:
        validate(config)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_validate_normalises_lists():
    cfg = EvalConfig(parts=["utility", "utility", "robustness"], attacks=["merge", "merge_linear"],
                     temperatures=[1, 0.7], lm_eval_tasks=[], capacity_regularizers=[])
    validate(cfg)
    assert cfg.parts == ["utility", "robustness"]      # duplicates dropped, order kept
    assert cfg.attacks == ["merge_linear"]              # the old name becomes the new one
    assert cfg.temperatures == [1.0, 0.7] and all(isinstance(t, float) for t in cfg.temperatures)
    assert cfg.lm_eval_tasks == [] and cfg.capacity_regularizers == []  # empty: off / default
    audit = AuditConfig(sampled_layers=[], temperatures=[])
    validate(audit)  # '' for none
    assert audit.sampled_layers == [] and audit.temperatures == []


def test_comma_strings_still_become_lists():
    """Scripts and JSON written for the old string settings keep working."""
    assert EvalConfig(parts="utility, robustness").parts == ["utility", "robustness"]
    assert dataclasses.replace(EvalConfig(), capacity_sizes="4,8").capacity_sizes == [4, 8]
    assert AuditConfig(sampled_layers="").sampled_layers == []
    with pytest.raises(OMLInputError, match="--temperatures: 'hot' is not a number"):
        EvalConfig(temperatures="0.7,hot")


def test_the_defaults_are_valid_lists():
    for config_cls in (EvalConfig, VerifyConfig, CapacityConfig, FingerprintConfig):
        cfg = config_cls()
        validate(cfg)
    assert EvalConfig().parts == list(EVAL_PARTS) and EvalConfig().parts is not EvalConfig().parts
    validate_audit(AuditConfig(base_url="http://x/v1", model="m", fingerprints="f.json"))


# --- the command line -------------------------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["eval", "--run", "RUN", "--parts", "utility,speed"],
     "argument --parts: 'speed' is not one of: utility"),
    (["eval", "--run", "RUN", "--temperatures", "0.7,3"], "argument --temperatures: 3 is out of range"),
    (["eval", "--run", "RUN", "--capacity-sizes", "16,lots"],
     "argument --capacity-sizes: 'lots' is not a whole number"),
    (["eval", "--run", "RUN", "--null-models", ""], "argument --null-models: no value given"),
    (["verify", "--fingerprints", "F", "--wrappers", "bare,shouting"], "argument --wrappers: 'shouting'"),
    (["calibrate", "--fingerprints", "F", "--temperatures", "0"], "argument --temperatures: 0 is out"),
    (["eval", "capacity", "--out", "OUT", "--regularizers", "0,1.5"], "argument --regularizers: 1.5"),
    (["audit", "--base-url", "http://x/v1", "--model", "m", "--fingerprints", "F", "--layers",
      "user,voice"], "argument --layers: 'voice' is not one of"),
    (["audit", "--base-url", "http://x/v1", "--model", "m", "--fingerprints", "F", "--answer-match",
      "exact"], "--answer-match"),
])
def test_a_bad_list_item_exits_2_in_one_line_before_any_model_work(argv, needle, capsys, monkeypatch):
    import oml_core.models

    monkeypatch.setattr(oml_core.models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    code, err = _main(capsys, *argv)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert needle in err and err.startswith("oml"), err


def test_list_flags_parse_into_lists(monkeypatch):
    parser = cli.build_parser()
    args = parser.parse_args(["eval", "--run", "R", "--parts", "utility, robustness,utility",
                              "--temperatures", "0.7,1", "--attacks", "merge"])
    assert args.parts == ["utility", "robustness"] and args.temperatures == [0.7, 1.0]
    assert args.attacks == ["merge_linear"]
    audit = parser.parse_args(["audit", "--sampled-layers", "", "--match", "anywhere"])
    assert audit.sampled_layers == [] and audit.answer_match == "anywhere"  # --match: old name


def test_help_shows_the_choices_of_a_list_flag(capsys):
    assert cli.main(["eval", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--parts A,B parts to run; comma list of: utility, persistence, false_positives" in text
    assert "--persistence-lora-rank" in text and "--lora-rank" not in text
    assert "sampling temperatures; comma list, each above 0 to 2 (default: 0.7,1.0)" in text


# --- the MCP schemas --------------------------------------------------------------------------

def _schemas(config_cls) -> dict[str, dict]:
    return {p.name: TypeAdapter(p.annotation).json_schema()
            for p in config_parameters(config_cls)}


def test_mcp_schema_of_a_list_setting_is_an_array_of_enum_items():
    schemas = _schemas(EvalConfig)
    assert schemas["parts"]["type"] == "array"
    assert schemas["parts"]["items"] == {"enum": list(EVAL_PARTS), "type": "string"}
    assert schemas["persistence_methods"]["items"]["enum"] == ["full", "lora"]
    assert schemas["temperatures"]["items"] == {"type": "number", "exclusiveMinimum": 0.0,
                                                "maximum": 2.0}
    assert schemas["merge_base_weights"]["items"] == {"type": "number", "minimum": 0.0,
                                                      "maximum": 1.0}
    assert schemas["null_models"]["items"] == {"type": "string"}  # names or model folders
    assert "[]: off" in schemas["lm_eval_tasks"]["description"]
    audit = _schemas(AuditConfig)
    assert audit["sampled_layers"]["items"]["enum"][:2] == ["raw", "user"]
    assert "minItems" not in audit["sampled_layers"] and audit["layers"]["minItems"] == 1
    assert audit["header"] == {"type": "array", "items": {"type": "string"},
                               "description": audit["header"]["description"]}


def test_mcp_list_settings_take_lists_and_old_comma_strings():
    params = {p.name: p for p in config_parameters(EvalConfig)}
    parts = TypeAdapter(params["parts"].annotation)
    assert parts.validate_python(["utility"]) == ["utility"]
    assert parts.validate_python("utility,robustness") == ["utility", "robustness"]
    assert TypeAdapter(params["temperatures"].annotation).validate_python("0.7, 1") == [0.7, 1.0]
    with pytest.raises(Exception, match="speed"):
        parts.validate_python(["speed"])
    assert params["parts"].default == list(EVAL_PARTS)
    assert "lora_rank" not in params and "persistence_lora_rank" in params


def test_worker_flags_of_list_settings_are_comma_lists():
    from oml_mcp.lifecycle_tools import _flags

    argv = _flags(AuditConfig, dataclasses.asdict(AuditConfig(
        layers=["user", "system"], sampled_layers=[], header=["A: b", "C: d"], answer_match="anywhere")))
    assert argv == ["--header", "A: b", "--header", "C: d", "--layers", "user,system",
                    "--sampled-layers", "", "--answer-match", "anywhere"]
    parsed = cli.build_parser().parse_args(["audit", *argv])
    assert parsed.layers == ["user", "system"] and parsed.sampled_layers == []
