"""TRL's SFTTrainer / SFTConfig names over our trainer, and Unsloth's train_on_responses_only."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
import transformers
import trl
from tokenizers import processors

from tests.helpers import make_tiny_tokenizer, tiny_model
from unsloth_core import DataCollatorForSeq2Seq, SFTConfig, SFTTrainer, is_bfloat16_supported
from unsloth_core.chat_templates import get_chat_template, train_on_responses_only
from unsloth_core.data import IGNORE_INDEX
from unsloth_core.facade import FastLanguageModel
from unsloth_core.model import Llama
from unsloth_core.response_only import response_labels
from unsloth_core.tokenizer import Tokenizer

TEXTS = [{"text": f"Question {i}: what is {i} + {i}? Answer: {2 * i}."} for i in range(6)]
CHATS = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                       {"role": "assistant", "content": f"It is {i + 1}."},
                       {"role": "user", "content": "And times two?"},
                       {"role": "assistant", "content": f"{2 * (i + 1)}."}]} for i in range(4)]
CHATML_PARTS = {"instruction_part": "<|im_start|>user\n", "response_part": "<|im_start|>assistant\n"}


def lora_model(seed: int = 0) -> Llama:
    return FastLanguageModel.get_peft_model(tiny_model(seed=seed, std=0.2), r=4, lora_alpha=8, random_state=0)


def config(tmp_path: Path, **overrides: Any) -> SFTConfig:
    kw: dict[str, Any] = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2,
                              gradient_accumulation_steps=1, max_steps=2, learning_rate=1e-3, logging_steps=1,
                              report_to="none", seed=1)
    return SFTConfig(**{**kw, **overrides})


def as_transformers(tokenizer: Tokenizer) -> transformers.PreTrainedTokenizerFast:
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, bos_token=tokenizer.bos_token,
                                                eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token,
                                                chat_template=tokenizer.chat_template)


def test_every_argument_the_notebooks_pass_is_accepted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """TRL's names, in SFTConfig and (as older TRL and Unsloth's notebooks write them) in SFTTrainer itself."""
    tok = make_tiny_tokenizer()
    args = SFTConfig(dataset_text_field="text", max_seq_length=64, packing=False, per_device_train_batch_size=2,
                     gradient_accumulation_steps=2, warmup_steps=1, max_steps=2, num_train_epochs=1,
                     learning_rate=2e-4, logging_steps=1, optim="adamw_8bit", weight_decay=0.01,
                     lr_scheduler_type="linear", seed=3407, output_dir=str(tmp_path / "out"), dataset_num_proc=1,
                     report_to="none", fp16=False, bf16=False)
    trainer = SFTTrainer(model=lora_model(), tokenizer=tok, train_dataset=TEXTS, dataset_text_field="text",
                         max_seq_length=64, packing=False, dataset_num_proc=1,
                         data_collator=DataCollatorForSeq2Seq(tokenizer=tok), args=args)
    assert trainer.args.max_length == 64 and trainer.args is not args  # the trainer's own copy
    stats = trainer.train()
    assert stats.global_step == 2 and set(stats.metrics) >= {"train_runtime", "train_loss", "epoch"}
    assert [e["step"] for e in trainer.state.log_history] == [1, 2]
    assert "{'loss': " in capsys.readouterr().out  # logs printed as transformers does
    assert (tmp_path / "out" / "checkpoints").is_dir()
    args = config(tmp_path, warmup_ratio=0.1, lr_scheduler_type="cosine", max_grad_norm=0.0,
                  gradient_checkpointing=True, save_strategy="no", eval_strategy="steps", eval_steps=1)
    trainer = SFTTrainer(lora_model(), args, train_dataset=TEXTS, eval_dataset=TEXTS[:2], processing_class=tok)
    trainer.train()
    assert any("eval_loss" in e for e in trainer.state.log_history)
    assert not is_bfloat16_supported() or torch.cuda.is_available()


def test_what_it_cannot_honour_is_an_error(tmp_path: Path) -> None:
    tok = make_tiny_tokenizer()
    with pytest.raises(TypeError, match="unexpected keyword argument 'deepspeed'"):
        SFTConfig(deepspeed="zero3.json")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        SFTTrainer(lora_model(), config(tmp_path), train_dataset=TEXTS, tokenizer=tok, neftune_noise_alpha=5)
    refusals = [(dict(optim="sgd"), "optim='sgd' is not supported; the optimizer is AdamW: adamw_torch"),
                (dict(report_to="wandb"), "report_to='wandb' is not supported"),
                (dict(lr_scheduler_type="polynomial"), "polynomial"),
                (dict(fp16=True, bf16=True), "fp16 and bf16"),
                (dict(max_length=100, max_seq_length=50), "disagree"),
                (dict(save_strategy="epoch"), "save_strategy")]
    for kw, message in refusals:
        with pytest.raises(ValueError, match=message):
            SFTConfig(**kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"no text column 'text'.*formatting_func"):
        SFTTrainer(lora_model(), config(tmp_path), train_dataset=[{"prompt": "x"}], tokenizer=tok)
    with pytest.raises(ValueError, match="one text per example"):
        SFTTrainer(lora_model(), config(tmp_path), train_dataset=TEXTS, tokenizer=tok,
                   formatting_func=lambda batch: [batch["text"]])
    with pytest.raises(ValueError, match="DataCollatorForLanguageModeling is not supported"):
        SFTTrainer(lora_model(), config(tmp_path), train_dataset=TEXTS, tokenizer=tok,
                   data_collator=transformers.DataCollatorForLanguageModeling(as_transformers(tok), mlm=False))
    with pytest.raises(TypeError, match="needs the tokenizer"):
        SFTTrainer(lora_model(), config(tmp_path), train_dataset=TEXTS)


def test_dataset_preparation_matches_trl(tmp_path: Path) -> None:
    """Text rows get the EOS appended and are tokenized as TRL 1.16's SFTTrainer prepares them; a formatting_func
    and a conversational `messages` column too; a list of rows and a datasets.Dataset give the same."""
    tok = make_tiny_tokenizer()
    hf_tok = as_transformers(tok)
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=320, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    rows = [*TEXTS, {"text": "already ends in EOS<|im_end|>"}]
    for kind, data, kw in (("text", rows, {}), ("messages", CHATS, {}),
                           ("formatting_func", [{"q": r["text"]} for r in TEXTS],
                            {"formatting_func": lambda example: example["q"]})):
        trl_args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), max_length=40, bf16=False, use_cpu=True,
                                 report_to="none")
        theirs = trl.SFTTrainer(model=hf_model, args=trl_args,
                                train_dataset=datasets.Dataset.from_list(data), processing_class=hf_tok, **kw)
        ours = SFTTrainer(lora_model(), config(tmp_path, max_length=40), train_dataset=data, tokenizer=tok, **kw)
        from_dataset = SFTTrainer(lora_model(), config(tmp_path, max_length=40),
                                  train_dataset=datasets.Dataset.from_list(data), tokenizer=tok, **kw)
        expected = list(theirs.train_dataset["input_ids"])
        assert [r["input_ids"] for r in ours.train_dataset] == expected, kind
        assert list(from_dataset.train_dataset["input_ids"]) == expected, kind
    assert ours.train_dataset[0]["q"] == TEXTS[0]["text"]  # other columns are kept


def test_a_text_with_its_own_bos_gets_no_second_one(tmp_path: Path) -> None:
    tok = make_tiny_tokenizer()
    tok.backend.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[
        ("<|im_start|>", tok.bos_token_id)])  # a tokenizer that adds a BOS, as Llama 3's does
    trainer = SFTTrainer(lora_model(), config(tmp_path), tokenizer=tok,
                         train_dataset=[{"text": "plain"}, {"text": "<|im_start|>templated"}])
    first, second = (r["input_ids"] for r in trainer.train_dataset)
    assert first[0] == second[0] == tok.bos_token_id and second[1] != tok.bos_token_id
    assert first[-1] == second[-1] == tok.eos_token_id


def test_list_and_dataset_train_alike_and_labels_are_used(tmp_path: Path) -> None:
    """The loss logged at step 1 is the model's loss on the trainer's labels before any update: the labels
    train_on_responses_only set are the ones trained on."""
    tok = get_chat_template(make_tiny_tokenizer(), "chatml")
    data = [{"text": tok.render_chat(c["messages"])} for c in CHATS]
    losses = []
    for dataset in (data, datasets.Dataset.from_list(data)):
        model = lora_model()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
        before = copy.deepcopy(model)
        trainer = train_on_responses_only(SFTTrainer(model, config(tmp_path, per_device_train_batch_size=4,
                                                                   max_steps=1), train_dataset=dataset,
                                                     tokenizer=tok), **CHATML_PARTS)
        ids = [r["input_ids"] for r in trainer.train_dataset]
        labels = [r["labels"] for r in trainer.train_dataset]
        losses.append(trainer.train().training_loss)
        n = max(map(len, ids))
        x = torch.tensor([r + [0] * (n - len(r)) for r in ids])
        y = torch.tensor([r + [IGNORE_INDEX] * (n - len(r)) for r in labels])
        with torch.no_grad():
            out = before.train()(x, labels=y, return_logits=False)
        assert out.loss is not None and losses[-1] == pytest.approx(float(out.loss), rel=1e-4)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_responses_only_labels_the_replies_and_their_end_of_turn() -> None:
    tok = get_chat_template(make_tiny_tokenizer(), "chatml")
    text = tok.render_chat(CHATS[0]["messages"])
    ids = tok.encode(text, add_special_tokens=False)
    (labels,) = response_labels(tok, [ids], **CHATML_PARTS)
    kept = tok.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])
    assert kept == "It is 1.<|im_end|>\n2.<|im_end|>\n"
    # A Llama 3.1 conversation on a tokenizer without its header tokens: each header is many byte tokens, and is
    # still found; the ids do not even have to be the text's own tokenization (each special token spelt in bytes).
    with pytest.warns(UserWarning):
        llama = get_chat_template(make_tiny_tokenizer(), "llama-3.1")
    text = llama.render_chat(CHATS[0]["messages"])
    for ids in (llama.encode(text, add_special_tokens=False),
                [i for part in text.replace("<|im_start|>", "\0").split("\0")
                 for i in ([llama.bos_token_id] if not part else []) + llama.encode(part, add_special_tokens=False)]):
        (labels,) = response_labels(llama, [ids], "<|start_header_id|>user<|end_header_id|>\n\n",
                                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
        kept = llama.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])
        assert kept == "It is 1.<|eot_id|>2.<|eot_id|>"


def test_responses_only_on_datasets_and_its_refusals(tmp_path: Path) -> None:
    tok = get_chat_template(make_tiny_tokenizer(), "chatml")
    data = datasets.Dataset.from_list([*CHATS, {"messages": [{"role": "user", "content": "no reply"}]}])
    trainer = SFTTrainer(lora_model(), config(tmp_path), train_dataset=data, eval_dataset=data, tokenizer=tok)
    with pytest.warns(UserWarning, match="1 of 5 examples have no reply to train on"):
        trainer = train_on_responses_only(trainer, **CHATML_PARTS)
    as_list = train_on_responses_only(SFTTrainer(lora_model(), config(tmp_path), train_dataset=CHATS,
                                                 tokenizer=tok), **CHATML_PARTS)
    assert list(trainer.train_dataset["labels"])[:4] == [r["labels"] for r in as_list.train_dataset]
    assert "labels" in trainer.eval_dataset.column_names
    with pytest.raises(ValueError, match="is in none of the 4 examples"):
        train_on_responses_only(SFTTrainer(lora_model(), config(tmp_path), train_dataset=CHATS, tokenizer=tok),
                                instruction_part="### Instruction:\n", response_part="### Response:\n")


def test_our_collator_pads_as_transformers_does() -> None:
    tok = make_tiny_tokenizer()
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    for side in ("right", "left"):
        tok.padding_side = side
        hf = as_transformers(tok)
        hf.padding_side = side
        ours = DataCollatorForSeq2Seq(tokenizer=tok, pad_to_multiple_of=4)(rows)
        theirs = transformers.DataCollatorForSeq2Seq(tokenizer=hf, pad_to_multiple_of=4)(copy.deepcopy(rows))
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), side


def test_training_output_is_a_loadable_adapter(tmp_path: Path) -> None:
    tok = make_tiny_tokenizer()
    model = lora_model()
    SFTTrainer(model, config(tmp_path), train_dataset=TEXTS, tokenizer=tok).train()
    model.save_pretrained(str(tmp_path / "lora"))
    adapter = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert adapter["r"] == 4
