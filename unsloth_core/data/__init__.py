"""Training data: formats, validation with line numbers, chat templating with label masks, packing, batching.

The usual path, for the trainer:

    examples = load_examples(path, purpose="sft")          # raises DataFileError listing every bad line
    rows = [tokenize_sft(e, tokenizer, max_seq_length) for e in examples]
    rows = pack(rows, max_seq_length)                       # optional, padding-free
    for batch in iter_batches(rows, micro_batch_size, seed=seed, epoch=epoch, start=resume_at):
        tensors = collate(batch, pad_id=tokenizer.pad_token_id)

and for the API, on upload: `validate_file(path, tokenizer, max_seq_length).to_dict()`.
Nothing here imports torch at import time (only `collate` needs it), so the API process stays light.
"""

from unsloth_core.data.batching import epoch_order, iter_batches, num_batches
from unsloth_core.data.collate import collate, collate_preference
from unsloth_core.data.examples import (
    ChatExample,
    CompletionExample,
    Example,
    Message,
    PreferenceExample,
    SFTExample,
    TextExample,
)
from unsloth_core.data.formats import FORMATS, RowError, detect_format, parse_row
from unsloth_core.data.packing import PackedRow, pack
from unsloth_core.data.preference import TokenizedPreference, tokenize_preference
from unsloth_core.data.sft import IGNORE_INDEX, TokenizedExample, tokenize_sft
from unsloth_core.data.validation import DataFileError, LineError, ValidationReport, load_examples, validate_file

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "ChatExample",
    "CompletionExample",
    "DataFileError",
    "Example",
    "LineError",
    "Message",
    "PackedRow",
    "PreferenceExample",
    "RowError",
    "SFTExample",
    "TextExample",
    "TokenizedExample",
    "TokenizedPreference",
    "ValidationReport",
    "collate",
    "collate_preference",
    "detect_format",
    "epoch_order",
    "iter_batches",
    "load_examples",
    "num_batches",
    "pack",
    "parse_row",
    "tokenize_preference",
    "tokenize_sft",
    "validate_file",
]
