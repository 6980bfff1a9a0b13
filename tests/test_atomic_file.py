"""Atomic file replacement, which every writer of the pack goes through."""

import os

import pytest

from mod_adapter.modules.atomic_file import atomic_replace, atomic_write_text


def test_text_lands_whole_with_normal_permissions_in_a_new_folder(tmp_path):
    path = tmp_path / "new" / "manifest.jsonl"
    atomic_write_text(path, "é\n")
    assert path.read_text(encoding="utf-8") == "é\n" and os.listdir(path.parent) == ["manifest.jsonl"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


def test_a_failing_block_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "training_state.json"
    atomic_write_text(path, "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_replace(path) as temp_path:
            with open(temp_path, "w") as handle:
                handle.write("half of the new")
            raise KeyboardInterrupt  # Ctrl-C mid-save
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["training_state.json"]
