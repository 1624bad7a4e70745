"""Export helpers: folder swaps that never lose the good folder, the loss plot."""

from qctrain import export


def make(folder, text):
    folder.mkdir(parents=True)
    (folder / "weights").write_text(text)
    return folder


def test_replace_dir_swaps_whole_folders(tmp_path):
    dest = make(tmp_path / "adapter", "old")
    export.replace_dir(make(tmp_path / "new", "new"), dest)
    assert (dest / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_crash_between_renames_is_repaired(tmp_path):
    make(tmp_path / ".adapter.old", "good")  # the state a crash after the first rename leaves
    export.restore_interrupted_swap(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "weights").read_text() == "good"

    make(tmp_path / "new", "newer")
    (tmp_path / "adapter").rename(tmp_path / ".adapter.old")
    export.replace_dir(tmp_path / "new", tmp_path / "adapter")
    assert (tmp_path / "adapter" / "weights").read_text() == "newer"
    assert not (tmp_path / ".adapter.old").exists()


def test_loss_plot_from_log_history(tmp_path):
    rows = [{"step": s, "loss": 3.0 - s / 10} for s in range(1, 6)] + [{"step": 5, "eval_loss": 2.7}]
    export.plot_loss(rows, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
