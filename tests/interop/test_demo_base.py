"""The shipped base model is an ordinary Hugging Face model: transformers loads its weights
and tokenizer and gives the engine's logits and token ids."""

from __future__ import annotations

import numpy as np
import pytest

from jax_impl.apps.demo import BASE
from jax_impl.train.checkpoint import load_pretrained
from jax_impl.train.data import load_tokenizer
from tests.helpers import HF_RTOL, rel_err

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.interop


def test_transformers_loads_the_shipped_base() -> None:
    text = "Odo arrived in Lowmoor on 16 March 1950.\nDate as YYYY-MM-DD:"
    hf_tok = transformers.AutoTokenizer.from_pretrained(BASE)
    tok = load_tokenizer(BASE)
    ids = [tok.bos_id, *tok.encode(text)]
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids[1:]
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token_id) == (
        "<|bos|>",
        "<|eos|>",
        tok.pad_id,
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits.numpy()  # [1, T, V]
    _, model = load_pretrained(BASE)
    got = np.asarray(model(np.asarray([ids], np.int32)))
    assert rel_err(got, want) < HF_RTOL
    assert rel_err(got + 1e-2 * np.abs(want).max(), want) > HF_RTOL  # a shift is caught
