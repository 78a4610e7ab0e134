"""What `pip install` puts into site-packages (issue 10): one top-level import name, `fuse_attn`.

The repository keeps `passes/` and `models/` as folders of their own, mapped to `fuse_attn.passes`
and `fuse_attn.models`; installed as `passes` and `models`, they would shadow (or be shadowed by)
a user's own packages of those common names. The wheel is built from a copy of the source, the
way pip builds it for `pip install .`, and its file list (RECORD) is checked.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("pyproject.toml", "README.md", "fuse_attn", "passes", "models")


def test_the_wheel_installs_one_top_level_name(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:  # a copy, so the build leaves nothing in the working tree
        path = os.path.join(ROOT, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copyfile(path, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
                        str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = (tmp_path / "dist").glob("fuse_attn-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (dist_info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        record = [row[0] for row in csv.reader(io.StringIO(zf.read(f"{dist_info}/RECORD").decode()))]
        top_level = zf.read(f"{dist_info}/top_level.txt").decode().split()
    installed_top = {path.split("/")[0] for path in record} - {dist_info}
    assert installed_top == {"fuse_attn"}, sorted(installed_top)
    assert top_level == ["fuse_attn"]
    # the mapped folders are in it, under the namespace, with their data files
    for path in ("fuse_attn/passes/plan.py", "fuse_attn/models/__main__.py", "fuse_attn/models/manifest.json",
                 "fuse_attn/ir/graph.py", "fuse_attn/__main__.py", "fuse_attn/commands/compile.py"):
        assert path in record, path
    assert not any(p.startswith(("passes/", "models/", "tests/")) for p in record)

    # Installed from the wheel, next to a project of the user's own with a `models` package:
    # each import finds its own package.
    site, user = tmp_path / "site", tmp_path / "user"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                        str(wheel)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    (user / "models").mkdir(parents=True)
    (user / "models" / "__init__.py").write_text("MINE = True\n")
    probe = ("import models, fuse_attn, fuse_attn.models, fuse_attn.passes.plan; "
             "print(models.MINE, fuse_attn.__file__, fuse_attn.models.__file__, sep='\\n')")
    env = dict(os.environ, PYTHONPATH=str(site))
    r = subprocess.run([sys.executable, "-c", probe], cwd=user, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    mine, package, zoo = r.stdout.split()
    assert mine == "True"
    assert package.startswith(str(site)) and zoo.startswith(str(site / "fuse_attn" / "models"))
