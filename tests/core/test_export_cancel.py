"""Cancelling an export inside the engine call: `should_stop` is asked between tensors (merging, writing, reading
back) and between probes (verifying); once it says so the export raises ExportCancelled and leaves nothing, and an
earlier export at the same place stays as it was."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.core.test_export_gguf import trained_adapter
from tests.helpers import make_tiny_tokenizer
from unsloth_core.export import save_gguf
from unsloth_core.export_cancel import ExportCancelled
from unsloth_core.export_merged import save_merged


class StopAfter:
    """A should_stop that says stop from its (n + 1)th call on, counting every call."""

    def __init__(self, n: int | None) -> None:
        self.n, self.calls = n, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.n is not None and self.calls > self.n


def cancelled_at_each_stage(export: Callable[[Path, StopAfter], object], out: Path,
                            stages: dict[str, float]) -> None:
    """Export once to `out` (counting the checks), then cancel a new export to the same place at each stage: at
    the given share of the checks, the error names the stage, and `out` is left as the first export wrote it."""
    full = StopAfter(None)
    export(out, full)
    assert full.calls >= 20  # asked between units of work, not once per stage
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for stage, share in stages.items():
        stop = StopAfter(int(full.calls * share))
        with pytest.raises(ExportCancelled, match=stage):
            export(out, stop)
        assert stop.calls == stop.n + 1  # it stopped at the first True
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary left


def test_a_gguf_export_stops_between_tensors_and_probes(tmp_path: Path) -> None:
    model, tok = trained_adapter(), make_tiny_tokenizer()
    cancelled_at_each_stage(
        lambda out, stop: save_gguf(model, out, tok, ["f32", "f16"], should_stop=stop), tmp_path / "gguf",
        {"merging the adapter": 0.0, "writing the GGUF file": 0.1, "reading the GGUF file back": 0.25,
         "comparing the export": 0.95})


def test_a_merged_export_stops_between_blocks_and_probes(tmp_path: Path) -> None:
    model, tok = trained_adapter(), make_tiny_tokenizer()
    cancelled_at_each_stage(
        lambda out, stop: save_merged(model, out, tok, "f16", should_stop=stop), tmp_path / "merged",
        {"merging the adapter": 0.0, "comparing the export": 0.5})
