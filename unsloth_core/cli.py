"""The `unsloth` command: engine commands (import, generate, train, export, bench) and the service's (serve,
worker, keys, models). Errors a user can fix are printed as one line, never as a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from unsloth_core.errors import UnslothError

SERVICE_COMMANDS = {
    "serve": ("app.serve", "serve_main", "run the API and one training worker (embedded mode)"),
    "worker": ("worker.main", "worker_main", "run a Celery training worker"),
    "keys": ("app.cli", "keys_main", "manage API keys (create, list, revoke)"),
    "models": ("app.models_cli", "models_main", "manage base models (import, pull, list)"),
}


# ---- import-gguf ----


def cmd_import_gguf(a: argparse.Namespace) -> int:
    from unsloth_core.gguf_import import import_gguf

    out = import_gguf(a.file, a.out_dir, dtype=a.dtype)
    print(f"imported {a.file} -> {out}")
    return 0


# ---- generate ----


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def cmd_generate(a: argparse.Namespace) -> int:
    from unsloth_core.facade import FastLanguageModel
    from unsloth_core.generate import Generator
    from unsloth_core.lora import load_adapter
    from unsloth_core.sampling import SamplingParams

    model, tokenizer = FastLanguageModel.from_pretrained(a.model, dtype=a.dtype, load_in_4bit=a.load_in_4bit)
    if a.adapter:
        model = load_adapter(model, a.adapter)
    params = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                            top_k=a.top_k, min_p=a.min_p, repetition_penalty=a.repetition_penalty,
                            presence_penalty=a.presence_penalty, frequency_penalty=a.frequency_penalty, seed=a.seed,
                            stop=tuple(a.stop))
    prompt: str | list[int] = a.prompt
    if a.chat:
        messages = ([{"role": "system", "content": a.system}] if a.system else []) + [
            {"role": "user", "content": a.prompt}]
        prompt = tokenizer.encode(tokenizer.render_chat(messages, add_generation_prompt=True), add_special_tokens=False)
    gen = Generator(model, tokenizer)
    if a.stream:
        for deltas in gen.stream([prompt], params):
            for d in deltas:
                print(d.text, end="", flush=True)
        print()
    else:
        print(gen.generate([prompt], params)[0].text)
    return 0


# ---- train ----


def field_flags(p: argparse.ArgumentParser, cls: type, skip: set[str], prefix: str = "") -> None:
    """One --flag per dataclass field, typed from its annotation (bools take true/false)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + (prefix + f.name.removeprefix(prefix)).replace("_", "-")  # --lora-alpha, not --lora-lora-alpha
        p.add_argument(flag, dest=prefix + f.name, type=_parser_for(hints[f.name]), default=None,
                       help=f"(default: {f.default if f.default is not dataclasses.MISSING else 'see docs'})")


def _parser_for(hint: Any) -> Callable[[str], Any]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(t for t in typing.get_args(hint) if t is not type(None))
    origin = typing.get_origin(hint)
    if origin is list:
        return lambda s: [x.strip() for x in s.split(",") if x.strip()]
    if origin is tuple:
        return lambda s: tuple(float(x) for x in s.split(","))
    if hint in (int, float):
        return hint
    return _bool_or_str  # bool, str and Literal values: "true"/"false" become booleans


def _bool_or_str(s: str) -> Any:
    low = s.lower()
    return {"true": True, "false": False, "yes": True, "no": False}.get(low, s)


