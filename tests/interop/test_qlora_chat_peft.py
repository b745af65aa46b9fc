"""A QLoRA adapter trained by ``qlora-spec train`` on chat data, read by PEFT.

transformers quantizes the same float base to NF4 with bitsandbytes (the bytes our trainer
quantizes, see test_bnb_checkpoint.py), PEFT attaches the adapter directory as it is, and the
mean token loss over the chat file equals what ``qlora-spec eval --adapter`` prints (float32,
1e-4 relative). The loss is taken on the ids and loss mask our data path makes, which
test_tokenization.py holds to transformers' own ``apply_chat_template``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jax_impl.apps.cli import main
from jax_impl.train.data import encode_file, save_byte_tokenizer
from ref_numpy.config import llama_config
from ref_numpy.formats.hf import save_model
from ref_numpy.layers import IGNORE_INDEX
from ref_numpy.model import init_params
from tests.test_train_cli import write_chat_data

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

pytestmark = [pytest.mark.interop, pytest.mark.slow]

# Widths that every bitsandbytes CPU kernel accepts (multiples of 64 in and out).
CFG = llama_config(
    vocab_size=300, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192, max_seq_len=128
)


def _peft_loss(base: Path, adapter: Path, examples: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean next-token loss over every counted label, by transformers + bitsandbytes + PEFT."""
    qc = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        base, quantization_config=qc, device_map="cpu", dtype=torch.float32
    )
    model = peft.PeftModel.from_pretrained(model, adapter)
    model.eval()  # no adapter dropout
    linear4bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4bit) == 7 * CFG.n_layers
    for m in linear4bit:  # bnb's float32 dequantize path (see test_bnb_checkpoint.KERNELS)
        m.train(True)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in examples:
            logits = model(input_ids=torch.from_numpy(ids[None].astype(np.int64))).logits[0]
            target = torch.from_numpy(labels[1:].astype(np.int64))
            loss = torch.nn.functional.cross_entropy(
                logits[:-1].double(), target, ignore_index=IGNORE_INDEX, reduction="sum"
            )
            total += float(loss)
            count += int((target != IGNORE_INDEX).sum())
    return total / count


def test_qlora_chat_adapter_gives_our_eval_loss_in_peft(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tmp_path / "base"
    save_model(init_params(CFG, np.random.default_rng(0), std=0.1), CFG, base)
    save_byte_tokenizer(base)
    data = write_chat_data(tmp_path / "chat.jsonl", n=12)
    out = tmp_path / "adapter"
    train = ["train", "--model", str(base), "--data", str(data), "--out", str(out)]
    train += ["--method", "qlora", "--rank", "4", "--lr", "3e-2", "--steps", "12"]
    train += ["--batch-size", "4", "--max-length", "128", "--dropout", "0.1"]
    assert main(train) == 0
    capsys.readouterr()
    evaluate = ["eval", "--model", str(base), "--adapter", str(out), "--data", str(data)]
    assert main([*evaluate, "--method", "qlora"]) == 0
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    encoded, _, _, fmt = encode_file(base, data, CFG.vocab_size, 128)
    assert fmt == "chat"
    examples = [(e.input_ids, e.labels) for e in encoded]
    assert ours["tokens"] == sum(int((lab[1:] != IGNORE_INDEX).sum()) for _, lab in examples)
    theirs = _peft_loss(base, out, examples)
    assert abs(ours["loss"] - theirs) <= 1e-4 * abs(theirs), (ours["loss"], theirs)

    # The adapter matters: the base alone is far from it.
    assert main([*evaluate[:3], *evaluate[5:], "--method", "qlora"]) == 0
    base_loss = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"]
    assert abs(base_loss - theirs) > 1e-2 * abs(theirs), (base_loss, theirs)
