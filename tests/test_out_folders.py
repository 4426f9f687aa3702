"""Output folders of the torch-free commands (issue 21): `talr simulate --overwrite` replaces only its
own output, never through a link; a read-only --out fails before the computation; the tiny-world
cache lives in the user's cache folder, shown in `talr demo --help`."""
from __future__ import annotations

import pytest

from experiments.cli import main


def test_simulate_overwrite_replaces_only_its_own_output(tmp_path, capsys):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("\\documentclass{article}")
    assert main(["simulate", "--out", str(thesis), "--steps", "2", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a folder talr created" in err
    assert (thesis / "thesis.tex").exists()
    out = tmp_path / "sim"
    assert main(["simulate", "--out", str(out), "--steps", "2"]) == 0
    assert (out / ".talr-run").is_file()
    assert main(["simulate", "--out", str(out), "--steps", "3", "--overwrite"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4  # t = 0..3: the new run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sim", "thesis"]  # no temporary folder left


def test_simulate_refuses_a_symlinked_out_without_touching_it(tmp_path, capsys):
    out = tmp_path / "sim"
    assert main(["simulate", "--out", str(out), "--steps", "2"]) == 0
    link = tmp_path / "link"
    link.symlink_to(out)
    capsys.readouterr()
    assert main(["simulate", "--out", str(link), "--steps", "2", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "symbolic link" in err
    assert link.is_symlink() and (out / "metrics.jsonl").is_file()


def test_simulate_read_only_out_fails_before_computing(capsys, monkeypatch):
    import theory.simulate as S

    monkeypatch.setattr(S, "run_tabular", lambda *a, **k: pytest.fail("simulated before checking --out"))
    assert main(["simulate", "--out", "/sys/talr-no-such-dir/sim", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not writable" in err


def test_world_cache_is_the_users_cache_and_demo_help_shows_it(tmp_path, monkeypatch, capsys):
    """The pretrained tiny world went to ./runs/.cache/worlds in whatever folder talr ran from."""
    from sft.runs import user_cache_dir

    monkeypatch.delenv("TALR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_dir("worlds") == tmp_path / "xdg" / "talr" / "worlds"
    monkeypatch.setenv("TALR_CACHE_DIR", str(tmp_path / "mine"))
    assert user_cache_dir("worlds") == tmp_path / "mine" / "worlds"
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps long paths at hyphens
    assert f"default:{tmp_path / 'mine' / 'worlds'}" in text and "runs/.cache" not in text
