"""Many adapters in one batch: rows on different adapters (ranks, target modules) and on the base model share one
engine and give, token for token, what each adapter gives served alone, and what PEFT gives on transformers."""

from __future__ import annotations

import threading
from pathlib import Path

import peft
import pytest
import torch

from tests.core.test_model_parity import hf_twin
from tests.helpers import tiny_model, wait_until
from unsloth_core.adapters import BASE, AdapterPool
from unsloth_core.errors import CapacityError, ModelFormatError
from unsloth_core.generate import Generator
from unsloth_core.lora import LoRAConfig, inject, load_adapter, lora_layers, save_adapter
from unsloth_core.model import Llama
from unsloth_core.sampling import SamplingParams
from unsloth_core.serving import BatchEngine, Stream

GREEDY = SamplingParams(temperature=0, max_new_tokens=16, stop_token_ids=[])
SEED = 12


def base() -> Llama:
    return tiny_model(seed=SEED, std=0.3)


def make_adapter(directory: Path, seed: int, r: int, targets: list[str]) -> Path:
    """A trained-looking adapter (B not zero) saved in PEFT's format."""
    model = inject(base(), LoRAConfig(r=r, lora_alpha=2 * r, target_modules=targets), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.2, generator=g)
    return save_adapter(model, directory)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {"all-r8": make_adapter(root / "a", 1, 8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                             "down_proj"]),
            "qv-r4": make_adapter(root / "b", 2, 4, ["q_proj", "v_proj"]),
            "mlp-r16": make_adapter(root / "c", 3, 16, ["gate_proj", "up_proj", "down_proj"])}


def alone(directory: Path | None, prompt: list[int]) -> list[int]:
    model = base() if directory is None else load_adapter(base(), directory)
    return Generator(model, None, compile=False).generate([prompt], GREEDY)[0].token_ids


def test_a_mixed_batch_gives_what_each_adapter_gives_alone(adapters: dict[str, Path]) -> None:
    model = base()
    pool = AdapterPool(model, capacity=4)
    for name, directory in adapters.items():
        pool.load(name, directory)
    engine = BatchEngine(model, None, max_batch_size=8, max_seq_length=64, adapters=pool)
    rows: list[tuple[str | None, list[int]]] = [("all-r8", [1, 2, 3]), (None, [4, 5, 6, 7]), ("qv-r4", [1, 2, 3]),
                                                ("mlp-r16", [9]), ("all-r8", [200, 100, 50]), (None, [1, 2, 3]),
                                                ("all-r8", [1, 2, 3])]  # shares its prefill with row 0 alone
    release = threading.Event()
    items: list[object] = []

    def hold(item: object) -> None:  # the first item holds the engine until every row is queued: one batch
        items.append(item)
        if len(items) == 1:
            release.wait(timeout=30)

    engine.submit([7, 7], GREEDY, stream=Stream(1, hold))
    streams = [engine.submit(prompt, GREEDY, adapter=name) for name, prompt in rows]
    release.set()
    got = [[t for d in s for t in d.token_ids] for s in streams]
    engine.close()
    want = [alone(None if name is None else adapters[name], prompt) for name, prompt in rows]
    assert got == want
    assert len({tuple(g) for g in got[:3]}) == 3  # the adapters do change the output
    assert pool.index is None  # cleared after every forward


def test_pooled_logits_match_peft_on_transformers(adapters: dict[str, Path]) -> None:
    """One forward over rows on three adapters and the base against PEFT's model of each adapter."""
    model = base()
    pool = AdapterPool(model, capacity=4)
    names = list(adapters)
    for name in names:
        pool.load(name, adapters[name])
    x = torch.randint(0, model.config.vocab_size, (4, 10), generator=torch.Generator().manual_seed(5))
    slots = [pool.acquire(n) for n in names] + [BASE]
    pool.use(slots, 10)
    with torch.no_grad():
        ours = model(x).logits
    pool.clear()
    assert ours is not None
    for row, name in enumerate(names):
        theirs = peft.PeftModel.from_pretrained(hf_twin(base()), adapters[name]).eval()
        with torch.no_grad():
            assert (theirs(input_ids=x[row : row + 1]).logits[0] - ours[row]).abs().max() <= 1e-4
    with torch.no_grad():
        assert (hf_twin(base())(input_ids=x[3:]).logits[0] - ours[3]).abs().max() <= 1e-4


