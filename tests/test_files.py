"""Folder clean-up that a planted symlink cannot redirect."""

from __future__ import annotations

from oml_core.files import remove_tree


def test_remove_tree_removes_a_planted_link_and_spares_its_target(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not ours")
    link = tmp_path / "work" / "audit"
    link.parent.mkdir()
    link.symlink_to(outside, target_is_directory=True)
    remove_tree(link)
    assert not link.exists() and not link.is_symlink()
    assert (outside / "keep.txt").read_text() == "not ours"


def test_remove_tree_removes_a_real_folder_and_ignores_a_missing_one(tmp_path):
    folder = tmp_path / "a" / "b"
    folder.mkdir(parents=True)
    (folder / "x").write_text("1")
    remove_tree(tmp_path / "a")
    assert not (tmp_path / "a").exists()
    remove_tree(tmp_path / "a")  # nothing there: no error
