import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DUMP, SUBPROCESS_TIMEOUT, make_teacher, manifest, read_beton, run_cli
from torch import nn

from kdcache.errors import UserError
from kdcache.run_folder import read_metrics
from kdcache.scores import TEACHER_SCORES, teacher_scores
from kdcache.store import LogitCache, open_store
from kdcache.store_writer import DIE_AFTER_ENV

ARRAYS = ["logits", "labels"] + [f"scores/{name}" for name in TEACHER_SCORES]


@pytest.fixture(scope="module")
def full(synth, ckpt, tmp_path_factory):
    """An uninterrupted single-process dump: the reference every other dump must equal."""
    out = tmp_path_factory.mktemp("full") / "cache.zarr"
    run_cli("dump", "--teacher", "resnet20", "--checkpoint", ckpt, "--data", synth / "train.beton",
            "--out", out, *DUMP)
    return out


def direct_outputs(synth, ckpt):
    """The teacher applied directly to every training image (no loader, no store), by sample index."""
    from kdcache.models import last_linear, load_checkpoint
    images, labels, index = read_beton(synth / "train.beton")
    order = np.argsort(index)
    images, labels = images[order], labels[order]
    m = manifest(synth)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = (x - torch.tensor(m["mean"]).view(1, 3, 1, 1)) / torch.tensor(m["std"]).view(1, 3, 1, 1)
    model, _ = load_checkpoint(ckpt)
    feats = {}
    last_linear(model).register_forward_pre_hook(lambda mod, a: feats.__setitem__("h", a[0]))
    with torch.no_grad():
        logits = model(x)
    return x, logits, torch.from_numpy(labels.astype(np.int64)), feats["h"]


def read_all(url):
    g = open_store(str(url), "r")
    return {name: g[name][:] for name in ARRAYS if name in g or name.startswith("scores/")}


def assert_same_store(a, b):
    got, want = read_all(a), read_all(b)
    for name in ARRAYS:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    ga, gb = open_store(str(a)).attrs, open_store(str(b)).attrs
    assert ga["teacher_accuracy"] == gb["teacher_accuracy"]


def test_scores_equal_direct_reference_computations():
    torch.manual_seed(0)
    b, d, c = 6, 5, 4
    h = torch.randn(b, d)
    y = torch.tensor([0, 1, 2, 3, 1, 0])
    for bias in (True, False):
        layer = nn.Linear(d, c, bias=bias)
        logits = layer(h).detach()
        got = teacher_scores(logits, y, h, has_bias=bias)
        assert set(got) == set(TEACHER_SCORES) and all(v.shape == (b,) for v in got.values())
        p = logits.softmax(1)
        for i in range(b):
            # GraNd: the norm of the per-sample gradient of the last layer's parameters, by autograd
            loss = F.cross_entropy(layer(h[i:i + 1]), y[i:i + 1])
            grads = torch.autograd.grad(loss, list(layer.parameters()))
            assert torch.isclose(got["grand"][i], torch.sqrt(sum((g ** 2).sum() for g in grads)), rtol=1e-5)
            assert torch.isclose(got["loss"][i], loss.detach(), rtol=1e-5)
            others = [logits[i, j] for j in range(c) if j != y[i]]
            assert torch.isclose(got["margin"][i], logits[i, y[i]] - max(others), atol=1e-6)
            entropy = -sum(float(q) * np.log(float(q)) for q in p[i])
            assert got["entropy"][i].item() == pytest.approx(entropy, rel=1e-5)
            onehot = np.eye(c)[int(y[i])]
            assert got["el2n"][i].item() == pytest.approx(np.linalg.norm(p[i].numpy() - onehot), rel=1e-5)
    # a saturated softmax: entropy 0, not nan
    sat = teacher_scores(torch.tensor([[1000.0, 0, 0]]), torch.tensor([0]), torch.ones(1, 2), True)
    assert sat["entropy"].item() == 0 and sat["loss"].item() == 0


