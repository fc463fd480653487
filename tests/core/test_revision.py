"""`--model org/name@REVISION` pins a hub revision, as the authors pin Mistral-7B-Instruct-v0.2 to dca6e4b
(HeadKV `run_longbench.py` L320–326, `retrieval_head_detection_r2.py` L163–164)."""

from __future__ import annotations

import headscore.core.model as model_module
from headscore.core.model import load_geometry, load_tokenizer, split_revision

PIN = "dca6e4b60aca009ed25ffa70c9bb65e46960a573"


def test_split_revision(tmp_path):
    assert split_revision(f"mistralai/Mistral-7B-Instruct-v0.2@{PIN}") == ("mistralai/Mistral-7B-Instruct-v0.2",
                                                                           {"revision": PIN})
    assert split_revision("mistralai/Mistral-7B-Instruct-v0.2") == ("mistralai/Mistral-7B-Instruct-v0.2", {})
    folder = tmp_path / "model@v1"
    folder.mkdir()
    assert split_revision(str(folder)) == (str(folder), {})  # an existing path stays whole
    assert split_revision("name@") == ("name@", {})


def test_the_revision_reaches_from_pretrained(monkeypatch):
    seen = []

    def record(source, **kwargs):
        seen.append((source, kwargs))
        raise OSError("offline")

    monkeypatch.setattr(model_module.AutoTokenizer, "from_pretrained", record)
    monkeypatch.setattr(model_module.AutoConfig, "from_pretrained", record)
    for load in (load_tokenizer, load_geometry):
        try:
            load(f"mistralai/Mistral-7B-Instruct-v0.2@{PIN}")
        except Exception as error:  # the one-line HeadscoreError of an unreachable hub
            assert "offline" in str(error)
    assert seen == [("mistralai/Mistral-7B-Instruct-v0.2", {"revision": PIN})] * 2
