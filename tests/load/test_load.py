"""The load generator (`python -m tests.load`) in CI, bounded to a few seconds against the live server: correctness
only, never speed. Job polling and streaming completions from concurrent clients see no 5xx, no transport error,
no broken stream; past the generation limit the excess is refused with 429, and every 429 carries Retry-After;
clients each on their own fine-tune are all served, and so is a key whose neighbour floods the service.
The numbers it prints are not checked here (CI boxes vary); `python -m tests.load` records them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fuzz.conftest import Live
from tests.load.__main__ import main


@pytest.mark.timeout(180)
@pytest.mark.parametrize("live", ["sqlite"], indirect=True)
def test_load_is_served_or_shed_cleanly(live: Live, tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    limit = live.settings.max_concurrent_generations
    status = main(["--url", live.base_url, "--key", live.key, "--duration", "1.5", "--clients", "1,4",
                   "--max-tokens", "16", "--max-generations", str(limit), "--out", str(out),
                   "--fine-tunes", "3", "--flood", "--data-dir", str(live.settings.data_dir),
                   "--database-url", live.settings.database_url])
    report = json.loads(out.read_text())
    phases = {p["phase"]: p for p in report["phases"]}
    assert status == 0, json.dumps(report["phases"], indent=1)
    for phase in phases.values():
        assert phase["errors"] == 0 and phase["missing_retry_after"] == 0, phase
        assert all(int(s) < 500 for s in phase["statuses"]), phase
    assert phases["poll job x4"]["statuses"] == {"200": phases["poll job x4"]["requests"]}
    assert phases["stream completions x4"]["completion_tokens"] > 0
    overload = phases[f"overload x{limit + 16}"]
    assert overload["statuses"].get("429", 0) > 0, overload  # shed, not queued without bound
    assert overload["statuses"].get("200", 0) > 0, overload  # while the admitted ones are served
    # Three clients, each on its own fine-tune (pooled adapters in the base's engine), all served.
    mixed = phases["mixed fine-tunes x3"]
    assert mixed["statuses"] == {"200": mixed["requests"]} and mixed["completion_tokens"] > 0, mixed
    assert "stream completions x3" in phases and "x3" in report["mixed_vs_base_tokens_per_s"]
    # Another key floods (16 MiB bodies without a key, uploads, job creates, completions): the victim key is still
    # served, all 200s, quiet and flooded.
    flood = phases["flood x8"]
    assert flood["requests"] + flood["cut_off"] > 0 and flood["errors"] == 0, flood
    for name in ("victim poll x1", "victim stream x1"):
        for state in ("quiet", "flooded"):
            phase = phases[f"{name} ({state})"]
            assert phase["requests"] > 0 and phase["statuses"] == {"200": phase["requests"]}, phase
    assert set(report["flooded_vs_quiet_p99"]) == {"victim poll x1", "victim stream x1"}  # printed, not judged
