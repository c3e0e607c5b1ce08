"""More real photographs, from two Debian packages: ``opencv-doc`` (its example images) and
``plasma-workspace-wallpapers`` (the photographic wallpapers).

Only real photographs are listed: synthetic images, drawings, paintings, document scans, calibration
checkerboards and abstract wallpapers are left out, and of a stereo pair or a tampered copy only one
image is kept, so no scene appears on both sides of the train / held-out split. Each photo is read at
``MAX_SIDE`` on its longest side — about the scale of the scikit-image photos — so a training crop holds
as much of a scene as a crop of those does, and a 5120-pixel wallpaper does not cost 180 MB of memory.

Install with ``apt-get install opencv-doc plasma-workspace-wallpapers``; the sets are then
``photos:extended`` (train), ``photos:extended:heldout`` and ``photos:extended:all``, each the
built-in photos plus these.
"""

from __future__ import annotations

from pathlib import Path

import attrs
from torch import Tensor

from tatok_core.contract.errors import ImageReadError
from tatok_core.io.images import fit_longest_side, read_image

MAX_SIDE = 512
PACKAGES = {"opencv-doc": Path("/usr/share/doc/opencv-doc/examples"),
            "plasma-workspace-wallpapers": Path("/usr/share/wallpapers")}
INSTALL_HINT = "apt-get install opencv-doc plasma-workspace-wallpapers"


@attrs.frozen
class DebianPhoto:
    """A photograph installed by a Debian package: ``relpath`` under that package's folder."""

    name: str
    package: str
    relpath: str

    @property
    def path(self) -> Path:
        root = PACKAGES[self.package]
        if self.package == "plasma-workspace-wallpapers":  # the largest rendering of the wallpaper
            sizes = sorted((root / self.relpath / "contents" / "images").glob("*x*.*"),
                           key=lambda p: int(p.stem.split("x")[0]))
            if sizes:
                return sizes[-1]
        return root / self.relpath

    def load(self) -> Tensor:
        """(3, H, W) float32 in [0, 1], longest side ``MAX_SIDE``; a clear message when not installed."""
        path = self.path
        if not path.is_file():
            raise ImageReadError(f"photo {self.name!r} needs the Debian package {self.package!r}: {INSTALL_HINT}")
        return fit_longest_side(read_image(path), MAX_SIDE)


def _cv(name: str, relpath: str) -> DebianPhoto:
    return DebianPhoto(name, "opencv-doc", relpath)


def _wall(name: str) -> DebianPhoto:
    return DebianPhoto(name, "plasma-workspace-wallpapers", name)


DEBIAN_PHOTOS: tuple[DebianPhoto, ...] = (
    _cv("cv_plant", "alphamat/input_images/plant.jpg"),
    _cv("cv_aero", "data/aero1.jpg"),
    _cv("cv_aloe", "data/aloeL.jpg"),
    _cv("cv_apple", "data/apple.jpg"),
    _cv("cv_baboon", "data/baboon.jpg"),
    _cv("cv_board", "data/board.jpg"),
    _cv("cv_building", "data/building.jpg"),
    _cv("cv_butterfly", "data/butterfly.jpg"),
    _cv("cv_chicky", "data/chicky_512.png"),
    _cv("cv_notebook", "data/ela_original.jpg"),
    _cv("cv_fruits", "data/fruits.jpg"),
    _cv("cv_graffiti", "data/graf1.png"),
    _cv("cv_home", "data/home.jpg"),
    _cv("cv_leuven", "data/leuvenA.jpg"),
    _cv("cv_messi", "data/messi5.jpg"),
    _cv("cv_orange", "data/orange.jpg"),
    _cv("cv_rubberwhale", "data/rubberwhale1.png"),
    _cv("cv_squirrel", "data/squirrel_cls.jpg"),
    _cv("cv_stuff", "data/stuff.jpg"),
    _cv("cv_robin", "hfs/data/000.jpg"),
    _cv("cv_house", "reg/home.png"),
    _cv("cv_monarch", "dnn_superres/butterfly.png"),
    *(_cv(f"cv_street{i}", f"text/scenetext0{i}.jpg") for i in range(1, 7)),
    _wall("BytheWater"),
    _wall("ColdRipple"),
    _wall("ColorfulCups"),
    _wall("DarkestHour"),
    _wall("EveningGlow"),
    _wall("FallenLeaf"),
    _wall("Grey"),
    _wall("Kite"),
    _wall("OneStandsOut"),
    _wall("Path"),
    _wall("Volna"),
    _wall("summer_1am"),
)

#: Held out by photo, fixed before any training: animals, fruit, a building, a street, water, a forest.
DEBIAN_HELDOUT: tuple[str, ...] = (
    "cv_baboon", "cv_fruits", "cv_squirrel", "cv_building", "cv_street4", "cv_robin",
    "EveningGlow", "Path", "Volna",
)
DEBIAN_TRAIN: tuple[str, ...] = tuple(p.name for p in DEBIAN_PHOTOS if p.name not in DEBIAN_HELDOUT)
