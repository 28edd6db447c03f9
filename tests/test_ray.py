"""The Ray backend: a local Ray instance runs the same unlearning as the local worker pool.

Skipped only where Ray is not installed (``pip install 'umig[ray]'``; ``make test`` installs it).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'umig[ray]' to run the Ray backend test")

from umig.blobs import open_blobs
from umig.errors import UmigError  # noqa: E402
from umig.execution import ProcessPool, RayBackend, make_backend  # noqa: E402
from umig.api import Store  # noqa: E402
from umig.unlearners.base import Task


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance with 2 CPUs, shared by this module's tests (its workers import test helpers
    such as ``test_execution:write_task`` from this folder)."""
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=100 * 2**20,
             logging_level="error", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent)}})
    yield ray
    ray.shutdown()


def _current(store: Store) -> dict[str, tuple[int, dict[str, torch.Tensor]]]:
    return {n.name: (n.version, store.blobs.load(store.version(n.name).head_blob)) for n in store.nodes()}


def test_ray_unlearning_is_identical_to_the_local_pool(local_ray, fl_store: Store, tmp_path: Path):
    shutil.copytree(fl_store.root, tmp_path / "ray")
    via_ray = Store.open(tmp_path / "ray")
    try:
        # One thread per worker on both sides (Ray actors default to one CPU), so that even the
        # float reductions of the Fisher passes run alike and the results can match bit for bit.
        pool = ProcessPool(fl_store.blobs.url, ["cpu", "cpu"], threads=1)
        try:
            local = fl_store.unlearn([1], backend=pool, evaluate=True)
        finally:
            pool.close()
        remote = via_ray.unlearn([1], backend="ray", workers=2, device="cpu", evaluate=True)
        assert remote.backend["backend"] == "ray" and remote.backend["workers"] == 2
        assert local.backend["backend"] == "pool"
        assert [(n.name, n.role, n.version_before, n.version_after) for n in remote.nodes] == \
               [(n.name, n.role, n.version_before, n.version_after) for n in local.nodes]
        a, b = _current(fl_store), _current(via_ray)
        assert a.keys() == b.keys()
        for name in a:
            assert a[name][0] == b[name][0]
            for k in a[name][1]:
                assert torch.equal(a[name][1][k], b[name][1][k]), f"{name}.{k} differs"
        # The same metrics: the evaluation tasks ran on Ray too.
        for x, y in zip(local.nodes, remote.nodes):
            assert x.metrics.keys() == y.metrics.keys()
            for k, v in x.metrics.items():
                assert v == pytest.approx(y.metrics[k], abs=1e-6), (x.name, k)
        # Only the driver wrote metadata: one operation, committed, with both phases' blobs adopted.
        assert [h["operation"] for h in via_ray.history()] == [remote.operation]
        assert via_ray.blobs.all_digests() <= via_ray._referenced()  # no orphaned worker blobs
    finally:
        via_ray.close()


def test_ray_backend_reports_its_workers_and_refuses_impossible_requests(local_ray, tmp_path: Path):
    Store.init(tmp_path / "s").close()
    be = make_backend(str(tmp_path / "s" / "blobs"), backend="ray", workers=2, device="cpu")
    try:
        assert isinstance(be, RayBackend)
        info = be.workers()
        assert sorted(i["slot"] for i in info) == ["cpu", "cpu"] and len({i["pid"] for i in info}) == 2
        assert all(i["device"] == "cpu" and i["threads"] == 1 for i in info)
    finally:
        be.close()
    assert ray.is_initialized()  # an instance the caller started is left running
    with pytest.raises(UmigError, match="no GPU"):
        make_backend(str(tmp_path / "s" / "blobs"), backend="ray", device="cuda")
    with pytest.raises(UmigError, match="more CPUs"):
        make_backend(str(tmp_path / "s" / "blobs"), backend="ray", workers=3, device="cpu")


def test_ray_actors_need_only_an_s3_blob_url(local_ray, s3_url):
    """No shared file system: actors open the bucket from its URL, with the AWS variables handed to them
    (this Ray started before the test set them, so its workers would not have them otherwise)."""
    be = RayBackend(s3_url, workers=1, device="cpu")
    try:
        out = be.run([Task(fn="test_execution:write_task", node=f"n{i}", payload={"i": i}) for i in range(4)])
    finally:
        be.close()
    blobs = open_blobs(s3_url)
    for i, (digest, created) in enumerate(out):
        assert created == [digest] and blobs.load(digest)["t"][0] == i
