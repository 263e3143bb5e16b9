"""Acceptance (issue 17): Unsloth's public Llama notebooks run end to end on the CPU against unsloth_core.

The cells below are the code cells of unslothai/notebooks `nb/Llama3.1_(8B)-Alpaca.ipynb` and
`nb/Llama3.2_(1B_and_3B)-Conversational.ipynb` (LGPL-3.0; cited as test data, not part of the library), as written
there except for what the notebooks cannot do here, each marked `# changed:`:
- imports from `unsloth`, `trl` and `transformers` come from `unsloth_core`;
- the model is the bundled SmolLM2-135M-Instruct, and the dataset a small local one with the same columns;
- `max_steps` is 2, and tensors go `.to("cpu")` instead of `.to("cuda")`;
- the save cells' `if False:` guards are lifted for saving merged and GGUF in f16 (push_to_hub, merged_4bit
  and the quantized GGUFs stay off: q8_0's export took 107 s here against f16's 23 s; test_export_gguf.py has it).
Left out: the install cell, the GPU memory-stats cells (they need CUDA) and the unused list of 4-bit model names.
Each cell runs with `exec` in one namespace, in a temporary working directory, and the test checks what it made.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from unsloth_core.data import IGNORE_INDEX
from unsloth_core.lora import LoRALinear

pytestmark = pytest.mark.slow

ALPACA_ROWS = [
    {"instruction": "Give the capital of the country.", "input": "France", "output": "Paris."},
    {"instruction": "Add the two numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Name a primary colour.", "input": "", "output": "Red."},
    {"instruction": "Reverse the word.", "input": "stop", "output": "pots"},
    {"instruction": "Continue the sequence.", "input": "1, 2, 3, 4", "output": "5, 6, 7"},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour."},
    {"instruction": "Give the opposite.", "input": "hot", "output": "cold"},
    {"instruction": "Count the letters.", "input": "cat", "output": "3"},
]


def sharegpt(system: str | None, *turns: str) -> list[dict[str, str]]:
    messages = [{"from": "system", "value": system}] if system else []
    return messages + [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]


# FineTome-100k's columns: conversations (ShareGPT), source, score.
CONVERSATION_ROWS = [
    {"conversations": sharegpt(None, "What is 2+2?", "2+2 is 4."), "source": "local", "score": 5.0},
    {"conversations": sharegpt("You are terse.", "Capital of Italy?", "Rome."), "source": "local", "score": 4.9},
    {"conversations": sharegpt(None, "Say hi.", "Hi!", "Say bye.", "Bye!"), "source": "local", "score": 4.8},
    {"conversations": sharegpt(None, "Name a fruit.", "An apple."), "source": "local", "score": 4.7},
    {"conversations": sharegpt(None, "What colour is the sky?", "Blue, on a clear day."), "source": "local",
     "score": 4.6},
    {"conversations": sharegpt("Answer in one word.", "Opposite of up?", "Down.", "Of left?", "Right."),
     "source": "local", "score": 4.5},
    {"conversations": sharegpt(None, "Continue: a, b, c,", "d, e, f"), "source": "local", "score": 4.4},
]

ALPACA_CELLS = [
    '''
from unsloth_core import FastLanguageModel  # changed: from unsloth
import torch
max_seq_length = 2048 # Choose any! We auto support RoPE Scaling internally!
dtype = None # None for auto detection. Float16 for Tesla T4, V100, Bfloat16 for Ampere+
load_in_4bit = True # Use 4bit quantization to reduce memory usage. Can be False.

model, tokenizer = FastLanguageModel.from_pretrained(
    model_name = "smollm2-135m-instruct",  # changed: "unsloth/Meta-Llama-3.1-8B"
    max_seq_length = max_seq_length,
    dtype = dtype,
    load_in_4bit = load_in_4bit,
    # token = "hf_...", # use one if using gated models like meta-llama/Llama-2-7b-hf
)
''', '''
model = FastLanguageModel.get_peft_model(
    model,
    r = 16, # Choose any number > 0 ! Suggested 8, 16, 32, 64, 128
    target_modules = ["q_proj", "k_proj", "v_proj", "o_proj",
                      "gate_proj", "up_proj", "down_proj",],
    lora_alpha = 16,
    lora_dropout = 0, # Supports any, but = 0 is optimized
    bias = "none",    # Supports any, but = "none" is optimized
    # [NEW] "unsloth" uses 30% less VRAM, fits 2x larger batch sizes!
    use_gradient_checkpointing = "unsloth", # True or "unsloth" for very long context
    random_state = 3407,
    use_rslora = False,  # We support rank stabilized LoRA
    loftq_config = None, # And LoftQ
)
''', '''
alpaca_prompt = """Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.

