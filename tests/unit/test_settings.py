from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.settings import ConfigError, load_settings


def test_embedded_defaults_validate() -> None:
    s = load_settings(None, environ={})
    assert s.node.ae_title == "COVIDSEG"
    assert s.node.port == 11112
    assert s.series.quiet_seconds == 10
    assert s.storage.dir.is_absolute()


def test_repo_node_yaml_loads(repo_root: Path) -> None:
    s = load_settings(repo_root / "node.yaml", environ={})
    assert s.inference.backend == "triton"
    assert s.inference.config == repo_root / "config" / "config_inference.json"


def test_unknown_key_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "n.yaml"
    cfg.write_text("node:\n  ae_titel: X\n")
    with pytest.raises(ConfigError, match=r"node\.ae_titel: unknown key"):
        load_settings(cfg, environ={})


def test_bad_value_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "n.yaml"
    cfg.write_text("node:\n  port: 70000\n")
    with pytest.raises(ConfigError, match=r"node\.port"):
        load_settings(cfg, environ={})


def test_ae_title_too_long(tmp_path: Path) -> None:
    cfg = tmp_path / "n.yaml"
    cfg.write_text("node:\n  ae_title: THIS_IS_FAR_TOO_LONG\n")
    with pytest.raises(ConfigError, match=r"node\.ae_title"):
        load_settings(cfg, environ={})


def test_environment_overrides(tmp_path: Path) -> None:
    s = load_settings(None, environ={"DICOM_NODE__NODE__PORT": "104", "DICOM_NODE__STORAGE__FSYNC": "false"})
    assert s.node.port == 104
    assert s.storage.fsync is False


def test_relative_paths_anchor_at_config_dir(tmp_path: Path) -> None:
    cfg = tmp_path / "sub" / "n.yaml"
    cfg.parent.mkdir()
    cfg.write_text("storage:\n  dir: spool\n")
    assert load_settings(cfg, environ={}).storage.dir == (tmp_path / "sub" / "spool").resolve()


def test_duplicate_destination_rejected(tmp_path: Path) -> None:
    cfg = tmp_path / "n.yaml"
    cfg.write_text("destinations:\n - {ae_title: A, host: h, port: 1}\n - {ae_title: A, host: h, port: 1}\n")
    with pytest.raises(ConfigError, match="listed twice"):
        load_settings(cfg, environ={})
