"""The extended photo sets: built-in photos plus real photographs from two Debian packages."""

from __future__ import annotations

from pathlib import Path

import pytest

from tatok_core.workflows import debian_photos
from tatok_core.workflows.data import ImageSource, load_builtin_photo
from tatok_core.workflows.debian_photos import DEBIAN_HELDOUT, DEBIAN_PHOTOS, DEBIAN_TRAIN, MAX_SIDE
from tatok_core.contract.errors import ImageReadError

INSTALLED = all(root.is_dir() for root in debian_photos.PACKAGES.values())


def test_split_is_by_photo_and_complete() -> None:
    names = [p.name for p in DEBIAN_PHOTOS]
    assert len(set(names)) == len(names)
    assert set(DEBIAN_TRAIN).isdisjoint(DEBIAN_HELDOUT)
    assert set(DEBIAN_TRAIN) | set(DEBIAN_HELDOUT) == set(names)
    assert set(DEBIAN_HELDOUT) <= set(names)


def test_missing_package_names_the_package_and_the_install_command(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    monkeypatch.setitem(debian_photos.PACKAGES, "opencv-doc", tmp_path / "nowhere")
    with pytest.raises(ImageReadError, match=r"'opencv-doc'.*apt-get install opencv-doc"):
        load_builtin_photo("cv_baboon")


@pytest.mark.skipif(not INSTALLED, reason="needs apt-get install opencv-doc plasma-workspace-wallpapers")
def test_every_listed_photo_loads_at_the_documented_scale() -> None:
    source = ImageSource("builtin:photos:extended:heldout")
    assert len(source) == 5 + len(DEBIAN_HELDOUT)
    for name in DEBIAN_HELDOUT:
        image = load_builtin_photo(name)
        assert image.shape[0] == 3 and max(image.shape[1:]) <= MAX_SIDE
        assert image.std() > 0.02, f"{name} looks flat: not a photograph?"
    assert all(p.path.is_file() for p in DEBIAN_PHOTOS)
