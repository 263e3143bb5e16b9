"""The engine end to end on each device present: the CPU always, a CUDA GPU when there is one (`gpu` marker; skipped
elsewhere). Where the per-op kernel tests check one kernel at a time, these check that the paths a GPU takes by
default (Triton kernels, the fused LoRA Functions, offloaded checkpointing, the compiled decode step, the batch
engine) give what the plain path gives, on a whole model. On the CPU the Triton kernels run in the interpreter.

`bench/gpu_check.sh` runs this file first on a lent GPU machine."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from tests.helpers import tiny_model, tiny_model_dir
from unsloth_core import kernels, quant
from unsloth_core.config import LlamaConfig
from unsloth_core.data.synthetic import fact_rows, write_jsonl
from unsloth_core.finetune import finetune, load_base
from unsloth_core.generate import Generator
from unsloth_core.kernels.backend import fused_lora_enabled, get_backend, set_fused_lora
from unsloth_core.lora import LoRAConfig, apply_lora, load_adapter, lora_layers
from unsloth_core.model import Llama
from unsloth_core.quant import quantize_model
from unsloth_core.sampling import SamplingParams
from unsloth_core.serving import BatchEngine
from unsloth_core.trainer import TrainArgs, TrainerCallbacks

DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)]
GREEDY = SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=[])


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


@pytest.fixture
def paths() -> Iterator[None]:
    """Leave the kernel backend and the fused-LoRA switch as they were."""
    backend, fused = get_backend(), fused_lora_enabled()
    yield
    kernels.set_backend(backend)
    set_fused_lora(fused)


def batch(vocab: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (2, 40), generator=g)
    labels = x.clone()
    labels[0, :10] = -100  # a prompt that is not trained on
    return x.to(device), labels.to(device)


def lora_step(model: Llama, x: torch.Tensor, labels: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    dtype = model.model.embed_tokens.weight.dtype
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = model(x, labels=labels).loss
    assert loss is not None
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                         if p.grad is not None}


def test_logits_match_transformers(device: torch.device) -> None:
    ours = tiny_model(seed=1).to(device)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ours.config.to_hf_dict()))
    hf.load_state_dict(ours.state_dict(), strict=True)
    hf = hf.to(device).eval()
    x, _ = batch(ours.config.vocab_size, device)
    with torch.no_grad():
        a, b = ours(x).logits, hf(x).logits
    assert a is not None and a.abs().max() > 1
    assert (a - b).abs().max() <= 1e-4



def test_a_model_built_on_the_device_runs_there(device: torch.device) -> None:
    """`with torch.device(...)`: Llama(config)` (how the bench builds an 8B model in place) puts RoPE's frequencies
    beside the weights; on a GPU they stayed on the CPU and the first forward failed."""
    with torch.device(device):
        model = Llama(LlamaConfig.from_name("tiny"))
    assert model.inv_freq.device.type == device.type
    x, _ = batch(model.config.vocab_size, device)
    with torch.no_grad():
        assert model(x).logits is not None
    with torch.device("meta"):
        assert Llama(LlamaConfig.from_name("tiny")).inv_freq.device.type == "cpu"  # init_buffers places it later

@pytest.mark.usefixtures("paths")
@pytest.mark.parametrize(("dtype", "base"), [(torch.float32, "dense"), (torch.bfloat16, "dense"),
                                             (torch.bfloat16, "nf4")], ids=["fp32", "bf16", "bf16-nf4"])
def test_the_fast_lora_path_matches_the_plain_one(device: torch.device, dtype: torch.dtype, base: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton kernels + the hand-derived LoRA Functions against plain torch + per-layer autograd: same loss and
    gradients on a whole model, with gradient checkpointing (offloaded on a GPU) on the fast side. In bf16 as the
    trainer runs it: frozen weights in bf16, LoRA weights in fp32, autocast; and as QLoRA, the base in NF4
    (dequantized by the Triton kernel on the fast side), moved to the device after quantizing."""
    model = apply_lora(tiny_model(seed=2, std=0.1), r=8, alpha=16, seed=0)
    with torch.no_grad():  # B starts at zero (PEFT's init): give it values, so every LoRA gradient is non-zero
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)
    if base == "nf4":
        quantize_model(model)
        if device.type == "cpu":
            # Triton's interpreter truncates fp32 -> bf16 where a GPU rounds, which biases every dequantized weight
            # by up to an ulp; kernels/test_nf4.py checks that kernel against its twin. Here the twin dequantizes.
            monkeypatch.setattr(quant, "use_triton", lambda op, x: False)
    model = model.to(device).train()
    assert base == "dense" or model.model.layers[0].mlp.down_proj.weight.packed.device.type == device.type
    x, labels = batch(model.config.vocab_size, device, seed=1)
    kernels.set_backend("reference")
    set_fused_lora(False)
    plain_loss, plain = lora_step(model, x, labels)
    kernels.set_backend("triton")
    set_fused_lora(True)
    model.gradient_checkpointing = "offload" if device.type == "cuda" else True
    fast_loss, fast = lora_step(model, x, labels)
    assert plain and set(fast) == set(plain)
    if dtype == torch.float32:
        assert abs(fast_loss - plain_loss) <= 1e-5 * abs(plain_loss)
        for name, g in plain.items():
            assert torch.allclose(fast[name], g, rtol=1e-4, atol=1e-6), name
    else:  # bf16 rounds differently along the two paths: compare as a whole, per tensor
        assert abs(fast_loss - plain_loss) <= 1e-2 * abs(plain_loss)
        for name, g in plain.items():
            assert (fast[name] - g).norm() <= 5e-2 * g.norm(), name


@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_the_compiled_decode_step_gives_the_same_tokens(device: torch.device, base: str) -> None:
    """CUDA graphs (`reduce-overhead`) on a GPU, inductor's C++ on the CPU; tokens read back in blocks. With an
    NF4 base too: the dequantization is part of the captured step."""
    if device.type == "cpu":
        pytest.skip("tests/core/test_generate.py compiles on the CPU (slow tier)")
    model = tiny_model(seed=11, std=0.3)
    model = (quantize_model(model) if base == "nf4" else model).to(device)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    eager = Generator(model, None, compile=False).generate(prompts, GREEDY)
    compiled = Generator(model, None, compile=True, max_seq_length=64)
    assert compiled.sync_every > 1
    for _ in range(2):  # the second call replays the captured graph
        assert [c.token_ids for c in compiled.generate(prompts, GREEDY)] == [c.token_ids for c in eager]



@pytest.mark.gpu
def test_captured_decode_graphs_follow_the_cache_and_the_weights() -> None:
    """unsloth_core/cuda_graphs.py: a graph per batch shape; a cache reallocated for another batch, weights changed
    in place, and weights moved to new storage all give the tokens an eager decode gives."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = tiny_model(seed=11, std=0.3).to("cuda")
    gen = Generator(model, None, compile=True, max_seq_length=64)

    def check(prompts: list[list[int]]) -> None:
        eager = Generator(model, None, compile=False).generate(prompts, GREEDY)
        assert [c.token_ids for c in gen.generate(prompts, GREEDY)] == [c.token_ids for c in eager]

    for prompts in ([[1, 2, 3], [4, 5]], [[7, 8, 9], [1, 2], [3]], [[1, 2, 3], [4, 5]]):
        check(prompts)  # the cache is reallocated at each change of batch size
    static = gen.engine._static  # the engine's compiled step (static_step.py), replaying captured graphs
    assert static is not None and static._graphs is not None and len(static._graphs.graphs) >= 1
    with torch.no_grad():
        model.blocks()[0].mlp.down_proj.weight.mul_(-1)  # in place: the captured graph reads the new values
        check([[1, 2, 3], [4, 5]])
        for p in model.parameters():
            p.data = p.data.clone()  # new storage: the graphs read the old addresses, so they must be dropped
        model.blocks()[0].self_attn.o_proj.weight.mul_(-1)
        check([[1, 2, 3], [4, 5]])


@pytest.mark.gpu
def test_the_served_step_replays_cuda_graphs_with_the_eager_tokens() -> None:
    """static_step.py on a GPU (BatchEngine's default there): batches of 1, 2 and 4 rows (three captured shapes),
    rows arriving while others run, and a cache grown past its first 256 slots give the eager engine's tokens."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = tiny_model(seed=11, std=0.3).to("cuda")
    cases = [([1, 2, 3], 30), ([9, 8, 7], 12), ([4, 4], 9), ([(7 * i) % 250 for i in range(300)], 6), ([42], 20)]

    def serve(compile: bool) -> list[list[int]]:
        engine = BatchEngine(model, None, max_batch_size=4, max_seq_length=512, compile=compile)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a fallback to the eager step fails the test
            first = engine.submit(cases[0][0], SamplingParams(temperature=0, max_new_tokens=cases[0][1],
                                                              stop_token_ids=[]))
            head = next(iter(first))
            streams = [first] + [engine.submit(p, SamplingParams(temperature=0, max_new_tokens=n, stop_token_ids=[]))
                                 for p, n in cases[1:]]
            out = [[t for d in ([head] if s is first else []) + list(s) for t in d.token_ids] for s in streams]
        assert engine.compile == compile
        engine.close()
        return out

    assert serve(True) == serve(False)


@pytest.mark.gpu
def test_the_compiled_decode_loop_does_not_sync_per_token() -> None:
    """The host runs ahead of the GPU: it waits only when it reads tokens back, once per `sync_every` steps (the
    engine's next inputs are carried on the device, its padding is device work). Every
    synchronizing call (a blocking copy, a read-back) warns under CUDA's sync debug mode; 32 more tokens may add
    about 32 / 8 of them, not 32."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = tiny_model(seed=11, std=0.3).to("cuda")
    gen = Generator(model, None, compile=True, max_seq_length=64)
    assert gen.sync_every == 8

    def syncs(new_tokens: int) -> int:
        params = SamplingParams(temperature=0, max_new_tokens=new_tokens, stop_token_ids=[])
        gen.generate([[1, 2, 3]], params)  # captured and warm: only the loop's own syncs are counted below
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                gen.generate([[1, 2, 3]], params)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return len(caught)

    assert syncs(48) - syncs(16) <= 8


@pytest.mark.gpu
def test_masked_attention_runs_in_fused_kernels() -> None:
    """A padded batch's prefill and decode, and a packed training row, in bf16 with grouped KV heads: attention
    runs with SDPA's math kernel forbidden (it would hold every score in fp32), so a fused kernel took each call."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = tiny_model(seed=11, std=0.3).to("cuda", torch.bfloat16)
    assert model.config.num_attention_heads != model.config.n_kv_heads
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    with sdpa_kernel(fused):
        Generator(model, None, compile=False).generate([[1, 2, 3], [4, 5, 6, 7, 8]], GREEDY)
        x = torch.randint(0, model.config.vocab_size, (1, 24), device="cuda")
        positions = torch.cat([torch.arange(10), torch.arange(14)]).to("cuda")[None]  # two packed samples
        loss = model(x, position_ids=positions, labels=x, return_logits=False).loss
        assert loss is not None
        loss.backward()


@pytest.mark.gpu
@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_a_fine_tune_runs_on_the_gpu(tmp_path: Path, load_in_4bit: bool) -> None:
    """The trainer as the worker runs it on a GPU (bf16 autocast, offloaded checkpointing, packing, LoRA dropout,
    a trained head; QLoRA too): it completes, its loss falls, and the adapter it writes loads back."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model_dir = tiny_model_dir(tmp_path / "model", std=0.05)
    data = write_jsonl(tmp_path / "facts.jsonl", fact_rows(24, seed=1))
    args = TrainArgs(output_dir=str(tmp_path / "out"), micro_batch_size=2, gradient_accumulation_steps=2,
                     max_steps=10, learning_rate=5e-3, max_seq_length=128, logging_steps=1, seed=7,
                     gradient_checkpointing="offload", packing=True, load_in_4bit=load_in_4bit)
    lora = LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.1, modules_to_save=None if load_in_4bit else ["lm_head"])
    log = _Log()
    result, final = finetune(model_dir, data, args, lora, callbacks=log, device=torch.device("cuda"))
    assert result.status == "completed"
    losses = [m["loss"] for m in log.logs if "loss" in m]
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    base, _ = load_base(model_dir, torch.device("cuda"), load_in_4bit, torch.bfloat16)
    served = load_adapter(base, final)
    assert Generator(served, None).generate([[1, 2, 3]], GREEDY)[0].token_ids


class _Log(TrainerCallbacks):
    def __init__(self) -> None:
        self.logs: list[dict[str, Any]] = []

    def on_log(self, metrics: dict[str, Any]) -> None:
        self.logs.append(metrics)

def test_the_batch_engine_matches_the_generator(device: torch.device) -> None:
    model = tiny_model(seed=11, std=0.3).to(device)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    expected = [c.token_ids for c in Generator(model, None, compile=False).generate(prompts, GREEDY)]
    engine = BatchEngine(model, None, max_batch_size=4, max_seq_length=64)
    try:
        streams = [engine.submit(p, GREEDY) for p in prompts]  # three requests in one decode batch
        got = [[t for d in s for t in d.token_ids] for s in streams]
    finally:
        engine.close()
    assert got == expected