def cmd_train(a: argparse.Namespace) -> int:
    import yaml

    from unsloth_core.finetune import finetune
    from unsloth_core.lora import LoRAConfig
    from unsloth_core.progress import ProgressBar
    from unsloth_core.trainer import TrainArgs

    config: dict[str, Any] = {}
    if a.config:
        loaded = yaml.safe_load(Path(a.config).read_text()) or {}
        if not isinstance(loaded, dict):
            raise UnslothError(f"{a.config} must hold a mapping of settings")
        config = loaded
    lora_cfg = dict(config.pop("lora", None) or {})
    given = {k: v for k, v in vars(a).items() if v is not None}
    for f in dataclasses.fields(LoRAConfig):
        if "lora_" + f.name in given:
            lora_cfg[f.name] = given.pop("lora_" + f.name)
    settings = {**config, **{k: v for k, v in given.items() if k in {f.name for f in dataclasses.fields(TrainArgs)}}}
    model = given.get("model", config.get("model"))
    data = given.get("data", config.get("data"))
    if not model or not data:
        raise UnslothError("give --model and --data (or `model:` and `data:` in the --config file)")
    unknown = set(config) - {f.name for f in dataclasses.fields(TrainArgs)} - {"model", "data", "validation_file",
                                                                                "full_finetune", "lora"}
    if unknown:
        raise UnslothError(f"unknown settings in {a.config}: {', '.join(sorted(unknown))}")
    train_args = TrainArgs(**{k: v for k, v in settings.items()
                              if k in {f.name for f in dataclasses.fields(TrainArgs)}})
    full = given.get("full_finetune", config.get("full_finetune", False))
    lora = None if full else LoRAConfig(**lora_cfg)
    bar = ProgressBar()
    try:
        result, final = finetune(model, data, train_args, lora,
                                 validation_file=given.get("validation_file", config.get("validation_file")),
                                 callbacks=bar, resume="latest" if a.resume else None)
    finally:
        bar.close()
    print(f"{result.status}: {result.step}/{result.total_steps} steps, {result.trained_tokens} trained tokens")
    if final.exists() and result.status in ("completed", "early_stopped"):
        kind = "adapter" if lora is not None else "model"
        print(f"{kind} saved to {final}")
    elif result.checkpoint is not None:
        print(f"last checkpoint: {result.checkpoint}")
    return 0


# ---- export ----


def cmd_export(a: argparse.Namespace) -> int:
    """peft: the adapter as it is; merged: adapter folded in, HF directory; gguf: merged, one verified GGUF file
    per --quantization (and an Ollama Modelfile with --ollama)."""
    import torch

    from unsloth_core.checkpoint import load_model, save_model
    from unsloth_core.export import save_gguf
    from unsloth_core.export_gguf import quantization_type
    from unsloth_core.export_verify import summary
    from unsloth_core.facade import resolve_model_dir
    from unsloth_core.lora import load_adapter, save_adapter, strip_lora
    from unsloth_core.tokenizer import Tokenizer

    quantizations = [quantization_type(q) for q in a.quantization or ["q8_0"]]  # refused before any loading
    if a.format != "gguf" and (a.quantization or a.ollama):
        raise UnslothError("--quantization and --ollama apply to --format gguf only")
    if a.format == "peft" and not a.adapter:
        raise UnslothError("--format peft exports an adapter: give --adapter")
    base_dir = resolve_model_dir(a.model)
    model = load_model(base_dir, dtype=torch.float32)
    if a.adapter:
        model = load_adapter(model, a.adapter)
    tokenizer_dir = Path(a.adapter) if a.adapter and (Path(a.adapter) / "tokenizer.json").is_file() else base_dir
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    if a.format == "peft":
        save_adapter(model, a.out)
        tokenizer.save_pretrained(a.out)
        print(f"adapter written to {a.out}")
    elif a.format == "merged":
        merged = strip_lora(model) if model.lora_config is not None else model
        print(f"merged model written to {save_model(merged, a.out, tokenizer_dir=tokenizer_dir, dtype=a.dtype)}")
    else:
        for report in save_gguf(model, a.out, tokenizer, quantizations, ollama=a.ollama):
            print(f"verified {summary(report)}")
        print(f"GGUF written to {a.out}" + (" (with an Ollama Modelfile)" if a.ollama else ""))
    return 0


# ---- the parser ----


