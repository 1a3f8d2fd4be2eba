"""Document-aware windows (aligned / packed), document starts from every kind of data, prompts and tokenizers."""
import json
import pickle

import numpy as np
import pytest
import torch

from datamodules.prompts import read_prompts
from datamodules.text import TextDataModule
from datamodules.text_documents import IGNORE, DocumentWindows, split_starts, starts_from_separator, units


def test_units_cut_documents_into_chunks():
    table = units(np.array([0, 5, 6]), 20, size=4)  # documents of 5, 1 and 14 tokens
    assert table.tolist() == [[0, 4], [4, 1], [5, 1], [6, 4], [10, 4], [14, 4], [18, 2]]
    assert starts_from_separator(np.array([3, 9, 4, 9, 9, 5]), 9).tolist() == [0, 2, 4, 5]
    head, tail = split_starts(np.array([0, 4, 10]), 7)
    assert head.tolist() == [0, 4] and tail.tolist() == [0, 3]


def _docs():
    tokens = np.arange(1, 41, dtype=np.uint16)  # ids 1..40; documents of 3, 10, 5, 22 tokens
    return tokens, np.array([0, 3, 13, 18])


def test_aligned_windows_start_at_a_document_with_bos_and_pad_the_rest():
    tokens, starts = _docs()
    ds = DocumentWindows(tokens, starts, seq_len=8, bos_id=99, seed=0, length=200, packed=False)
    seen_short = False
    for i in range(200):
        x, y, seg = ds[i]
        assert x[0] == 99  # BOS at position 0
        valid = y != IGNORE
        n = int(valid.sum())
        assert valid[:n].all() and not valid[n:].any()  # the chunk, then padding
        assert torch.equal(x[1:n], y[:n - 1])  # inputs are the targets shifted right
        first = int(y[0]) - 1  # token id = position + 1
        assert first in starts or any(first == s + 8 * k for s in starts for k in range(1, 4))  # doc or chunk start
        seen_short |= n < 8
    assert seen_short


def test_packed_windows_fill_with_documents_that_never_cross():
    tokens, starts = _docs()
    ds = DocumentWindows(tokens, starts, seq_len=16, bos_id=99, seed=1, length=100, packed=True)
    for i in range(100):
        x, y, seg = ds[i]
        assert (y != IGNORE).all()  # no padding
        new_doc = torch.ones(16, dtype=torch.bool)
        new_doc[1:] = seg[1:] != seg[:-1]
        assert (x[new_doc] == 99).all() and (x[~new_doc] != 99).all()  # BOS exactly at every document start
        assert torch.equal(x[~new_doc], y[torch.cat([~new_doc[1:], torch.tensor([False])])])  # shift inside docs
        for pos in range(1, 16):  # a target and the input before it come from the same document
            if not new_doc[pos]:
                assert int(y[pos]) == int(y[pos - 1]) + 1


def test_datamodule_documents_from_stdlib_files_token_separators_and_hf_rows(tmp_path):
    import datasets

    dm = TextDataModule(seq_len=32, batch_size=4, max_bytes=200_000, documents="packed")
    assert dm.vocab_size == 257 and dm.bos_id == 256  # bytes + BOS
    dm.setup("fit")
    x, y, seg = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == seg.shape == (4, 32) and (x[:, 0] == 256).all()
    xv, yv, sv = next(iter(dm.val_dataloader()))
    assert (xv[:, 0] == 256).all() and xv.shape[1] == 128  # validation from document starts

    rng = np.random.default_rng(0)
    stream = np.concatenate([np.append(rng.integers(0, 500, n), 999) for n in rng.integers(5, 60, 300)])
    stream.astype(np.uint16).tofile(tmp_path / "t.bin")
    dm = TextDataModule(path=str(tmp_path / "t.bin"), seq_len=16, batch_size=2, eval_factor=2,
                        documents="aligned", doc_sep_id=999, vocab_size=1000)
    dm.setup("fit")
    assert dm.bos_id == 999 and dm.train_starts[1] == np.flatnonzero(stream == 999)[0] + 1
    x, y, seg = next(iter(dm.train_dataloader()))
    assert (x[:, 0] == 999).all()

    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]] * 30
    datasets.Dataset.from_dict({"input_ids": docs}).save_to_disk(tmp_path / "pre")
    dm = TextDataModule(path=str(tmp_path / "pre"), seq_len=6, batch_size=2, eval_factor=1, documents="packed",
                        bos_id=0)
    dm.setup("fit")
    assert dm.vocab_size == 14 and dm.train_starts[:4].tolist() == [0, 3, 5, 9]  # per-document arrays


