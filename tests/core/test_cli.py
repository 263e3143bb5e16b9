"""The `unsloth` command, in-process: import, generate, train (YAML + flags), export, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.core.test_gguf import write_gguf
from tests.helpers import tiny_model, tiny_model_dir
from unsloth_core.cli import main
from unsloth_core.data.synthetic import fact_rows, write_jsonl


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("cli"), std=0.3)


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("import-gguf", "generate", "train", "export", "bench", "serve", "worker", "keys", "models"):
        assert command in out


def test_import_gguf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_gguf(tmp_path / "m.gguf", tiny_model())
    assert main(["import-gguf", str(path), str(tmp_path / "out")]) == 0
    assert "imported" in capsys.readouterr().out
    assert (tmp_path / "out" / "config.json").is_file()


def test_generate_chat_stream_and_sampling(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["generate", "--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "8"]
    assert main([*common, "--chat", "--stream"]) == 0
    streamed = capsys.readouterr().out
    assert main([*common, "--chat"]) == 0
    assert capsys.readouterr().out == streamed  # greedy: the same text either way
    assert main([*common, "--temperature", "0.8", "--top-p", "0.9", "--seed", "1"]) == 0
    capsys.readouterr()
    assert main([*common, "--chat", "--load-in-4bit"]) == 0  # the same model in NF4
    assert capsys.readouterr().out.strip()


def test_train_from_yaml_with_flag_overrides_then_export(tmp_path: Path, model_dir: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", fact_rows(8))
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {model_dir}\ndata: {data}\nmax_steps: 5\nmicro_batch_size: 2\n"
                      f"max_seq_length: 96\nlora:\n  r: 4\n  lora_alpha: 8\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--output-dir", str(out), "--max-steps", "2",
                 "--lora-target-modules", "q_proj,v_proj"]) == 0
    text = capsys.readouterr().out
    assert "completed: 2/2 steps" in text and f"adapter saved to {out / 'final'}" in text
    adapter_config = (out / "final" / "adapter_config.json").read_text()
    assert '"r": 4' in adapter_config and '"o_proj"' not in adapter_config
    assert main(["export", "--model", str(model_dir), "--adapter", str(out / "final"), "--out",
                 str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "/no/such/model", "--prompt", "x"], "model path /no/such/model does not exist"),
    (["train", "--data", "x.jsonl"], "give --model and --data"),
    (["import-gguf", "/no/file.gguf", "out"], "does not exist"),
])
def test_errors_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_bad_training_data_names_the_lines(tmp_path: Path, model_dir: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "line 1" in err and "line 2" in err
