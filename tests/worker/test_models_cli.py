"""`unsloth models import|list|pull`: GGUF files and Hugging Face directories installed into the data dir's models
dir (atomically, by name), and one-line errors for what cannot be installed or downloaded."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.helpers import tiny_model, tiny_model_dir
from unsloth_core.checkpoint import load_model
from unsloth_core.cli import main as unsloth


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("UNSLOTH_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "data").mkdir()
    return tmp_path / "data"


def test_import_a_hugging_face_directory_and_list(data_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    source = tiny_model_dir(tmp_path / "src")
    assert unsloth(["models", "import", str(source), "--name", "my-org/tiny"]) == 0
    installed = data_dir / "models" / "my-org" / "tiny"
    assert (installed / "config.json").is_file() and (installed / "tokenizer.json").is_file()
    assert load_model(installed).config.hidden_size == 64
    assert unsloth(["models", "list"]) == 0
    assert "my-org/tiny\tcontext 512" in capsys.readouterr().out
    assert unsloth(["models", "import", str(source), "--name", "my-org/tiny"]) == 1
    assert "already installed" in capsys.readouterr().err
    assert unsloth(["models", "import", str(source), "--name", "my-org/tiny", "--force"]) == 0
    assert unsloth(["models", "import", str(source), "--name", "../escape"]) == 1
    assert "not a usable model name" in capsys.readouterr().err


def test_import_a_gguf_file(data_dir: Path, tmp_path: Path) -> None:
    from tests.core.test_gguf import write_gguf

    path = write_gguf(tmp_path / "Tiny-Model.Q8_0.gguf", tiny_model())
    assert unsloth(["models", "import", str(path)]) == 0
    assert load_model(data_dir / "models" / "tiny-model-q8_0").config.num_hidden_layers == 2


def test_what_cannot_be_imported_is_one_line(data_dir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert unsloth(["models", "import", str(tmp_path / "empty")]) == 1
    assert unsloth(["models", "import", str(tmp_path / "nothing.bin")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no config.json" in err[0] and "neither a .gguf file" in err[1]
    assert not any((data_dir / "models").iterdir())


def test_pull_without_the_hub_is_one_line(data_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here: the Hub cannot be reached
    assert unsloth(["models", "pull", "HuggingFaceTB/SmolLM2-135M-Instruct"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unsloth: cannot download HuggingFaceTB/SmolLM2-135M-Instruct")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed: it is an optional dependency
    assert unsloth(["models", "pull", "HuggingFaceTB/SmolLM2-135M-Instruct"]) == 1
    assert "needs the huggingface_hub package" in capsys.readouterr().err
    assert not any((data_dir / "models").iterdir())