def build_parser() -> argparse.ArgumentParser:
    from unsloth_core.lora import LoRAConfig
    from unsloth_core.trainer import TrainArgs

    parser = argparse.ArgumentParser(
        prog="unsloth", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fast LoRA fine-tuning and serving for Llama-architecture models.",
        epilog="examples:\n"
               "  unsloth import-gguf model.gguf models/my-model\n"
               "  unsloth generate --model smollm2-135m-instruct --chat --prompt 'What is the capital of France?'\n"
               "  unsloth train --model smollm2-135m-instruct --data train.jsonl --output-dir runs/demo\n"
               "  unsloth export --model smollm2-135m-instruct --adapter runs/demo/final --format gguf "
               "--quantization q8_0 --ollama --out gguf/demo\n"
               "  unsloth serve                      # API + worker on 127.0.0.1:8000\n")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("import-gguf", help="convert a Llama GGUF file into a Hugging Face model directory")
    p.add_argument("file")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=cmd_import_gguf)

    p = sub.add_parser("generate", help="generate text from a model (and optional adapter)")
    p.add_argument("--model", required=True, help="model directory, .gguf file, or smollm2-135m-instruct")
    p.add_argument("--adapter", help="a LoRA adapter directory (PEFT format) to apply")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", help="system message (with --chat)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--load-in-4bit", dest="load_in_4bit", action="store_true",
                   help="keep the block projections in 4-bit NF4 (a quarter of the 16-bit memory)")
    add_sampling_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("train", help="fine-tune (LoRA by default) from a YAML file and/or flags",
                       description="Flags override the --config file. LoRA settings go under `lora:` in YAML or "
                                   "as --lora-* flags; --full-finetune trains every weight instead.")
    p.add_argument("--config", help="YAML file with model, data, validation_file, lora and TrainArgs settings")
    p.add_argument("--model", default=None)
    p.add_argument("--data", default=None, help="training JSONL")
    p.add_argument("--validation-file", dest="validation_file", default=None)
    p.add_argument("--full-finetune", dest="full_finetune", action="store_true", default=None)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    field_flags(p, TrainArgs, skip=set())
    field_flags(p, LoRAConfig, skip={"base_model_name_or_path", "bias"}, prefix="lora_")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="write a model (and adapter) as a PEFT adapter, a merged Hugging Face "
                                      "directory, or verified GGUF files for llama.cpp / Ollama")
    p.add_argument("--model", required=True, help="base model directory, .gguf file, or smollm2-135m-instruct")
    p.add_argument("--adapter", help="a LoRA adapter directory (PEFT format), merged into the base")
    p.add_argument("--out", required=True)
    p.add_argument("--format", default="merged", choices=["peft", "merged", "gguf"])
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="weights of --format merged")
    p.add_argument("--quantization", action="append", default=None,
                   help="GGUF type, repeatable (default q8_0): f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0")
    p.add_argument("--ollama", action="store_true", help="also write an Ollama Modelfile (GGUF only)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="benchmarks against HF transformers + PEFT (see bench/)", add_help=False)
    p.set_defaults(func=None, passthrough="bench")
    for name, (_module, _fn, help_text) in SERVICE_COMMANDS.items():
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.set_defaults(func=None, passthrough=name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and (argv[0] in SERVICE_COMMANDS or argv[0] == "bench"):
        return _passthrough(argv[0], argv[1:])
    a = parser.parse_args(argv)
    if a.command is None:
        parser.print_help()
        return 0
    try:
        return int(a.func(a))
    except (UnslothError, ValueError, FileNotFoundError) as e:
        print(f"unsloth {a.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"unsloth {a.command}: interrupted", file=sys.stderr)
        return 130


def _passthrough(command: str, rest: list[str]) -> int:
    """Service commands live in `app`/`worker` (and `bench`); import them only when asked for."""
    import importlib

    if command == "bench":
        module = importlib.import_module("bench.__main__")
        return int(module.main(rest) or 0)
    module_name, fn_name, _ = SERVICE_COMMANDS[command]
    return int(getattr(importlib.import_module(module_name), fn_name)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
