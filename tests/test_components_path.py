"""fedmeta/components.py never lets a module planted in the cwd shadow an installed one (issue 17, item 5)."""

import os
import subprocess
import sys
import textwrap

PLANT = textwrap.dedent("""
    import pathlib
    pathlib.Path(__file__).with_name("MARKER").write_text("the planted module ran")
    raise SystemExit("planted sympy.py imported")
""")

SCRIPT = textwrap.dedent("""
    from fedmeta.components import resolve
    from fedmeta.models import resolve_model_factory
    resolve_model_factory("fedmeta.models:multimodal_net")   # every run resolves the default model factory
    own = resolve("my_comp:VALUE", "model.factory")          # the user's own module in the cwd still resolves
    import sympy                                             # a lazy import after resolution (torch, etc. do this)
    print(own, sympy.__file__)
""")


def test_a_planted_module_in_the_cwd_is_never_imported(tmp_path):
    (tmp_path / "sympy.py").write_text(PLANT)
    (tmp_path / "my_comp.py").write_text("VALUE = 'user-code'\n")
    # -P: Python itself puts no cwd / script dir on sys.path, as for the installed `fedmeta` console script
    r = subprocess.run([sys.executable, "-P", "-c", SCRIPT], cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (tmp_path / "MARKER").exists()
    own, sympy_file = r.stdout.split()
    assert own == "user-code" and "site-packages" in sympy_file


def test_the_cwd_is_appended_only_for_a_module_found_there(tmp_path, monkeypatch):
    from fedmeta.components import resolve

    (tmp_path / "planted_only_here.py").write_text("X = 1\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    resolve("fedmeta.models:multimodal_net", "model.factory")
    assert str(tmp_path) not in sys.path  # an installed reference leaves sys.path alone
    assert resolve("planted_only_here:X", "model.factory") == 1
    assert sys.path[-1] == str(tmp_path)  # appended: behind the standard library and installed packages
    monkeypatch.delitem(sys.modules, "planted_only_here")
