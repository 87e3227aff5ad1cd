"""run.json read through `RunRecord`: the run folder's decisions and the readers of a run's
settings (eval, capacity) see a typed record, and a file that is not one is refused in one line."""

import json

import pytest

from oml_core.errors import OMLInputError
from oml_core.runs import COMPLETE, RunFolder, RunRecord, provenance

WRITTEN = {"run_key": "a" * 16, "config": {"method": "gated", "format": "auto"},
           "base_model": "/models/base", "base_identity": {"config_sha256": "b" * 64, "weights": []},
           "fingerprints_sha256": "c" * 64, **provenance()}


def test_a_record_dumps_back_to_the_same_keys_in_the_same_order():
    record = RunRecord.model_validate(WRITTEN)
    assert list(record.model_dump(mode="json")) == list(WRITTEN)
    assert record.model_dump(mode="json") == json.loads(json.dumps(WRITTEN))
    assert record.setting("method") == "gated"
    assert record.setting("a_setting_of_a_later_version", 3) == 3


def test_the_folder_decides_from_the_record(tmp_path):
    run = RunFolder(tmp_path / "run")
    assert run.prepare("a" * 16) == "fresh"
    (run.path / "run.json").write_text(json.dumps(WRITTEN))
    assert run.record().run_key == "a" * 16
    assert run.prepare("a" * 16) == "restart"
    (run.path / COMPLETE).write_text("done\n")
    assert run.prepare("a" * 16) == "reuse" and run.reusable_action("a" * 16) == "reuse"
    with pytest.raises(OMLInputError, match="holds a different run"):
        run.prepare("d" * 16)


@pytest.mark.parametrize("content", ['{"run_key": 7, "config": "x"}', "[]", "{not json"])
def test_a_run_json_that_is_no_record_is_refused_in_one_line(tmp_path, content):
    (tmp_path / "run.json").write_text(content)
    run = RunFolder(tmp_path)
    assert run.record() is None
    assert run.reusable_action("a" * 16) == "fresh"
    with pytest.raises(OMLInputError) as err:
        run.prepare("a" * 16)
    assert "pass a new or empty folder" in str(err.value) and "\n" not in str(err.value)
