"""Training data: tokenizers, chat templates, JSONL examples, label masks, packing, batches.

The pipeline runs one way, NumPy only (the trainer turns the batches into device arrays)::

    load_dataset(path)        formats.py: Dataset, the examples of one JSONL file, its format
    encode(...)               encode.py: Encoded, input_ids [T] and labels [T] per example
                              (tokenizers.py, templates.py: the model's tokenizer and template)
    fit(..., max_length)      encode.py: truncate, or refuse, examples longer than max_length
    pack(...) / unpacked_rows batches.py: Row, input_ids, labels, positions, segment_ids [L]
    batches(...)              batches.py: dicts of int32 arrays [A, B, L] (A gradient-
                              accumulation steps, B rows per step, L a bucket length)

Every error about the data is a ``DataError`` (a ``ValueError``) naming ``FILE:LINE:``.
"""

from ref_numpy.layers import IGNORE_INDEX

from .batches import Row, batches, bucket_lengths, epoch_order, num_batches, pack, unpacked_rows
from .encode import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_WITH_INPUT,
    Encoded,
    IntArray,
    OnOverflow,
    chat_prompt_ids,
    encode,
    encode_example,
    encode_file,
    fit,
)
from .formats import (
    FORMATS,
    ROLES,
    DataError,
    Dataset,
    Format,
    check_example,
    detect_format,
    load_dataset,
    read_jsonl,
)
from .templates import (
    BUILTIN_SOURCE,
    DEFAULT_CHAT_TEMPLATE,
    ChatTemplate,
    chat_template,
    load_chat_template,
    render_chat,
)
from .tokenizers import (
    BYTE_SPECIALS,
    LLAMA_CLASSES,
    Span,
    Tokenizer,
    load_tokenizer,
    save_byte_tokenizer,
)

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_WITH_INPUT",
    "BUILTIN_SOURCE",
    "BYTE_SPECIALS",
    "DEFAULT_CHAT_TEMPLATE",
    "FORMATS",
    "IGNORE_INDEX",
    "LLAMA_CLASSES",
    "ROLES",
    "ChatTemplate",
    "DataError",
    "Dataset",
    "Encoded",
    "Format",
    "IntArray",
    "OnOverflow",
    "Row",
    "Span",
    "Tokenizer",
    "batches",
    "bucket_lengths",
    "chat_prompt_ids",
    "chat_template",
    "check_example",
    "detect_format",
    "encode",
    "encode_example",
    "encode_file",
    "epoch_order",
    "fit",
    "load_chat_template",
    "load_dataset",
    "load_tokenizer",
    "num_batches",
    "pack",
    "read_jsonl",
    "render_chat",
    "save_byte_tokenizer",
    "unpacked_rows",
]
