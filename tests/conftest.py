"""Shared fixtures: a small real FL lineage on digits, built once per session and copied per test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from umig.api import Store
from umig.cli.main import app
from umig.demo import build_fl_digits
from umig.train import Recipe

from postgres import pg_url, postgres_server, postgres_servers  # noqa: F401  (fixtures: real PostgreSQL servers)
from servers import s3_server, s3_url  # noqa: F401  (fixtures: an S3 server, moto in server mode)

REPO = Path(__file__).resolve().parents[1]
FAST_RECIPE = Recipe(optimizer="adam", lr=0.01, epochs=3, batch_size=64, seed=0)

# Tiny models on 2 shared cores: one thread each is several times faster than two.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def fl_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-client x 2-round FedAvg lineage on sklearn digits (9 nodes), built once."""
    root = tmp_path_factory.mktemp("template") / "store"
    store = Store.init(root)
    build_fl_digits(store, clients=3, rounds=2, recipe=FAST_RECIPE)
    store.close()
    return root


@pytest.fixture
def fl_store(fl_template: Path, tmp_path: Path) -> Store:
    """A private copy of the FL lineage store (tests may change it freely)."""
    root = tmp_path / "store"
    shutil.copytree(fl_template, root)
    store = Store.open(root)
    yield store
    store.close()


def umig_cli(*args: str, store: Path | None = None, check: bool = False, timeout: float = 300,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `umig` command line in a subprocess."""
    cmd = [sys.executable, "-m", "umig.cli.main", *args]
    if store is not None:
        cmd += ["--store", str(store)]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"umig {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def store_state(store: Path | str | Store) -> dict:
    """A comparable snapshot of a store: every DB row and every blob digest.

    ``store`` is a store directory (read with sqlite3 and its ``blobs/`` files, without opening it) or an
    open store on either backend (every table through ``store.db``, blobs through ``store.blobs``)."""
    if not isinstance(store, (str, os.PathLike)):
        from umig.store import _COPY_TABLES

        rows = {t: sorted(map(tuple, store.db.tuples(f"SELECT * FROM {t}")), key=repr) for t in _COPY_TABLES}
        return {"rows": rows, "blobs": sorted(store.blobs.all_digests())}
    import sqlite3

    root = Path(store)
    db = sqlite3.connect(root / "umig.db")
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
    rows = {t: sorted(map(tuple, db.execute(f"SELECT * FROM {t}").fetchall()), key=repr) for t in tables}
    db.close()
    blobs = sorted(p.name.removesuffix(".safetensors") for p in (root / "blobs").glob("??/*.safetensors"))
    return {"rows": rows, "blobs": blobs}


def cli_run(*args: str, store: Path | str | None = None):
    """The CLI in-process (typer's CliRunner); a crash (anything but a clean exit) fails the test with its traceback."""
    argv = [*args, *(["--store", str(store)] if store is not None else [])]
    res = CliRunner().invoke(app, argv)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise AssertionError(f"umig {' '.join(argv)} crashed") from res.exception
    return res


def cli_ok(*args: str, store: Path | str | None = None) -> str:
    """Run the CLI in-process and return its stdout; it must exit 0."""
    res = cli_run(*args, store=store)
    assert res.exit_code == 0, (args, res.stdout, res.stderr)
    return res.stdout


def cli_error_line(res, *needles: str) -> str:
    """The one ``error:`` line of a failed CLI result (exit 1), containing every needle."""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 1, (res.exit_code, res.stdout, res.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _s3_object(store: Store, digest: str) -> str:
    return f"{store.blobs.bucket}/{store.blobs._key(digest)}"


def corrupt_blob(store: Store, digest: str, offset: int = -3) -> None:
    """Flip one byte of a stored blob, in a directory or in S3 (flipping it again repairs it)."""
    if store.blobs.url.startswith("s3://"):
        key = _s3_object(store, digest)
        data = bytearray(store.blobs.fs.cat_file(key))
        data[offset] ^= 0xFF
        store.blobs.fs.pipe_file(key, bytes(data))
    else:
        path = store.blobs.path(digest)
        data = bytearray(path.read_bytes())
        data[offset] ^= 0xFF
        path.write_bytes(bytes(data))


def delete_blob_file(store: Store, digest: str) -> None:
    """Delete a stored blob behind the store's back (a directory's file or an S3 object)."""
    if store.blobs.url.startswith("s3://"):
        store.blobs.fs.rm_file(_s3_object(store, digest))
    else:
        store.blobs.path(digest).unlink()
