"""The teacher and cache interfaces (kdcache.contracts) hold for the real classes."""
import numpy as np
import torch

from kdcache.beton import dataset_info
from kdcache.contracts import Cache, SparseCache, Teacher
from kdcache.store import LogitCache
from kdcache.teachers import CachedTeacher, OnlineTeacher


def test_real_caches_and_teachers_satisfy_the_contracts(synth, cache):
    info = dataset_info(synth / "train.beton")
    logits = LogitCache(str(cache), info)
    assert isinstance(logits, Cache) and logits.views == 1 and logits.temperature is None
    assert isinstance(logits, SparseCache)  # the reader of top-k and sampled stores' own arrays, too
    cached = CachedTeacher(logits, np.arange(0, 400, 7), info.size, torch.device("cpu"))
    online = OnlineTeacher(torch.nn.Flatten())
    for teacher in (cached, online):
        assert isinstance(teacher, Teacher)
    index = torch.tensor([0, 14])
    assert torch.equal(cached(None, index), torch.from_numpy(logits.logits(index.numpy())))
    assert cached.nbytes == len(np.arange(0, 400, 7)) * 4 * 4 + info.size * 8  # float32 rows and the row table