@pytest.mark.parametrize("kwargs, match", [
    (dict(documents="chunks"), "data.documents='chunks'; expected one of stream, aligned, packed"),
    (dict(documents="aligned", bos_id=300), r"data.bos_id=300 is outside the vocabulary \[0, 256\)"),
])
def test_bad_document_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextDataModule(max_bytes=100_000, **kwargs)


def test_token_file_documents_need_a_separator(tmp_path):
    np.arange(5000, dtype=np.uint16).tofile(tmp_path / "t.bin")
    with pytest.raises(ValueError, match="data.documents='packed' needs document boundaries: set data.doc_sep_id"):
        TextDataModule(path=str(tmp_path / "t.bin"), documents="packed", bos_id=0, seq_len=8).setup("fit")


def test_per_position_loss_counts_from_each_document_start():
    from lightning_modules.fox_lm import PositionalLoss

    metric = PositionalLoss(6)
    loss = torch.tensor([[1.0, 2.0, 3.0, 10.0, 20.0, 0.0]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 2]])
    valid = torch.tensor([[True, True, True, True, True, False]])
    metric.update(loss, positions, valid)
    assert metric.compute()[:3].tolist() == [5.5, 11.0, 3.0] and metric.count.tolist() == [2, 2, 1, 0, 0, 0]


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("def f(x):\\n    return\nclass A\n")
    assert read_prompts(str(tmp_path / "p.txt")) == ["def f(x):\n    return", "class A"]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a\nb"}) + "\n\n" + json.dumps({"prompt": "c"}) + "\n")
    assert read_prompts(str(tmp_path / "p.jsonl")) == ["a\nb", "c"]
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected a JSON object with a \"prompt\" string"):
        read_prompts(str(tmp_path / "bad.jsonl"))
    (tmp_path / "none.txt").write_text("")
    with pytest.raises(ValueError, match="holds no prompt"):
        read_prompts(str(tmp_path / "none.txt"))


def test_prompts_through_each_tokenizer(tmp_path):
    """Bytes, nanoGPT's character meta.pkl and a local HF tokenizer: prompts encode and decode back."""
    (tmp_path / "p.txt").write_text("hello world\nab\n")
    dm = TextDataModule(max_bytes=100_000, prompts=str(tmp_path / "p.txt"), seq_len=8)
    batch = next(iter(dm.predict_dataloader()))
    assert batch["prompt"] == ["hello world", "ab"]
    assert batch["segment_ids"][1].tolist() == [0] * 9 + [1, 1]  # left padding
    assert dm.decode(batch["tokens"][0].tolist()) == "hello world"

    chars = sorted(set("helo wrdab"))
    d = tmp_path / "shakespeare"
    d.mkdir()
    np.zeros(4000, dtype=np.uint16).tofile(d / "train.bin")
    np.zeros(1000, dtype=np.uint16).tofile(d / "val.bin")
    with open(d / "meta.pkl", "wb") as fh:
        pickle.dump({"vocab_size": len(chars), "stoi": {c: i for i, c in enumerate(chars)},
                     "itos": {i: c for i, c in enumerate(chars)}}, fh)
    dm = TextDataModule(path=str(d), prompts=str(tmp_path / "p.txt"), seq_len=8)
    assert dm.vocab_size == len(chars) and dm.decode(dm.encode("hello world")) == "hello world"
    (tmp_path / "q.txt").write_text("xyz\n")
    with pytest.raises(ValueError, match="characters 'xyz' are not in the data's vocabulary"):
        TextDataModule(path=str(d), prompts=str(tmp_path / "q.txt"), seq_len=8)
    np.zeros(4000, dtype=np.uint16).tofile(tmp_path / "plain.bin")
    with pytest.raises(ValueError, match="data.prompts needs a tokenizer"):
        TextDataModule(path=str(tmp_path / "plain.bin"), prompts=str(tmp_path / "p.txt"), seq_len=8)
