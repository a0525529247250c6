"""The GPU serving path (:mod:`ctrkit.serve.gpu`): size buckets, clear refusals without a GPU, and on a CUDA
machine the graphed model's logits equal the model's own for every request size, chunked past the largest graph,
with missing values, and through the scorer."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ctrkit.data.dataset import Batch
from ctrkit.data.synth import make_click_log, split_by_time, synth_schema
from ctrkit.models import build_model
from ctrkit.nn.embedding import FeatureSpec
from ctrkit.serve.bundle import Bundle, BundleError
from ctrkit.serve.gpu import MIN_ROWS, GPUError, GraphedModel, bucket
from ctrkit.serve.scorer import GRAPHED, Scorer

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
SPEC = FeatureSpec(n_ids=60, field_sizes=(20, 25, 15), sparse_names=("a", "b", "c"), dense_names=("x", "y"))


def test_buckets_literal() -> None:
    assert [bucket(n, 4096) for n in (1, 63, 64, 65, 128, 129, 1000, 4096, 5000)] == [
        64, 64, 64, 128, 128, 256, 1024, 4096, 4096]
    assert bucket(100, 64) == 64
    with pytest.raises(ValueError, match="at least one row"):
        bucket(0, 4096)


@given(n=st.integers(1, 100_000), power=st.integers(6, 16))
def test_bucket_is_the_smallest_power_of_two_that_holds_the_rows(n: int, power: int) -> None:
    most = 1 << power
    size = bucket(n, most)
    assert size & (size - 1) == 0 and MIN_ROWS <= size <= most
    assert size >= min(n, most)
    assert size == MIN_ROWS or size // 2 < n


def test_refusals_name_the_reason() -> None:
    model = build_model("deepfm", SPEC, embed_dim=4, hidden=(8,))
    with pytest.raises(GPUError, match="CUDA device, not cpu"):
        GraphedModel(model, "cpu")
    if not CUDA:
        with pytest.raises(GPUError, match="torch sees none"):
            GraphedModel(model, "cuda")
    else:
        with pytest.raises(ValueError, match="power of two"):
            GraphedModel(model, "cuda", max_rows=1000)


def _rows(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    offsets = np.cumsum((0, *SPEC.field_sizes[:-1]))
    ids = (offsets + rng.integers(0, SPEC.field_sizes, (n, 3))).astype(np.int32)
    dense = rng.standard_normal((n, 2)).astype(np.float32)
    dense[rng.random(dense.shape) < 0.2] = np.nan
    return ids, dense


@needs_cuda
@pytest.mark.parametrize("name", ["deepfm", "dcnv2", "xdeepfm", "finalmlp"])
def test_graphed_logits_equal_the_models_at_every_size(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, SPEC, embed_dim=8).eval()
    graphed = GraphedModel(model, "cuda", max_rows=256)
    for n in (1, 63, 64, 65, 200, 256, 700):  # 700: three chunks of the largest graph
        ids, dense = _rows(n, seed=n)
        with torch.no_grad():
            want = model(Batch(torch.from_numpy(ids), torch.from_numpy(dense))).numpy()
        got = graphed(ids, dense)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert sorted(graphed._graphs) == [64, 128, 256]  # one graph per bucket, reused


@needs_cuda
def test_concurrent_requests_get_their_own_answers() -> None:
    torch.manual_seed(0)
    model = build_model("deepfm", SPEC, embed_dim=8).eval()
    graphed = GraphedModel(model, "cuda")
    inputs = [_rows(100 + 37 * k, seed=k) for k in range(8)]
    with torch.no_grad():
        want = [model(Batch(torch.from_numpy(i), torch.from_numpy(d))).numpy() for i, d in inputs]
    got: dict[int, np.ndarray] = {}

    def work(k: int) -> None:
        for _ in range(20):
            got[k] = graphed(*inputs[k])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(8):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def bundle_and_records(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    from ctrkit.pipeline import train

    out = tmp_path_factory.mktemp("gpu")
    log, _ = make_click_log(n_rows=2000, n_users=60, n_items=40, seed=5)
    tr, va, te = split_by_time(log.drop("p_click"))
    train(tr, schema=synth_schema(), valid=va, model="deepfm", out=out / "m", epochs=1, batch_size=256,
          progress=False)
    return out / "m" / "bundle", te.drop("click").head(1000).to_dicts()


def test_scorer_on_cuda_without_a_gpu_is_an_error(bundle_and_records: tuple[Path, list[dict]]) -> None:
    if CUDA:
        pytest.skip("this machine has a GPU")
    with pytest.raises(BundleError, match="cannot serve on cuda: .*torch sees none"):
        Scorer(Bundle.load(bundle_and_records[0]), device="cuda")


@needs_cuda
def test_scorer_on_cuda_gives_the_bundles_answers(bundle_and_records: tuple[Path, list[dict]]) -> None:
    path, records = bundle_and_records
    bundle = Bundle.load(path)
    scorer = Scorer(bundle, path, device="cuda", reps=3, keep_paths=True)
    assert GRAPHED in scorer.timings_ms and scorer.describe()["device"] == "cuda"
    want = bundle.predict(records)
    np.testing.assert_allclose(scorer.score(scorer.frame(records)), want, rtol=1e-4, atol=1e-5)
    scorer.backend = GRAPHED
    np.testing.assert_allclose(scorer.predict(records), want, rtol=1e-4, atol=1e-5)
