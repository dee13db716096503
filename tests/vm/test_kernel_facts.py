"""Reading a distribution kernel's options and legacy ebtables listings, without that kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

from labctl.kernel import ebtables, kconfig


def test_options_from_boot_config_when_proc_has_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    boot = tmp_path / "config-6.1.0-50-cloud-amd64"
    boot.write_text("CONFIG_BRIDGE=m\nCONFIG_BRIDGE_EBT_BROUTE=m\n# CONFIG_NET_VRF is not set\nCONFIG_VETH=y\n")
    monkeypatch.setattr(kconfig, "CONFIG_GZ", str(tmp_path / "absent.gz"))
    monkeypatch.setattr(kconfig, "BOOT_CONFIG", str(tmp_path / "config-{release}"))
    monkeypatch.setattr(kconfig.platform, "release", lambda: "6.1.0-50-cloud-amd64")
    kconfig.options.cache_clear()
    try:
        assert kconfig.source() == str(boot)
        assert kconfig.missing(["CONFIG_BRIDGE_EBT_BROUTE", "CONFIG_NET_VRF", "CONFIG_VETH|CONFIG_X"]) == [
            "CONFIG_NET_VRF"
        ]
        assert kconfig.as_modules(["CONFIG_BRIDGE_EBT_BROUTE", "CONFIG_VETH"]) == ["CONFIG_BRIDGE_EBT_BROUTE"]
    finally:
        kconfig.options.cache_clear()


def test_legacy_broute_listing_with_counters() -> None:
    text = (
        "Bridge table: broute\n\nBridge chain: BROUTING, entries: 1, policy: ACCEPT\n"
        "-p IPv4 --ip-dst 10.0.0.2 --ip-proto udp --ip-dport 5000 -j DROP , pcnt = 3 -- bcnt = 126\n"
        "-p IPv4 -j redirect  --redirect-target DROP, pcnt = 1 -- bcnt = 46\n"  # a target with options: no space
    )
    rows = ebtables.parse_legacy_list("broute", text)
    assert [(r.table, r.chain, r.position, r.packets) for r in rows] == [
        ("broute", "BROUTING", 0, -1),
        ("broute", "BROUTING", 1, 3),
        ("broute", "BROUTING", 2, 1),
    ]
    assert rows[2].rule == "-A BROUTING -p IPv4 -j redirect  --redirect-target DROP"
