"""`medmvl download`: the only network use, tested with the hub client mocked."""

from __future__ import annotations

import pytest

from medmvl_core.errors import CheckpointError


def test_download_calls_snapshot_download_with_safe_patterns(monkeypatch, tmp_path, capsys):
    import huggingface_hub

    from medmvl_core.cli import main

    calls = []

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs)
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    rc = main(["download", "shiym2000/MedM-VL-CT-Chest-3B-en", "--local-dir", str(tmp_path / "w"), "--revision", "v1"])
    assert rc == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "snap")
    (kw,) = calls
    assert kw["repo_id"] == "shiym2000/MedM-VL-CT-Chest-3B-en" and kw["revision"] == "v1"
    assert kw["local_dir"] == str(tmp_path / "w")
    assert "*.safetensors" in kw["allow_patterns"] and not any(p.endswith((".bin", ".pt", ".py")) for p in kw["allow_patterns"])


def test_download_refuses_when_offline(monkeypatch):
    import argparse

    from medmvl_core.commands import download

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):
        download.run(argparse.Namespace(repo_id="a/b", local_dir=None, revision=None, token=None))


def test_download_failure_is_one_clear_error(monkeypatch):
    import argparse

    import huggingface_hub

    from medmvl_core.commands import download

    def boom(**kwargs):
        raise OSError("connection refused")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", boom)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(CheckpointError, match="a/b.*connection refused"):
        download.run(argparse.Namespace(repo_id="a/b", local_dir=None, revision=None, token=None))
