"""The golden lab files are expected output, not labs to run: labctl's pytest plugin must not collect them.

(They have ``checks``, so the plugin would bring them up under their fixed names;
the kernel tests here use generated labs named ``tg<pid>...`` instead.)  The
fixture lab is brought up by ``test_lab_fixture.py`` under a per-run name.
"""

collect_ignore = ["golden", "fixture_lab"]