def test_store_holds_the_teachers_outputs(synth, ckpt, full):
    from kdcache.beton import dataset_info
    _, logits, labels, h = direct_outputs(synth, ckpt)
    cache = LogitCache(str(full), dataset_info(synth / "train.beton"))
    got = cache.logits(np.arange(400))
    # equal to the teacher's outputs to float16 precision
    np.testing.assert_allclose(got, logits.numpy(), rtol=2 ** -10, atol=1e-3)
    assert np.abs(got - logits.numpy().astype(np.float16)).max() <= 0.01 * np.abs(logits.numpy()).max()
    np.testing.assert_array_equal(cache.labels(), labels.numpy())
    ref = teacher_scores(logits, labels, h, has_bias=True)
    g = open_store(str(full))
    for name, values in ref.items():
        np.testing.assert_allclose(g["scores"][name][:], values.numpy(), rtol=1e-3, atol=1e-3, err_msg=name)
        assert g["scores"][name].attrs["higher_is_harder"] == TEACHER_SCORES[name][0]
    a = cache.attrs
    assert a["teacher_accuracy"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert 0 < a["teacher_accuracy"] < 1 and np.ptp(got, axis=0).min() > 0.1  # outputs vary by sample
    assert a["train_fingerprint"] == manifest(synth)["splits"]["train"]["fingerprint"]
    assert a["manifest"]["num_classes"] == 4 and a["teacher"] == "resnet20"
    from kdcache.models import sha256_file
    assert a["checkpoint_sha256"] == sha256_file(ckpt)
    assert a["schema_version"] == 2 and a["kdcache_version"] and a["created"] and "pytest" in a["command"]
    assert (a["num_samples"], a["num_classes"], a["chunk_rows"], a["topk"]) == (400, 4, 128, None)
    assert g["logits"].dtype == np.float16 and g["logits"].chunks == (128, 4)

    text = run_cli("info", full).output
    assert "4 of 4 done: complete" in text and "8 per sample" in text and "resnet20" in text
    assert f"{100 * a['teacher_accuracy']:.2f}%" in text
    d = json.loads(run_cli("info", full, "--json").output)
    assert d["arrays"]["logits"] == {"shape": [400, 4], "dtype": "float16", "chunks": [128, 4]}
    loss = g["scores"]["loss"][:]
    assert d["scores"]["loss"]["median"] == pytest.approx(float(np.median(loss)))
    assert d["scores"]["margin"]["higher_is_harder"] is False


def test_dump_reports_its_phases_and_equals_the_cli_dump(synth, ckpt, full, tmp_path):
    """In process, with `timings`: the same store as the CLI's (outputs stored two batches behind the device),
    and the seconds of each phase that benchmarks/bench_dump.py fits."""
    from kdcache.dump import dump

    timings = {}
    attrs = dump(teacher="resnet20", checkpoint=str(ckpt), data=str(synth / "train.beton"),
                 out=str(tmp_path / "c.zarr"), batch_size=64, chunk_rows=128, workers=1, progress=False,
                 timings=timings)
    assert set(timings) == {"teacher", "store", "loader", "pass", "drain", "finish"}
    assert all(seconds >= 0 for seconds in timings.values())
    assert_same_store(tmp_path / "c.zarr", full)
    assert attrs["checkpoint_sha256"] == open_store(str(full)).attrs["checkpoint_sha256"]


def test_topk_store_rebuilds_the_distribution(synth, ckpt, tmp_path):
    _, logits, _, _ = direct_outputs(synth, ckpt)
    out = tmp_path / "top2.zarr"
    run_cli("dump", "--teacher", "resnet20", "--checkpoint", ckpt, "--data", synth / "train.beton",
            "--out", out, "--topk", 2, "--temperature", 1, *DUMP)
    g = open_store(str(out))
    assert "logits" not in g and g["topk_indices"].dtype == np.uint8 and g["topk_values"].dtype == np.float16
    cache = LogitCache(str(out))
    assert cache.topk == 2 and cache.bytes_per_sample == 2 * 3
    log_p = F.log_softmax(logits, 1)
    values, classes = log_p.topk(2, dim=1)
    np.testing.assert_array_equal(g["topk_indices"][:], classes.numpy())
    np.testing.assert_allclose(g["topk_values"][:], values.numpy(), rtol=2 ** -10, atol=1e-3)
    rebuilt = torch.from_numpy(cache.logits(np.arange(400)))
    for t in (1.0, 4.0):  # softmax(logits / T) is a distribution whose top classes match the teacher's
        p = (rebuilt / t).softmax(1)
        assert torch.allclose(p.sum(1), torch.ones(400))
        assert torch.equal(p.argmax(1), logits.argmax(1))
    p = rebuilt.exp()
    np.testing.assert_allclose(p.gather(1, classes), values.exp(), rtol=3e-3)
    rest = (1 - values.exp().sum(1)) / 2
    mask = torch.ones(400, 4, dtype=torch.bool).scatter(1, classes, False)
    np.testing.assert_allclose(p[mask].view(400, 2), rest[:, None].expand(400, 2), rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_topk_target_is_the_tempered_teacher_on_its_top_k(synth, ckpt, tmp_path, t):
    """What a student gets from a top-k cache at temperature T, computed directly from full logits:
    the teacher's softmax(z / T) on its top k classes, the rest of that mass spread evenly."""
    _, logits, labels, _ = direct_outputs(synth, ckpt)
    out = tmp_path / "top2.zarr"
    run_cli("dump", "--teacher", "resnet20", "--checkpoint", ckpt, "--data", synth / "train.beton",
            "--out", out, "--topk", 2, "--temperature", t, *DUMP)
    cache = LogitCache(str(out))
    assert cache.temperature == t and open_store(str(out)).attrs["temperature"] == t
    p = (logits.double() / t).softmax(1)
    top, classes = p.topk(2, dim=1)
    want = ((1 - top.sum(1, keepdim=True)) / 2).expand(400, 4).clone().scatter(1, classes, top)
    got = (torch.from_numpy(cache.logits(np.arange(400))).double() / t).softmax(1)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=5e-3, atol=2e-4)  # float16 storage
    # the KD loss sees exactly that target
    student = torch.randn(400, 4, generator=torch.Generator().manual_seed(0))
    from kdcache.distill import kd_loss
    _, _, kl = kd_loss(student, torch.from_numpy(cache.logits(np.arange(400))), labels, 1.0, t)
    reference = (want * (want.log() - (student.double() / t).log_softmax(1))).sum(1).mean()
    assert kl.item() == pytest.approx(reference.item(), rel=2e-3, abs=1e-5)


def test_topk_cache_sets_the_students_temperature_and_refuses_another(synth, ckpt, tmp_path):
    out = tmp_path / "top2.zarr"
    run_cli("dump", "--teacher", "resnet20", "--checkpoint", ckpt, "--data", synth / "train.beton",
            "--out", out, "--topk", 2, "--temperature", 2, *DUMP)
    assert "top-2 at temperature 2" in run_cli("info", out).output
    student = ["train", "--data", synth / "train.beton", "--cache", out, "--fraction", 0.25, "--alpha", 0.9,
               "--steps", 1, "--eval-every", 100, "--arch", "resnet8", "--batch-size", 32, "--workers", 1]
    r = run_cli(*student, "--temperature", 4, "--out", tmp_path / "t4", expect=2)
    assert r.output.strip() == (f"error: cache {out} holds top-2 targets at temperature 2, exact only there: "
                                "train with --temperature 2 (or dump again with --temperature 4)")
    run_cli(*student, "--out", tmp_path / "default")
    assert json.loads((tmp_path / "default" / "config.json").read_text())["temperature_resolved"] == 2.0
    # resuming the dump at another temperature is refused too: it would mix two targets in one store
    r = run_cli("dump", "--teacher", "resnet20", "--checkpoint", ckpt, "--data", synth / "train.beton",
                "--out", out, "--topk", 2, "--temperature", 4, *DUMP, expect=2)
    assert "has another temperature (2.0, this dump: 4.0)" in r.output


@pytest.mark.slow
def test_sampled_store_holds_draws_from_the_tempered_teacher(synth, ckpt, tmp_path):
    from kdcache.sparse import sample_targets

    _, logits, _, _ = direct_outputs(synth, ckpt)
    stores = []
    for batch in (64, 32):  # the draws depend on (seed, index, draw) only, not on the batches
        out = tmp_path / f"b{batch}.zarr"
        run_cli("dump", "--teacher", "resnet20", "--checkpoint", ckpt, "--data", synth / "train.beton",
                "--out", out, "--sample", 3, "--temperature", 2, "--batch-size", batch, "--chunk-rows", 128,
                "--workers", 1)
        stores.append(open_store(str(out)))
    classes, counts = stores[0]["sample_classes"][:], stores[0]["sample_counts"][:]
    assert classes.dtype == np.uint8 and counts.dtype == np.uint8 and classes.shape == (400, 3)
    assert (counts.sum(1) == 3).all() and "logits" not in stores[0]
    np.testing.assert_array_equal(stores[1]["sample_classes"][:], classes)
    np.testing.assert_array_equal(stores[1]["sample_counts"][:], counts)
    # the same draws as sampling the tempered teacher computed directly (a draw may flip where the two
    # computations round differently at a class boundary: allow a few rows)
    want_classes, want_counts = sample_targets((logits.double() / 2).softmax(1).numpy(), np.arange(400), 3, 0)
    same = (np.sort(classes * 10 + counts, 1) == np.sort(want_classes * 10 + want_counts, 1)).all(1)
    assert same.mean() > 0.98
    cache = LogitCache(str(tmp_path / "b64.zarr"))
    assert (cache.sample, cache.temperature, cache.bytes_per_sample) == (3, 2.0, 3 * (1 + 1))
    q = torch.from_numpy(cache.logits(np.arange(400))).double().div(2).softmax(1).numpy()
    want = np.zeros((400, 4))
    np.put_along_axis(want, classes.astype(np.int64), counts / 3, axis=1)
    np.testing.assert_allclose(q, want, atol=1e-6)
    assert "3 draws at temperature 2, classes + counts" in run_cli("info", tmp_path / "b64.zarr").output
    r = run_cli("dump", "--teacher", "resnet20", "--checkpoint", ckpt, "--data", synth / "train.beton",
                "--out", tmp_path / "x.zarr", "--sample", 3, "--topk", 2, *DUMP, expect=2)
    assert "give either --topk or --sample, not both" in r.output
    # a student distils from it at its temperature: finite losses despite the zero entries
    run_cli("train", "--data", synth / "train.beton", "--cache", tmp_path / "b64.zarr", "--fraction", 0.25,
            "--alpha", 0.9, "--steps", 2, "--eval-every", 100, "--arch", "resnet8", "--batch-size", 32,
            "--workers", 1, "--out", tmp_path / "student")
    rows = read_metrics(tmp_path / "student")
    assert 0 < rows[0]["train_kl"] < 10 and np.isfinite(rows[0]["train_loss"])
    assert json.loads((tmp_path / "student" / "config.json").read_text())["temperature_resolved"] == 2.0


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(synth, ckpt, full, tmp_path):
    out = tmp_path / "cache.zarr"
    env = {**os.environ, DIE_AFTER_ENV: "2"}
    args = ["dump", "--teacher", "resnet20", "--checkpoint", ckpt, "--data", synth / "train.beton",
            "--out", out, *DUMP]
    run = subprocess.run([sys.executable, "-m", "kdcache_cli.main", *map(str, args)], env=env, check=False,
                         capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert run.returncode == -9, run.stderr  # SIGKILL
    with pytest.raises(UserError, match="2 of 4 chunks missing"):
        LogitCache(str(out))
    assert "2 of 4 done: INCOMPLETE" in run_cli("info", out).output
    run_cli(*args)
    assert_same_store(out, full)
    run_cli(*args)  # a finished store: nothing to do, still the same
    assert_same_store(out, full)


@pytest.mark.slow
def test_two_process_dump_equals_single_process(synth, ckpt, full, tmp_path):
    out = tmp_path / "cache.zarr"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "kdcache_cli.main", "dump", "--teacher", "resnet20", "--checkpoint", str(ckpt),
         "--data", str(synth / "train.beton"), "--out", str(out), "--device", "cpu", *map(str, DUMP)],
        check=False, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_store(out, full)


def test_mismatched_store_is_refused_until_overwrite(synth, ckpt, full, tmp_path):
    out = tmp_path / "cache.zarr"
    shutil.copytree(full, out)
    data = ("--data", synth / "train.beton", "--out", out, *DUMP)
    other = make_teacher(tmp_path / "other.pt", seed=1)
    r = run_cli("dump", "--teacher", "resnet20", "--checkpoint", other, *data, expect=2)
    assert "another checkpoint SHA-256" in r.output and "--overwrite" in r.output
    r = run_cli("dump", "--teacher", "resnet20", "--checkpoint", ckpt, *data, "--topk", 3, expect=2)
    assert f"store {out} has another topk (none, this dump: 3)" in r.output  # the user's words, not Python's
    r = run_cli("dump", "--teacher", "resnet20", "--checkpoint", ckpt, "--data", synth / "train.beton",
                "--out", out, "--batch-size", 64, "--chunk-rows", 64, "--workers", 1, expect=2)
    assert f"store {out} has another chunk rows (128, this dump: 64)" in r.output

    g = open_store(str(out), "r+")
    g.attrs["train_fingerprint"] = "0" * 32  # as if made from another dataset
    r = run_cli("dump", "--teacher", "resnet20", "--checkpoint", ckpt, *data, expect=2)
    assert "another train fingerprint" in r.output
    from kdcache.beton import dataset_info
    with pytest.raises(UserError, match=f"store {out} was made from another dataset"):  # as given, no file://
        LogitCache(str(out), dataset_info(synth / "train.beton"))

    run_cli("dump", "--teacher", "resnet20", "--checkpoint", other, *data, "--overwrite")
    from kdcache.models import sha256_file
    assert LogitCache(str(out)).attrs["checkpoint_sha256"] == sha256_file(other)
    assert not np.array_equal(read_all(out)["logits"], read_all(full)["logits"])


def test_user_mistakes_are_one_line_errors(synth, ckpt, tmp_path):
    base = ("--data", synth / "train.beton", "--out", tmp_path / "s.zarr")
    cases = [
        (("--teacher", "resnet32", "--checkpoint", ckpt), "holds a resnet20"),
        (("--teacher", "resnet20"), "exactly one of --checkpoint PATH and --pretrained"),
        (("--teacher", "resnet20", "--checkpoint", ckpt, "--batch-size", 100), "multiple of --batch-size"),
        (("--teacher", "resnet20", "--checkpoint", ckpt, "--topk", 4), "--topk must be between 1 and 3"),
    ]
    for args, message in cases:
        r = run_cli("dump", *args, *base, expect=2)
        assert message in r.output and "Traceback" not in r.output
    r = run_cli("dump", "--teacher", "resnet20", "--checkpoint", ckpt, "--data", synth / "test.beton",
                "--out", tmp_path / "s.zarr", expect=2)
    assert "training split" in r.output
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    r = run_cli("dump", "--teacher", "resnet20", "--checkpoint", ckpt, "--data", synth / "train.beton",
                "--out", tmp_path / "notes", "--overwrite", expect=2)
    assert "is not a kdcache store" in r.output and (tmp_path / "notes" / "keep.txt").exists()


@pytest.mark.parametrize("bad", [float("nan"), 1e6])  # NaN, and finite in float32 but beyond float16's range
def test_non_finite_output_names_first_bad_sample(synth, ckpt, tmp_path, monkeypatch, bad):
    import kdcache.dump
    x, _, _, _ = direct_outputs(synth, ckpt)
    targets = x.mean((1, 2, 3))[[300, 170]]  # two samples past the first chunk, which is written fine

    def is_bad(images):
        return ((images.mean((1, 2, 3))[:, None] - targets).abs() < 1e-4).any(1)

    expected = int(torch.nonzero(is_bad(x))[0])
    assert expected >= 128

    class Faulty(nn.Module):  # bad logits for the chosen samples
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return torch.where(is_bad(x)[:, None], bad, self.model(x))

    load = kdcache.dump.load_teacher

    def load_faulty(*args, **kwargs):
        model, ident = load(*args, **kwargs)
        return Faulty(model), ident

    monkeypatch.setattr(kdcache.dump, "load_teacher", load_faulty)
    r = run_cli("dump", "--teacher", "resnet20", "--checkpoint", ckpt, "--data", synth / "train.beton",
                "--out", tmp_path / "s.zarr", *DUMP, expect=2)
    assert f"outputs for sample {expected} are not finite" in r.output
