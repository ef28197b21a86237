"""Every folder with an __init__.py is listed in pyproject's packages: an editable install finds unlisted
subpackages through their parent's path, a wheel silently leaves them out."""

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_installed():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    folders = {
        "kiln." + name if name != "kiln" else name: path
        for name, path in tool["package-dir"].items()
        for name in [name.removeprefix("kiln.")]
    }
    missing = []
    for pkg, folder in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            name = ".".join((pkg, *rel)) if rel else pkg
            if name not in listed and "__pycache__" not in rel:
                missing.append(name)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"
