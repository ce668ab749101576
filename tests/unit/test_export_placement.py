"""Where an export reads from and how it puts its result in place: no links out of a local
checkpoint unless asked, OUT present at every instant, leftovers of a killed export cleared."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from export import source, swap
from export.errors import ExportError
from export.pipeline import export_model
from sidecar.errors import ModelLoadError
from sidecar.models.manifest import previous_dir, read_manifest


def model_dir(path: Path, marker: str) -> Path:
    path.mkdir(parents=True)
    (path / "marker.txt").write_text(marker)
    return path


def test_a_local_checkpoint_may_not_link_outside_itself(tmp_path: Path) -> None:
    checkpoint = model_dir(tmp_path / "checkpoint", "x")
    (tmp_path / "elsewhere.json").write_text("{}")
    (checkpoint / "config.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(ExportError, match=r"config.json is a link to .*--follow-symlinks"):
        source.resolve(str(checkpoint))
    with pytest.raises(ExportError, match="--follow-symlinks"):  # the whole export refuses
        export_model(str(checkpoint), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / ".out.partial").exists()


def test_links_inside_and_the_hub_cache_layout_are_followed(tmp_path: Path) -> None:
    inside = model_dir(tmp_path / "inside", "x")
    (inside / "sub").mkdir()
    (inside / "sub" / "config.json").write_text("{}")
    (inside / "config.json").symlink_to("sub/config.json")
    source.check_links(inside)
    repo = tmp_path / "hub" / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "0123abcd").write_text("{}")
    snapshot = model_dir(repo / "snapshots" / "f00d", "x")
    (snapshot / "config.json").symlink_to("../../blobs/0123abcd")
    source.check_links(snapshot)
    (snapshot / "weights.bin").symlink_to(tmp_path / "elsewhere")  # beyond the cache repo
    with pytest.raises(ExportError, match=r"weights\.bin is a link to"):
        source.check_links(snapshot)


KILLED_AFTER_FIRST_RENAME = """
    import os, signal, sys
    from pathlib import Path
    from export import swap
    if sys.argv[3] == "no-exchange":
        swap._exchange = lambda a, b: False  # a filesystem without RENAME_EXCHANGE
    rename = Path.rename
    def rename_then_die(self, target):
        rename(self, target)
        os.kill(os.getpid(), signal.SIGKILL)
    Path.rename = rename_then_die
    swap.install(Path(sys.argv[1]), Path(sys.argv[2]))
"""


def install_killed_after_first_rename(staging: Path, out: Path, mode: str) -> int:
    script = textwrap.dedent(KILLED_AFTER_FIRST_RENAME)
    done = subprocess.run(
        [sys.executable, "-c", script, str(staging), str(out), mode],
        cwd=Path(__file__).parents[2],
        timeout=60,
    )
    return done.returncode


def test_replacing_a_dir_never_renames_it_away(tmp_path: Path) -> None:
    """One exchange and no rename of OUT (the old code's kill point): OUT is the old dir or
    the new one at every instant."""
    if not swap._exchange(model_dir(tmp_path / "a", "a"), model_dir(tmp_path / "b", "b")):
        pytest.skip("this filesystem cannot exchange two dirs (the two-rename path is tested)")
    out = model_dir(tmp_path / "out", "old")
    staging = model_dir(tmp_path / ".out.partial", "new")
    assert install_killed_after_first_rename(staging, out, "exchange") == 0
    assert (out / "marker.txt").read_text() == "new"
    assert not staging.exists()
    assert not previous_dir(out).exists()


def test_a_dir_stranded_by_a_killed_swap_is_named_and_put_back(tmp_path: Path) -> None:
    out = model_dir(tmp_path / "out", "old")
    staging = model_dir(tmp_path / ".out.partial", "new")
    assert install_killed_after_first_rename(staging, out, "no-exchange") == -9
    assert not out.exists()
    assert previous_dir(out).is_dir()
    with pytest.raises(ModelLoadError, match=r"\.out\.previous holds the model dir an interrupted"):
        read_manifest(out)
    # The next export puts it back before anything else, so without --force it refuses.
    with pytest.raises(ExportError, match="already exists: pass --force"):
        export_model("unused", out)
    assert (out / "marker.txt").read_text() == "old"
    assert not previous_dir(out).exists()


def test_an_old_dir_left_beside_a_new_one_is_removed(tmp_path: Path) -> None:
    out = model_dir(tmp_path / "out", "new")
    model_dir(previous_dir(out), "old")
    assert "removed" in swap.recover(out)
    assert (out / "marker.txt").read_text() == "new"
    assert not previous_dir(out).exists()
    assert swap.recover(out) == ""


def test_work_dirs_of_a_killed_export_are_cleared(tmp_path: Path) -> None:
    out = model_dir(tmp_path / "out", "old")
    for stale in (".out.partial", ".out.gguf-checkpoint"):
        (model_dir(tmp_path / stale, "stale") / "model.onnx").write_bytes(b"\0" * 1024)
    with pytest.raises(ExportError, match="neither a checkpoint directory nor a Hub id"):
        export_model(str(tmp_path / "missing"), out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "marker.txt").read_text() == "old"  # a failed export leaves OUT as it was


def test_a_linked_out_dir_is_replaced_and_its_target_kept(tmp_path: Path) -> None:
    """OUT as `models/current -> v3`: the link gives way to the new dir, v3 stays whole."""
    target = model_dir(tmp_path / "v3", "v3")
    out = tmp_path / "current"
    out.symlink_to(target)
    swap.install(model_dir(tmp_path / ".current.partial", "new"), out)
    assert not out.is_symlink()
    assert (out / "marker.txt").read_text() == "new"
    assert (target / "marker.txt").read_text() == "v3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "v3"]


@pytest.mark.parametrize("after", [False, True], ids=["before-the-rename", "after-the-rename"])
def test_ctrl_c_between_the_fallback_renames_leaves_a_dir_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after: bool
) -> None:
    """Ctrl-C lands on the second rename, before or just after it is done: OUT holds the
    old dir or the new one, and the Ctrl-C (not an OSError) reaches the caller."""
    out = model_dir(tmp_path / "out", "old")
    staging = model_dir(tmp_path / ".out.partial", "new")
    monkeypatch.setattr(swap, "_exchange", lambda a, b: False)
    rename = Path.rename

    def interrupted(self: Path, target: Path) -> Path:
        if self != staging:
            return rename(self, target)
        if after:
            rename(self, target)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        swap.install(staging, out)
    assert (out / "marker.txt").read_text() == ("new" if after else "old")
