"""Feature store I/O: ClipCap pickles, the food fork's pandas rows, the safetensors format, unsafe pickles.

    pytest -q tests/test_features.py
"""
from __future__ import annotations

import os
import pickle

import pandas as pd
import pytest
import torch

from foodcap.features import FeatureStore, FeatureStoreError, load_features, save_features
from foodcap.safe_pickle import UnsafePickleError, load_pickle

from conftest import FOOD_CAPTIONS


def _store(n_images=5, dim=8, split="train"):
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(n_images, dim, generator=gen)
    caps = [{"image_id": i // 2, "caption": f"a plate of food number {i} – café", "clip_embedding": i // 2,
             "image_path": f"/data/{i // 2}.jpg"} for i in range(2 * n_images)]
    return FeatureStore(emb, caps, {"clip_model": "tiny", "split": split, "token_limit": 40})


@pytest.mark.parametrize("suffix", [".pkl", ".safetensors"])
@pytest.mark.parametrize("mmap", [True, False])
def test_round_trip(tmp_path, suffix, mmap):
    store = _store()
    path = save_features(store, tmp_path / f"s{suffix}")
    back = load_features(path, mmap=mmap)
    assert torch.equal(back.embeddings, store.embeddings)
    assert back.captions == store.captions
    assert back.meta == {**store.meta, "clip_dim": 8}
    assert (back.clip_model, back.clip_dim, back.split, back.num_images, len(back)) == ("tiny", 8, "train", 5, 10)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file


def test_safetensors_embeddings_are_memory_mapped(tmp_path):
    path = save_features(_store(n_images=64, dim=16), tmp_path / "big.safetensors")
    mapped = load_features(path, mmap=True).embeddings
    assert isinstance(mapped, torch.Tensor) and mapped.shape == (64, 16)
    if os.path.exists("/proc/self/maps"):  # the tensor's memory is a mapping of the file itself
        regions = [line.split()[0].split("-") for line in open("/proc/self/maps") if line.rstrip().endswith(str(path))]
        ptr = mapped.data_ptr()
        assert any(int(lo, 16) <= ptr < int(hi, 16) for lo, hi in regions)
    mapped.mul_(0)  # copy-on-write: the file keeps its values
    assert load_features(path).embeddings.abs().sum() > 0


def test_pickle_keeps_clipcap_layout_for_plain_pickle_readers(tmp_path):
    """The reference train.py does `pickle.load` and reads these keys; our file must serve it."""
    path = save_features(_store(), tmp_path / "clipcap.pkl")
    with open(path, "rb") as f:
        raw = pickle.load(f)  # what ClipCap's train.py does (safe here: we wrote the file)
    assert torch.equal(raw["clip_embedding"], _store().embeddings)
    for cap in raw["captions"]:
        assert raw["clip_embedding"][cap["clip_embedding"]].shape == (8,)
        assert isinstance(cap["caption"], str) and "image_id" in cap


def test_reads_reference_clipcap_pickle(tmp_path):
    emb = torch.randn(3, 640)
    caps = [{"image_id": 9, "caption": "a cat", "clip_embedding": 0}, {"image_id": 9, "caption": "cat", "clip_embedding": 0},
            {"image_id": 4, "caption": "a dog", "clip_embedding": 2}]
    path = tmp_path / "oscar_split_RN50x4_train.pkl"
    with open(path, "wb") as f:
        pickle.dump({"clip_embedding": emb, "captions": caps}, f)
    store = load_features(path)
    assert torch.equal(store.embeddings, emb) and store.captions == caps
    assert store.clip_model is None and store.clip_dim == 640 and store.split is None


@pytest.mark.parametrize("protocol", [2, 4])
def test_reads_the_food_forks_pandas_rows(tmp_path, protocol):
    """The fork pickled DataFrame rows with its off-by-one column names ('caption' = Index, 'Captions' = text)."""
    df = pd.read_csv(FOOD_CAPTIONS).head(4)
    df = df.rename(columns={df.columns[0]: "image_id", df.columns[1]: "caption"})
    rows = []
    for i in range(len(df)):
        row = df.iloc[i].copy()
        row["clip_embedding"] = i
        rows.append(row)
    emb = torch.randn(4, 640).unsqueeze(1)  # the fork kept (N, 1, D) only after torch.cat; accept both
    path = tmp_path / "RN50x4_RN_train.pkl"
    with open(path, "wb") as f:
        pickle.dump({"clip_embedding": emb.squeeze(1), "captions": rows}, f, protocol=protocol)
    store = load_features(path)
    assert [c["caption"] for c in store.captions] == df["Captions"].tolist()
    assert [c["image_id"] for c in store.captions] == df["image_id"].tolist()
    assert all(type(c["image_id"]) is int and type(c["clip_embedding"]) is int for c in store.captions)


class _Boom:
    marker = ""

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = str(tmp_path / "pwned")
    _Boom.marker = marker
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"clip_embedding": torch.zeros(1, 4), "captions": [_Boom()]}, f)
    with pytest.raises(UnsafePickleError) as info:
        load_features(path)
    assert str(path) in str(info.value) and ("posix.system" in str(info.value) or "os.system" in str(info.value))
    assert not os.path.exists(marker)


@pytest.mark.parametrize("payload", [
    b"cbuiltins\neval\n(S'1+1'\ntR.",
    b"csubprocess\ncheck_output\n(S'id'\ntR.",
    b"ctorch\nload\n(S'x'\ntR.",
])
def test_other_dangerous_globals_are_refused(tmp_path, payload):
    path = tmp_path / "evil2.pkl"
    path.write_bytes(payload)
    with pytest.raises(UnsafePickleError, match="refused to load global"):
        load_pickle(path)


def test_bad_files_have_clear_errors(tmp_path):
    with pytest.raises(FeatureStoreError, match="no such feature file"):
        load_features(tmp_path / "missing.pkl")
    (tmp_path / "junk.pkl").write_bytes(b"\x00not a pickle")
    with pytest.raises(FeatureStoreError, match="junk.pkl"):
        load_features(tmp_path / "junk.pkl")
    with open(tmp_path / "list.pkl", "wb") as f:
        pickle.dump([1, 2], f)
    with pytest.raises(FeatureStoreError, match="'clip_embedding' and 'captions'"):
        load_features(tmp_path / "list.pkl")
    with open(tmp_path / "row.pkl", "wb") as f:
        pickle.dump({"clip_embedding": torch.zeros(2, 4), "captions": [{"caption": "x", "clip_embedding": 5}]}, f)
    with pytest.raises(FeatureStoreError, match=r"captions\[0\]"):
        load_features(tmp_path / "row.pkl")
    with pytest.raises(FeatureStoreError, match=".pkl"):
        save_features(_store(), tmp_path / "x.json")