### Instruction:
{}

### Input:
{}

### Response:
{}"""

EOS_TOKEN = tokenizer.eos_token # Must add EOS_TOKEN
def formatting_prompts_func(examples):
    instructions = examples["instruction"]
    inputs       = examples["input"]
    outputs      = examples["output"]
    texts = []
    for instruction, input, output in zip(instructions, inputs, outputs):
        # Must add EOS_TOKEN, otherwise your generation will go on forever!
        text = alpaca_prompt.format(instruction, input, output) + EOS_TOKEN
        texts.append(text)
    return { "text" : texts, }

from datasets import Dataset  # changed: load_dataset("yahma/alpaca-cleaned", split = "train")
dataset = Dataset.from_list(ALPACA_ROWS)
dataset = dataset.map(formatting_prompts_func, batched = True,)
''',  # noqa: E501 (the notebook's lines)
    '''
from unsloth_core import SFTConfig, SFTTrainer  # changed: from trl
trainer = SFTTrainer(
    model = model,
    tokenizer = tokenizer,
    train_dataset = dataset,
    dataset_text_field = "text",
    max_seq_length = max_seq_length,
    packing = False, # Can make training 5x faster for short sequences.
    args = SFTConfig(
        per_device_train_batch_size = 2,
        gradient_accumulation_steps = 4,
        warmup_steps = 5,
        # num_train_epochs = 1, # Set this for 1 full training run.
        max_steps = 2,  # changed: 60
        learning_rate = 2e-4,
        logging_steps = 1,
        optim = "adamw_8bit",
        weight_decay = 0.01,
        lr_scheduler_type = "linear",
        seed = 3407,
        output_dir = "outputs",
        report_to = "none", # Use this for WandB etc
    ),
)
''', '''
trainer_stats = trainer.train()
''', '''
# alpaca_prompt = Copied from above
FastLanguageModel.for_inference(model) # Enable native 2x faster inference
inputs = tokenizer(
[
    alpaca_prompt.format(
        "Continue the fibonnaci sequence.", # instruction
        "1, 1, 2, 3, 5, 8", # input
        "", # output - leave this blank for generation!
    )
], return_tensors = "pt").to("cpu")  # changed: "cuda"

outputs = model.generate(**inputs, max_new_tokens = 64, use_cache = True)
tokenizer.batch_decode(outputs)
''', '''
# alpaca_prompt = Copied from above
FastLanguageModel.for_inference(model) # Enable native 2x faster inference
inputs = tokenizer(
[
    alpaca_prompt.format(
        "Continue the fibonnaci sequence.", # instruction
        "1, 1, 2, 3, 5, 8", # input
        "", # output - leave this blank for generation!
    )
], return_tensors = "pt").to("cpu")  # changed: "cuda"

from unsloth_core import TextStreamer  # changed: from transformers
text_streamer = TextStreamer(tokenizer)
_ = model.generate(**inputs, streamer = text_streamer, max_new_tokens = 128)
''', '''
model.save_pretrained("lora_model")  # Local saving
tokenizer.save_pretrained("lora_model")
# model.push_to_hub("your_name/lora_model", token = "...") # Online saving
# tokenizer.push_to_hub("your_name/lora_model", token = "...") # Online saving
''', '''
if False:
    from unsloth_core import FastLanguageModel  # changed: from unsloth
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name = "lora_model", # YOUR MODEL YOU USED FOR TRAINING
        max_seq_length = max_seq_length,
        dtype = dtype,
        load_in_4bit = load_in_4bit,
    )
    FastLanguageModel.for_inference(model) # Enable native 2x faster inference

# alpaca_prompt = You MUST copy from above!

inputs = tokenizer(
[
    alpaca_prompt.format(
        "What is a famous tall tower in Paris?", # instruction
        "", # input
        "", # output - leave this blank for generation!
    )
], return_tensors = "pt").to("cpu")  # changed: "cuda"

from unsloth_core import TextStreamer  # changed: from transformers
text_streamer = TextStreamer(tokenizer)
_ = model.generate(**inputs, streamer = text_streamer, max_new_tokens = 128)
''', '''
# Merge to 16bit
if True: model.save_pretrained_merged("model", tokenizer, save_method = "merged_16bit",)  # changed: if False
if False: model.push_to_hub_merged("hf/model", tokenizer, save_method = "merged_16bit", token = "")

# Merge to 4bit
if False: model.save_pretrained_merged("model", tokenizer, save_method = "merged_4bit",)
if False: model.push_to_hub_merged("hf/model", tokenizer, save_method = "merged_4bit", token = "")

# Just LoRA adapters
if False:
    model.save_pretrained("model")
    tokenizer.save_pretrained("model")
if False:
    model.push_to_hub("hf/model", token = "")
    tokenizer.push_to_hub("hf/model", token = "")
''', '''
# Save to 8bit Q8_0
if False: model.save_pretrained_gguf("model", tokenizer,)
# Remember to go to https://huggingface.co/settings/tokens for a token!
# And change hf to your username!
if False: model.push_to_hub_gguf("hf/model", tokenizer, token = "")

# Save to 16bit GGUF
if True: model.save_pretrained_gguf("model", tokenizer, quantization_method = "f16")  # changed: if False
if False: model.push_to_hub_gguf("hf/model", tokenizer, quantization_method = "f16", token = "")

# Save to q4_k_m GGUF
if False: model.save_pretrained_gguf("model", tokenizer, quantization_method = "q4_k_m")
if False: model.push_to_hub_gguf("hf/model", tokenizer, quantization_method = "q4_k_m", token = "")
''']

CONVERSATIONAL_CELLS = [
    '''
from unsloth_core import FastLanguageModel  # changed: from unsloth
import torch
max_seq_length = 2048 # Choose any! We auto support RoPE Scaling internally!
dtype = None # None for auto detection. Float16 for Tesla T4, V100, Bfloat16 for Ampere+
load_in_4bit = True # Use 4bit quantization to reduce memory usage. Can be False.

model, tokenizer = FastLanguageModel.from_pretrained(
    model_name = "smollm2-135m-instruct",  # changed: "unsloth/Llama-3.2-3B-Instruct"
    max_seq_length = max_seq_length,
    dtype = dtype,
    load_in_4bit = load_in_4bit,
    # token = "YOUR_HF_TOKEN", # HF Token for gated models
)
''', ALPACA_CELLS[1], '''
from unsloth_core.chat_templates import get_chat_template  # changed: from unsloth.chat_templates

tokenizer = get_chat_template(
    tokenizer,
    chat_template = "llama-3.1",
)

def formatting_prompts_func(examples):
    convos = examples["conversations"]
    texts = [tokenizer.apply_chat_template(convo, tokenize = False, add_generation_prompt = False) for convo in convos]
    return { "text" : texts, }

from datasets import Dataset  # changed: load_dataset("mlabonne/FineTome-100k", split = "train")
dataset = Dataset.from_list(CONVERSATION_ROWS)
''', '''
from unsloth_core.chat_templates import standardize_sharegpt  # changed: from unsloth.chat_templates
dataset = standardize_sharegpt(dataset)
dataset = dataset.map(formatting_prompts_func, batched = True,)
''', '''
dataset[5]["conversations"]
''', '''
dataset[5]["text"]
''', '''
from unsloth_core import SFTConfig, SFTTrainer  # changed: from trl
from unsloth_core import DataCollatorForSeq2Seq  # changed: from transformers
trainer = SFTTrainer(
    model = model,
    tokenizer = tokenizer,
    train_dataset = dataset,
    dataset_text_field = "text",
    max_seq_length = max_seq_length,
    data_collator = DataCollatorForSeq2Seq(tokenizer = tokenizer),
    packing = False, # Can make training 5x faster for short sequences.
    args = SFTConfig(
        per_device_train_batch_size = 2,
        gradient_accumulation_steps = 4,
        warmup_steps = 5,
        # num_train_epochs = 1, # Set this for 1 full training run.
        max_steps = 2,  # changed: 60
        learning_rate = 2e-4,
        logging_steps = 1,
        optim = "adamw_8bit",
        weight_decay = 0.001,
        lr_scheduler_type = "linear",
        seed = 3407,
        output_dir = "outputs",
        report_to = "none", # Use TrackIO/WandB etc
    ),
)
''', '''
from unsloth_core.chat_templates import train_on_responses_only  # changed: from unsloth.chat_templates
trainer = train_on_responses_only(
    trainer,
    instruction_part = "<|start_header_id|>user<|end_header_id|>\\n\\n",
    response_part = "<|start_header_id|>assistant<|end_header_id|>\\n\\n",
)
''', '''
tokenizer.decode(trainer.train_dataset[5]["input_ids"])
''', '''
space = tokenizer(" ", add_special_tokens = False).input_ids[0]
tokenizer.decode([space if x == -100 else x for x in trainer.train_dataset[5]["labels"]])
''', '''
trainer_stats = trainer.train()
''', '''
from unsloth_core.chat_templates import get_chat_template  # changed: from unsloth.chat_templates

tokenizer = get_chat_template(
    tokenizer,
    chat_template = "llama-3.1",
)
FastLanguageModel.for_inference(model) # Enable native 2x faster inference

messages = [
    {"role": "user", "content": "Continue the fibonacci sequence: 1, 1, 2, 3, 5, 8,"},
]
inputs = tokenizer.apply_chat_template(
    messages,
    tokenize = True,
    add_generation_prompt = True, # Must add for generation
    return_tensors = "pt",
).to("cpu")  # changed: "cuda"

outputs = model.generate(input_ids = inputs, max_new_tokens = 64, use_cache = True,
                         temperature = 1.5, min_p = 0.1)
tokenizer.batch_decode(outputs)
''', '''
FastLanguageModel.for_inference(model) # Enable native 2x faster inference

messages = [
    {"role": "user", "content": "Continue the fibonacci sequence: 1, 1, 2, 3, 5, 8,"},
]
inputs = tokenizer.apply_chat_template(
    messages,
    tokenize = True,
    add_generation_prompt = True, # Must add for generation
    return_tensors = "pt",
).to("cpu")  # changed: "cuda"

from unsloth_core import TextStreamer  # changed: from transformers
text_streamer = TextStreamer(tokenizer, skip_prompt = True)
_ = model.generate(input_ids = inputs, streamer = text_streamer, max_new_tokens = 128,
                   use_cache = True, temperature = 1.5, min_p = 0.1)
''', '''
model.save_pretrained("llama_lora")  # Local saving
tokenizer.save_pretrained("llama_lora")
# model.push_to_hub("your_name/llama_lora", token = "YOUR_HF_TOKEN") # Online saving
# tokenizer.push_to_hub("your_name/llama_lora", token = "YOUR_HF_TOKEN") # Online saving
''', '''
# Merge to 16bit
if True: model.save_pretrained_merged("llama_finetune_16bit", tokenizer, save_method = "merged_16bit",)  # changed
if False: model.push_to_hub_merged("HF_USERNAME/llama_finetune_16bit", tokenizer, save_method = "merged_16bit", token = "YOUR_HF_TOKEN")

# Merge to 4bit
if False: model.save_pretrained_merged("llama_finetune_4bit", tokenizer, save_method = "merged_4bit",)
if False: model.push_to_hub_merged("HF_USERNAME/llama_finetune_4bit", tokenizer, save_method = "merged_4bit", token = "YOUR_HF_TOKEN")

# Just LoRA adapters
if False:
    model.save_pretrained("llama_lora")
    tokenizer.save_pretrained("llama_lora")
if False:
    model.push_to_hub("HF_USERNAME/llama_lora", token = "YOUR_HF_TOKEN")
    tokenizer.push_to_hub("HF_USERNAME/llama_lora", token = "YOUR_HF_TOKEN")
''', '''
# Save to 8bit Q8_0
if False: model.save_pretrained_gguf("llama_finetune", tokenizer,)
# Remember to go to https://huggingface.co/settings/tokens for a token!
# And change hf to your username!
if False: model.push_to_hub_gguf("HF_USERNAME/llama_finetune", tokenizer, token = "YOUR_HF_TOKEN")

# Save to 16bit GGUF
if True: model.save_pretrained_gguf("llama_finetune", tokenizer, quantization_method = "f16")  # changed: if False
if False: model.push_to_hub_gguf("HF_USERNAME/llama_finetune", tokenizer, quantization_method = "f16", token = "YOUR_HF_TOKEN")
''']  # noqa: E501 (the notebook's lines)


def run_cells(cells: list[str], namespace: dict[str, Any]) -> list[Any]:
    """exec each cell; as in a notebook, a cell ending in an expression shows its value (returned here)."""
    shown = []
    for cell in cells:
        tree = ast.parse(cell)
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, "<cell>", "exec"), namespace)
        shown.append(eval(compile(ast.Expression(last.value), "<cell>", "eval"), namespace) if last else None)
    return shown


@pytest.fixture
def notebook_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory of its own (the bundled model is imported once per machine, into the facade's cache)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_llama31_alpaca_notebook(notebook_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ns: dict[str, Any] = {"ALPACA_ROWS": ALPACA_ROWS}
    run_cells(ALPACA_CELLS[:3], ns)
    assert ns["dataset"][0]["text"].endswith(ns["tokenizer"].eos_token)
    assert isinstance(ns["model"].model.layers[0].self_attn.q_proj, LoRALinear)
    run_cells(ALPACA_CELLS[3:5], ns)
    stats = ns["trainer_stats"]
    assert stats.global_step == 2 and stats.metrics["train_runtime"] > 0
    assert [e["step"] for e in ns["trainer"].state.log_history] == [1, 2]
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in ns["trainer"].state.log_history)
    capsys.readouterr()
    decoded, *_ = run_cells(ALPACA_CELLS[5:6], ns)
    assert decoded[0].startswith(ns["alpaca_prompt"].format("Continue the fibonnaci sequence.", "1, 1, 2, 3, 5, 8", ""))
    run_cells(ALPACA_CELLS[6:7], ns)
    streamed = capsys.readouterr().out
    assert "### Response:" in streamed  # TextStreamer printed the prompt and the reply
    run_cells(ALPACA_CELLS[7:10], ns)
    assert (notebook_dir / "lora_model" / "adapter_model.safetensors").is_file()
    assert json.loads((notebook_dir / "model" / "config.json").read_text())["torch_dtype"] == "float16"
    run_cells(ALPACA_CELLS[10:], ns)
    report = json.loads((notebook_dir / "model" / "verification.json").read_text())
    assert [r["quantization"] for r in report] == ["f16"] and all(r["passed"] for r in report)
    assert (notebook_dir / "model" / "Modelfile").is_file()


def test_llama32_conversational_notebook(notebook_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ns: dict[str, Any] = {"CONVERSATION_ROWS": CONVERSATION_ROWS}
    with pytest.warns(UserWarning, match="does not have as tokens"):  # SmolLM2 has no Llama 3 header tokens
        run_cells(CONVERSATIONAL_CELLS[:3], ns)
    conversation, text = run_cells(CONVERSATIONAL_CELLS[3:6], ns)[1:]
    assert conversation[:2] == [{"role": "system", "content": "Answer in one word."},
                                {"role": "user", "content": "Opposite of up?"}]
    assert text.count("<|start_header_id|>assistant<|end_header_id|>") == 2
    run_cells(CONVERSATIONAL_CELLS[6:8], ns)
    whole, replies = run_cells(CONVERSATIONAL_CELLS[8:10], ns)
    assert "Opposite of up?" in whole and "Opposite of up?" not in replies and "Cutting Knowledge" not in replies
    assert "Down.<|eot_id|>" in replies and "Right.<|eot_id|>" in replies
    labels = ns["trainer"].train_dataset[5]["labels"]
    assert labels[0] == IGNORE_INDEX and any(x != IGNORE_INDEX for x in labels)
    run_cells(CONVERSATIONAL_CELLS[10:11], ns)
    assert ns["trainer_stats"].global_step == 2
    capsys.readouterr()
    with pytest.warns(UserWarning, match="does not have as tokens"):
        decoded, *_ = run_cells(CONVERSATIONAL_CELLS[11:12], ns)
    assert "Continue the fibonacci sequence" in decoded[0]
    run_cells(CONVERSATIONAL_CELLS[12:13], ns)
    streamed = capsys.readouterr().out
    assert streamed.strip() and "Continue the fibonacci" not in streamed  # skip_prompt
    run_cells(CONVERSATIONAL_CELLS[13:15], ns)
    assert (notebook_dir / "llama_lora" / "adapter_config.json").is_file()
    assert "Cutting Knowledge Date" in (notebook_dir / "llama_finetune_16bit" / "chat_template.jinja").read_text()
    run_cells(CONVERSATIONAL_CELLS[15:], ns)
    report = json.loads((notebook_dir / "llama_finetune" / "verification.json").read_text())
    assert [r["quantization"] for r in report] == ["f16"] and all(r["passed"] for r in report)
