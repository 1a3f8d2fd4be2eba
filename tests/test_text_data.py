"""TextDataModule: embedded stdlib bytes, token memmaps, HF datasets from disk with a local tokenizer."""
import pickle

import numpy as np
import pytest
import torch

from datamodules.sampling import ResumableSampler, ShuffleResumableSampler
from datamodules.text import RandomWindows, TextDataModule


def batches(dm, n=2):
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n)]


def test_stdlib_default_is_bytes_and_deterministic():
    dm = TextDataModule(seq_len=32, batch_size=4, max_bytes=200_000)
    assert dm.vocab_size == 256 and dm.eval_seq_len == 128
    (x, y), _ = batches(dm)
    assert x.shape == (4, 32) and x.dtype == torch.int64 and int(x.max()) < 256
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
    (x2, _), _ = batches(TextDataModule(seq_len=32, batch_size=4, max_bytes=200_000))
    assert torch.equal(x, x2)
    assert len(dm.train_tokens) == 180_000 and len(dm.val_tokens) == 20_000  # split by position
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape[1] == 128


def test_resumable_sampler_skips_consumed_and_splits_ranks():
    ds = RandomWindows(np.arange(100, dtype=np.uint16), 8, 0, 10_000)
    full = list(ResumableSampler(ds, 1, 0, local_per_epoch=12))
    assert full == list(range(12))
    assert list(ResumableSampler(ds, 1, 0, local_per_epoch=12, skip=5)) == full[5:]
    r0, r1 = (list(ResumableSampler(ds, 2, r, local_per_epoch=6)) for r in (0, 1))
    assert sorted(r0 + r1) == list(range(12)) and r0 == [0, 2, 4, 6, 8, 10]
    s = ResumableSampler(ds, 1, 0, local_per_epoch=4, skip=2, start_epoch=0)
    s.set_epoch(1)
    assert list(s) == [4, 5, 6, 7]  # the skip applies only to the resumed epoch


def test_shuffle_sampler_is_a_function_of_seed_and_epoch_and_resumes_mid_epoch():
    ds = list(range(10))
    a = ShuffleResumableSampler(ds, seed=3)
    epoch0 = list(a)
    a.set_epoch(1)
    epoch1 = list(a)
    assert sorted(epoch0) == sorted(epoch1) == ds and epoch0 != epoch1
    assert list(ShuffleResumableSampler(ds, seed=3)) == epoch0  # no hidden global RNG
    resumed = ShuffleResumableSampler(ds, seed=3, skip=4, start_epoch=1)
    assert list(resumed) == epoch1[4:]
    resumed.set_epoch(2)
    a.set_epoch(2)
    assert list(resumed) == list(a)
    r0, r1 = (list(ShuffleResumableSampler(ds, 2, r, seed=3)) for r in (0, 1))
    assert sorted(r0 + r1) == ds


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_memmap_single_file_and_directory(tmp_path, dtype):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 1000 if dtype == "uint16" else 70_000, 20_000).astype(dtype)
    single = tmp_path / "tokens.bin"
    tokens.tofile(single)
    dm = TextDataModule(path=str(single), seq_len=16, batch_size=2, dtype=dtype)
    assert dm.vocab_size == int(tokens.max()) + 1
    (x, y), _ = batches(dm)
    assert x.shape == (2, 16)
    windows = {tuple(tokens[i:i + 17]) for i in range(len(tokens) - 17)}
    assert tuple(torch.cat([x[0], y[0, -1:]]).tolist()) in windows  # a real window of the file
    d = tmp_path / "nanogpt"
    d.mkdir()
    tokens[:15_000].tofile(d / "train.bin")
    tokens[15_000:].tofile(d / "val.bin")
    with open(d / "meta.pkl", "wb") as fh:
        pickle.dump({"vocab_size": 70_001}, fh)
    dm = TextDataModule(path=str(d), seq_len=16, batch_size=2, dtype=dtype)
    assert dm.vocab_size == 70_001 and len(dm.val_tokens) == 5_000


def _tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = ["the cat sat on the mat", "a dog ran in the park", "the end"]
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")
    path = tmp_path / "tok"
    fast.save_pretrained(path)
    return str(path), fast


def test_hf_dataset_from_disk_with_local_tokenizer(tmp_path):
    import datasets

    tok_path, fast = _tokenizer(tmp_path)
    texts = ["the cat sat on the mat", "a dog ran in the park", "the end"] * 40
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts}),
                               "validation": datasets.Dataset.from_dict({"text": texts[:30]})})
    ds.save_to_disk(tmp_path / "ds")
    dm = TextDataModule(path=str(tmp_path / "ds"), tokenizer=tok_path, seq_len=8, batch_size=2, eval_factor=2)
    assert dm.vocab_size == len(fast)  # decided by the tokenizer, before any data is read
    dm.setup("fit")
    expected = fast.encode("the cat sat on the mat", add_special_tokens=False) + [fast.eos_token_id]
    assert dm.train_tokens[: len(expected)].tolist() == expected
    (x, _), _ = batches(dm)
    assert x.shape == (2, 8) and int(x.max()) < dm.vocab_size
    # a plain Dataset is split by position; without a tokenizer the text is read as UTF-8 bytes
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(tmp_path / "plain")
    dm = TextDataModule(path=str(tmp_path / "plain"), seq_len=8, batch_size=2, eval_factor=2)
    dm.setup("fit")
    assert dm.vocab_size == 256 and bytes(dm.train_tokens[:7].tolist()) == b"the cat"


def test_missing_and_malformed_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="data path '/no/such/file.bin' does not exist"):
        TextDataModule(path="/no/such/file.bin")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="is neither a .bin token file"):
        TextDataModule(path=str(tmp_path / "notes.txt"))
    with pytest.raises(FileNotFoundError, match="tokenizer path '/no/tok'"):
        TextDataModule(tokenizer="/no/tok")


def test_sequence_longer_than_data(tmp_path):
    np.arange(50, dtype=np.uint16).tofile(tmp_path / "t.bin")
    with pytest.raises(ValueError, match="data.seq_len=64 is longer than the training data"):
        TextDataModule(path=str(tmp_path / "t.bin"), seq_len=64)
    with pytest.raises(ValueError, match=r"seq_len\*eval_factor=32 tokens do not fit"):
        TextDataModule(path=str(tmp_path / "t.bin"), seq_len=8, eval_factor=4)


@pytest.mark.parametrize("kwargs, match", [(dict(seq_len=0), "data.seq_len must be a positive integer, got 0"),
                                           (dict(batch_size=-2), "data.batch_size must be a positive integer"),
                                           (dict(val_fraction=1.5), "val_fraction must be in"),
                                           (dict(dtype="int8"), "data.dtype='int8'")])
def test_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextDataModule(**kwargs)


def test_ddp_ranks_take_contiguous_slices_of_each_global_batch():
    ds = list(range(10))
    one = list(ShuffleResumableSampler(ds, seed=3, batch_size=4))
    r0, r1 = (list(ShuffleResumableSampler(ds, 2, r, seed=3, batch_size=2)) for r in (0, 1))
    assert r0[:2] + r1[:2] == one[:4] and r0[2:4] + r1[2:4] == one[4:8]  # = micro-batches of one process
    assert sorted(r0 + r1) == ds
