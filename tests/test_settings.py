"""The pipeline's settings: one function (config.settings) finds every section by its name in the
YAML files of the configuration folder, which is the one source of every tunable."""

from __future__ import annotations

import shutil

import pytest
import yaml

from gppy_stage import config
from gppy_stage.errors import ConfigError


def _sections(name: str) -> dict:
    return yaml.safe_load((config.config_dir() / name).read_text())


def test_every_section_is_found_by_its_name_as_the_yaml_has_it():
    for name in config.SETTINGS_FILES:
        for section, values in _sections(name).items():
            assert config.settings(section) == values, (name, section)


def test_no_section_is_in_two_files():
    # the first file's would hide the second's without a word
    first, second = (set(_sections(n)) for n in config.SETTINGS_FILES)
    assert first & second == set()


def test_unknown_section_names_the_files_looked_in():
    with pytest.raises(ConfigError, match="no section 'stakc' in pipeline.yaml or subtract.yaml"):
        config.settings("stakc")


def test_a_folder_of_ones_own_is_read(tmp_path, monkeypatch):
    folder = tmp_path / "config"
    shutil.copytree(config.config_dir(), folder)
    text = (folder / "subtract.yaml").read_text()
    assert "  nthreads: 2 " in text
    (folder / "subtract.yaml").write_text(text.replace("  nthreads: 2 ", "  nthreads: 3 "))
    before = config.settings("stack")["nthreads"]
    monkeypatch.setenv("GPPY_CONFIG", str(folder))
    assert (before, config.settings("stack")["nthreads"]) == (2, 3)


def test_a_broken_file_is_one_line_that_keeps_its_cause(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text("masters:\n  qa: [1, 2\n")
    with pytest.raises(ConfigError) as info:
        config.load_yaml(path)
    assert str(info.value).startswith(f"{path}: line ") and "\n" not in str(info.value)
    assert isinstance(info.value.__cause__, yaml.YAMLError)  # the parser's context, for the stage log
