"""The image's kernels by name: ``--kernel 6.1`` and ``--kernel 6.12`` boot the same root filesystem with their own
vmlinuz and initramfs (no VM is booted here: the image is a fake directory)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from labctl.kernel import tracefs
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


KFREE_SKB_6_12 = '''name: kfree_skb
ID: 1524
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:void * location;\toffset:16;\tsize:8;\tsigned:0;
\tfield:void * rx_sk;\toffset:24;\tsize:8;\tsigned:0;
\tfield:unsigned short protocol;\toffset:32;\tsize:2;\tsigned:0;
\tfield:enum skb_drop_reason reason;\toffset:36;\tsize:4;\tsigned:0;

print fmt: "skbaddr=%p rx_sk=%p protocol=%u location=%pS reason: %s", REC->skbaddr, REC->rx_sk, REC->protocol, \
REC->location, __print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, { 8, "NETFILTER_DROP" })
'''


@pytest.mark.parametrize(("location", "function"), [
    ("nft_do_chain+0x40f/0x630 [nf_tables]", "nft_do_chain"),   # 6.12 (Debian's, modules): the module is named
    ("nft_do_chain+0x40f/0x630", "nft_do_chain"),               # built in (the host's 6.18)
])
def test_a_drop_location_in_a_module_is_parsed(location: str, function: str) -> None:
    """Debian's 6.12 prints a drop in modular code with its module: ``at: nft_do_chain`` must still match (E1
    and the nft drop were 'None at None' on 6.12 before)."""
    fmt = tracefs.parse_format(KFREE_SKB_6_12, "skb")
    line = (f"         python3-305     [001] .....    37.539422: kfree_skb: skbaddr=000000001d9ea586 "
            f"rx_sk=0000000000000000 protocol=2048 location={location} reason: NETFILTER_DROP")
    event = tracefs.parse_line(line, {"kfree_skb": [fmt]})
    assert event is not None and event.reason == "NETFILTER_DROP" and event.function == function
