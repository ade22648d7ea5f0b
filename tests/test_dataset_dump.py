"""kdcache.dump_dataset: the store `kdcache dump` writes, from a torch Dataset and an nn.Module."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, SUBPROCESS_TIMEOUT, manifest, read_beton
from torch.utils.data import TensorDataset

import kdcache
from kdcache.errors import UserError
from kdcache.models import build_model, load_checkpoint
from kdcache.store import LogitCache, open_store, read_score


def _synth_dataset(synth):
    """The training beton's images in index order, normalised as kdcache's loader does."""
    images, labels, index = read_beton(synth / "train.beton")
    order = np.argsort(index)
    m = manifest(synth)
    x = torch.from_numpy(images[order]).permute(0, 3, 1, 2).float()
    x = (x - torch.tensor(m["mean"]).view(1, 3, 1, 1)) / torch.tensor(m["std"]).view(1, 3, 1, 1)
    return TensorDataset(x, torch.from_numpy(labels[order]))


def test_a_dataset_dump_equals_the_ffcv_dump_of_the_same_images_and_model(synth, teacher, cache, tmp_path):
    model, _ = load_checkpoint(teacher / "model.pt")
    out = tmp_path / "ds.zarr"
    attrs = kdcache.dump_dataset(model, _synth_dataset(synth), out, data=synth, batch_size=64, chunk_rows=128)
    ffcv = LogitCache(cache)
    mine = LogitCache(out)  # opens as a complete logit cache
    assert attrs["train_fingerprint"] == ffcv.attrs["train_fingerprint"] and attrs["keys"] == "position"
    assert np.array_equal(mine.labels(), ffcv.labels())
    a, b = mine.logits(np.arange(400)), ffcv.logits(np.arange(400))
    assert np.allclose(a, b, rtol=2e-3, atol=2e-3 * np.abs(b).max())  # float16 storage: ~1e-3 relative
    assert (a.argmax(1) == b.argmax(1)).mean() > 0.99
    assert attrs["teacher_accuracy"] == pytest.approx(ffcv.attrs["teacher_accuracy"], abs=0.01)
    from kdcache.store import score_names
    assert score_names(open_store(out)) == score_names(ffcv.group)
    for score in score_names(ffcv.group):
        assert np.allclose(read_score(open_store(out), score), read_score(ffcv.group, score),
                           rtol=1e-2, atol=1e-2), score
    # the store serves the API like any other, checked against the same data
    kdcache.TeacherTargets(out, data=synth)


SCRIPT = """
import sys, torch
from torch.utils.data import TensorDataset
import kdcache
from kdcache.models import build_model
torch.manual_seed(0)
x, y = torch.randn(96, 3, 16, 16), torch.randint(0, 4, (96,))
model = build_model("resnet8", 4, 16)
kdcache.dump_dataset(model, TensorDataset(x, y), sys.argv[1], keys=[f"k{i}" for i in range(96)],
                     batch_size=16, chunk_rows=32, topk=2, temperature=2.0)
"""


@pytest.mark.slow
def test_a_dataset_dump_resumes_after_sigkill_and_records_keys(tmp_path):
    script = tmp_path / "dump.py"
    script.write_text(SCRIPT)
    env = {"KDCACHE_DIE_AFTER_CHUNKS": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}
    killed = subprocess.run([sys.executable, str(script), str(tmp_path / "a.zarr")], env=env, capture_output=True,
                            timeout=SUBPROCESS_TIMEOUT, cwd=ROOT)
    assert killed.returncode == -9, killed.stderr
    with pytest.raises(UserError, match="incomplete"):
        LogitCache(tmp_path / "a.zarr")
    env.pop("KDCACHE_DIE_AFTER_CHUNKS")
    for out in ("a.zarr", "b.zarr"):  # resume the killed one; dump another uninterrupted
        subprocess.run([sys.executable, str(script), str(tmp_path / out)], env=env, check=True,
                       timeout=SUBPROCESS_TIMEOUT,
                       cwd=ROOT)
    a, b = LogitCache(tmp_path / "a.zarr"), LogitCache(tmp_path / "b.zarr")
    assert np.array_equal(a.logits(np.arange(96)), b.logits(np.arange(96)))
    assert kdcache.store_keys(tmp_path / "a.zarr").tolist() == [f"k{i}" for i in range(96)]
    assert kdcache.rows_for(tmp_path / "a.zarr", keys=["k5", "k90"]).tolist() == [5, 90]
    assert a.topk == 2 and a.temperature == 2.0


def test_a_dataset_in_another_order_than_the_data_is_refused(synth, tmp_path):
    ds = _synth_dataset(synth)
    shuffled = TensorDataset(ds.tensors[0].flip(0), ds.tensors[1].flip(0))
    with pytest.raises(UserError, match="labels disagree with .*not in the order"):
        kdcache.dump_dataset(build_model("resnet8", 4, 16), shuffled, tmp_path / "x.zarr", data=synth)
