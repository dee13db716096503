"""The image's kernels by name: ``--kernel 6.1`` and ``--kernel 6.12`` boot the same root filesystem with their own
vmlinuz and initramfs (no VM is booted here: the image is a fake directory)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from labctl.vm import image, kernels
from labctl.vm.errors import VmError

RELEASES = {"6.1": "6.1.0-41-cloud-amd64", "6.12": "6.12.57+deb12-cloud-amd64"}


@pytest.mark.parametrize(("name", "label"), [
    ("6.1", "6.1"), ("debian", "6.1"), ("bookworm", "6.1"),
    ("6.12", "6.12"), ("backports", "6.12"), ("bookworm-backports", "6.12"),
])
def test_names_of_the_image_kernels(name: str, label: str) -> None:
    kernel = kernels.resolve(name)
    assert kernel.label == label and kernel.bzimage is None and not kernel.is_host


def test_an_unknown_kernel_name_lists_the_choices() -> None:
    with pytest.raises(VmError, match=r"6\.12 \(the same from bookworm-backports\)"):
        kernels.resolve("6.13")


@pytest.mark.parametrize(("release", "series"), [
    ("6.1.0-41-cloud-amd64", "6.1"), ("6.12.57+deb12-cloud-amd64", "6.12"), ("6.18.44-fc-v1300", "6.18"),
    ("6.12.9+bpo-cloud-amd64", "6.12"),
])
def test_series_of_a_release(release: str, series: str) -> None:
    assert image.series(release) == series


def _fake_image(cache: Path, meta: dict[str, object]) -> Path:
    directory = cache / f"debian12-{image.recipe_hash()}"
    directory.mkdir(parents=True)
    (directory / "image.json").write_text(json.dumps(meta))
    return directory


def test_each_kernel_boots_its_own_files_on_the_one_rootfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image, "CACHE", tmp_path)
    directory = _fake_image(tmp_path, {"kernels": RELEASES, "build_seconds": 100.0})
    built = image.load()
    assert built is not None and list(built.kernels) == ["6.1", "6.12"]
    assert built.kernels["6.12"].release == RELEASES["6.12"]
    machines = {label: kernels.machine_for(kernels.resolve(label), built, []) for label in ("6.1", "6.12")}
    assert machines["6.12"].kernel == directory / "vmlinuz-6.12"
    assert machines["6.12"].initrd == directory / "initrd-6.12.img"
    assert machines["6.1"].kernel == directory / "vmlinuz-6.1"
    assert machines["6.1"].rootfs == machines["6.12"].rootfs == directory / "rootfs.img"


def test_an_image_without_that_kernel_says_what_it_has(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image, "CACHE", tmp_path)
    _fake_image(tmp_path, {"kernels": {"6.1": RELEASES["6.1"]}, "build_seconds": 1.0})
    built = image.load()
    assert built is not None
    with pytest.raises(VmError, match=r"has no 6\.12 kernel \(it has 6\.1\)"):
        kernels.machine_for(kernels.resolve("6.12"), built, [])


def test_an_image_of_the_one_kernel_recipe_is_not_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """image.json of the recipe before 6.12 (one release): not this recipe's image, so it is built again."""
    monkeypatch.setattr(image, "CACHE", tmp_path)
    _fake_image(tmp_path, {"release": RELEASES["6.1"], "build_seconds": 1.0})
    assert image.load() is None


def test_the_recipe_names_the_backports_suite() -> None:
    assert image.recipe()["backports"] == "bookworm-backports"
    script = image.CHROOT_SCRIPT.format(mirror="M", suite="bookworm", backports="bookworm-backports",
                                        kernel="linux-image-cloud-amd64", packages="p", venv="/v", requirements="r")
    assert "deb M bookworm-backports main" in script and "-t bookworm-backports" in script
