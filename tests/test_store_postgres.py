"""The metadata store on a real PostgreSQL server (started by tests/postgres.py)."""

from __future__ import annotations

import pytest

from umig.api import Store
from umig.errors import NotFoundError, UmigError


def test_init_needs_blobs_and_open_needs_a_store(pg_url, tmp_path):
    with pytest.raises(UmigError, match="needs a blob location"):
        Store.init(pg_url)
    with pytest.raises(NotFoundError, match="no umig store"):
        Store.open(pg_url)
    s = Store.init(pg_url, blobs=tmp_path / "blobs")
    assert s.root is None and s.url == pg_url and s.blobs.url == str((tmp_path / "blobs").resolve())
    s.close()
    with pytest.raises(UmigError, match="already exists"):
        Store.init(pg_url, blobs=tmp_path / "blobs")
    with Store.open(pg_url) as s2:  # the blob location comes from the database
        assert s2.blobs.url == str((tmp_path / "blobs").resolve())
