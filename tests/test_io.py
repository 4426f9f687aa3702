"""sft.io: atomic writes leave either the old or the new complete file, never a partial one."""
import json
import math

import numpy as np
import pytest

from sft.io import atomic_write_json, atomic_write_text, publish_dir, to_jsonable, write_with


def test_to_jsonable_numpy_and_nonfinite():
    out = to_jsonable({"a": np.float32(1.5), "b": np.arange(3), "c": float("nan"), 1: (np.int64(2), math.inf)})
    assert out == {"a": 1.5, "b": [0, 1, 2], "c": None, "1": [2, None]}
    json.dumps(out, allow_nan=False)


def test_failed_writer_leaves_previous_file(tmp_path):
    p = tmp_path / "x.json"
    atomic_write_json(p, {"v": 1})

    def boom(tmp):
        tmp.write_text("partial")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        write_with(p, boom)
    assert json.loads(p.read_text()) == {"v": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["x.json"]  # no temporary left behind


def test_unserialisable_object_writes_nothing(tmp_path):
    p = tmp_path / "y.json"
    with pytest.raises(TypeError):
        atomic_write_json(p, {"f": object()})
    assert not p.exists()


def test_publish_dir_refuses_nonempty_target(tmp_path):
    final = tmp_path / "run"
    final.mkdir()
    (final / "old.txt").write_text("old")
    tmp = tmp_path / ".run.tmp"
    tmp.mkdir()
    atomic_write_text(tmp / "new.txt", "new")
    with pytest.raises(FileExistsError):
        publish_dir(tmp, final)
    assert (final / "old.txt").exists()
    publish_dir(tmp, final, overwrite=True)
    assert sorted(f.name for f in final.iterdir()) == ["new.txt"]


def test_peak_rss_follows_a_large_allocation_and_resets(tmp_path):
    """VmHWM after a 200 MB allocation is at least 200 MB above the RSS before it; after the reset
    it drops back near the current RSS. A status file without VmHWM (not Linux) reads None."""
    import numpy as np
    import pytest

    from sft.io import status_kib, peak_rss_gb, reset_peak_rss, rss_gb

    if not reset_peak_rss():
        pytest.fail("/proc/self/clear_refs must be writable on the test machines (Linux)")
    before = rss_gb()
    a = np.ones(200_000_000 // 8)  # touched: resident
    assert peak_rss_gb() >= before + 0.19
    del a
    assert reset_peak_rss()
    assert peak_rss_gb() < before + 0.1
    fake = tmp_path / "status"
    fake.write_text("Name: x\nVmRSS: 10 kB\n")
    assert peak_rss_gb(str(fake)) is None and status_kib("VmRSS", str(fake)) == 10
    assert rss_gb(str(fake)) == pytest.approx(10 * 1024 / 1e9)  # kB in /proc are KiB; GB = 10^9 bytes


def test_release_free_memory_returns_fragmented_heap_pages():
    """After a 16 MB free, glibc serves 2 MB tensors from the heap; freeing 9 of every 10 leaves
    ~540 MB of free pages between live ones, still resident. `release_free_memory` (malloc_trim)
    hands them back: RSS falls by most of what was freed."""
    import sys

    import torch

    from sft.io import release_free_memory, status_kib

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's malloc_trim and /proc are Linux's")
    big = torch.empty(16 << 20, dtype=torch.uint8)
    del big  # raises the mmap threshold to 16 MB
    xs = [torch.ones(2 << 20, dtype=torch.uint8) for _ in range(300)]
    keep = xs[::10]
    del xs
    before = status_kib("VmRSS")
    assert release_free_memory() is True
    after = status_kib("VmRSS")
    assert before - after > 0.5 * 270 * 2 * 1024  # KiB: at least half of the 270 freed 2 MB tensors
    assert all(int(k[0]) == 1 for k in keep)  # the live tensors are untouched