def test_slots_are_reused_least_recently_used_and_never_while_held(adapters: dict[str, Path]) -> None:
    model = base()
    pool = AdapterPool(model, capacity=2)
    pool.load("a", adapters["all-r8"])
    pool.load("b", adapters["qv-r4"])
    held = pool.acquire("a")  # a running request
    pool.load("c", adapters["mlp-r16"])  # the pool is full: b, unheld, gives its slot; a stays
    assert sorted(pool.loaded()) == ["a", "c"]
    held_c = pool.acquire("c")
    with pytest.raises(CapacityError, match="held by running requests"):
        pool.load("d", adapters["qv-r4"])
    assert not pool.remove("a")  # in use
    pool.release(held)
    pool.release(held_c)
    pool.load("d", adapters["qv-r4"])
    assert sorted(pool.loaded()) == ["c", "d"]  # a was the least recently used
    # The slot a had now holds d, and d serves what it serves alone (the rank-8 rows were cleared).
    engine = BatchEngine(model, None, max_batch_size=2, max_seq_length=64, adapters=pool)
    out = [t for d in engine.submit([1, 2, 3], GREEDY, adapter="d") for t in d.token_ids]
    wait_until(lambda: not engine._live)
    engine.close()
    assert out == alone(adapters["qv-r4"], [1, 2, 3])
    with pytest.raises(CapacityError, match="not loaded"):
        pool.acquire("a")


def test_an_adapter_that_trains_the_head_is_refused(tmp_path: Path) -> None:
    model = inject(base(), LoRAConfig(r=4, modules_to_save=["lm_head"]), seed=0)
    save_adapter(model, tmp_path / "head")
    with pytest.raises(ModelFormatError, match="cannot share a batch"):
        AdapterPool(base()).load("head", tmp_path / "head")


def test_loading_while_streams_run_changes_nothing_they_get(adapters: dict[str, Path]) -> None:
    """Loads that grow the stacks (a larger rank, more slots) happen beside running streams, which keep decoding
    and get what they get alone, whatever step the swap lands in."""
    model = base()
    pool = AdapterPool(model, capacity=4)
    pool.load("qv-r4", adapters["qv-r4"])
    engine = BatchEngine(model, None, max_batch_size=4, max_seq_length=128, adapters=pool)
    long = SamplingParams(temperature=0, max_new_tokens=60, stop_token_ids=[])
    started = threading.Event()
    items: list[object] = []

    def on_item(item: object) -> None:
        items.append(item)
        started.set()

    engine.submit([1, 2, 3], long, stream=Stream(1, on_item), adapter="qv-r4")
    assert started.wait(timeout=30)
    pool.load("mlp-r16", adapters["mlp-r16"])  # rank 4 -> 16: every layer's stacks replaced
    pool.load("all-r8", adapters["all-r8"])
    wait_until(lambda: items and items[-1] is None)
    engine.close()
    got = [t for d in items if d is not None for t in d.token_ids]  # type: ignore[attr-defined]
    want = Generator(load_adapter(base(), adapters["qv-r4"]), None, compile=False).generate([[1, 2, 3]], long)
    assert got == want[0].token_ids


def test_a_pooled_engine_compiles_its_base_step_once_and_serves_adapters_beside_it(
        adapters: dict[str, Path]) -> None:
    """The compiled static step (static_step.py) serves base-only batches of an engine with a pool; batches with
    adapter rows take the eager step. Loading adapters between base batches must not recompile the base step (the
    pooled layers do not read their stacks on base rows, so the compiled step holds no guard on them)."""
    from torch._dynamo.utils import counters

    model = base()
    pool = AdapterPool(model, capacity=4)
    engine = BatchEngine(model, None, max_batch_size=2, max_seq_length=64, adapters=pool, compile=True)

    def serve(adapter: str | None) -> list[int]:
        deltas = list(engine.submit([1, 2, 3], GREEDY, adapter=adapter))
        return [t for d in deltas for t in d.token_ids]

    assert serve(None) == alone(None, [1, 2, 3])  # compiles the base step
    graphs = counters["stats"]["unique_graphs"]
    for name, directory in adapters.items():
        pool.load(name, directory)  # each load grows or rewrites the stacks
        assert serve(name) == alone(directory, [1, 2, 3])  # an adapter row: the eager step
        assert serve(None) == alone(None, [1, 2, 3])
    assert counters["stats"]["unique_graphs"] == graphs and engine.compile
    engine.close()
