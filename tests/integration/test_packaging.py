"""The installable package (issue 17, item 1): build it, install it, run it.

    source tree ──python -m build──▶ sdist ──▶ wheel ──pip install──▶ fresh venv
                                                                       │
                        postillon --version, check-config, sendmail…  ◀┘

The wheel is built the way ``make dist`` builds it (sdist first, the wheel from the
sdist, so a file missing from the sdist breaks the wheel too), but without build
isolation: the test runs offline, and the backend is in the test venv.

The fresh venv gets the wheel and nothing of the source tree. Its third-party
dependencies come from the test venv's site-packages as a plain path (a path line in a
``.pth`` file: the ``.pth`` files *inside* that directory, among them the editable
install's finder, are not run), and ``pip check`` then proves that the wheel's declared
requirements are what it needs. An operator's ``pipx install postillon-*.whl`` fetches
the same requirements from the package index instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import postillon

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = out.glob("postillon-*.whl")
    (sdist,) = out.glob("postillon-*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


@pytest.fixture(scope="module")
def venv(built: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    fresh_site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # The dependencies: the test venv's site-packages, after the fresh venv's own.
    (fresh_site / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    subprocess.run(
        [*pip, "install", "--no-index", "--no-deps", "--quiet", str(built["wheel"])],
        check=True,
        timeout=300,
    )
    check = subprocess.run([*pip, "check"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    return root


def _run(venv: Path, *argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "POSTILLON_CONFIG"}}
    return subprocess.run(
        [str(venv / "bin" / argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=cwd or venv,
    )


def test_wheel_holds_the_package_the_page_and_the_migrations_not_the_tests(
    built: dict[str, Path],
) -> None:
    names = zipfile.ZipFile(built["wheel"]).namelist()
    assert "postillon/admin/static/index.html" in names
    assert "postillon/admin/static/app.js" in names
    assert "postillon/queue/postgres_schema.py" in names  # the PostgreSQL migrations
    assert "postillon/queue/sqlite_schema.py" in names  # the SQLite migrations
    assert "postillon/osutil/sd_notify.py" in names
    assert "postillon/provision/files/postillon.service" in names
    assert "postillon/provision/files/postillon.logrotate" in names
    assert not [n for n in names if n.startswith(("tests/", "support/", "conftest"))]
    top = {n.split("/")[0] for n in names}
    assert top == {"postillon", f"postillon-{postillon.__version__}.dist-info"}
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(built["wheel"]).read(entry_points).decode()
    for script in ("postillon", "sendmail", "mailq", "newaliases"):
        assert f"\n{script} = " in scripts


def test_sdist_builds_the_wheel_and_carries_the_docs(built: dict[str, Path]) -> None:
    with tarfile.open(built["sdist"]) as sdist:
        names = sdist.getnames()
    prefix = f"postillon-{postillon.__version__}/"
    assert prefix + "pyproject.toml" in names
    assert prefix + "src/postillon/admin/static/index.html" in names


def test_installed_wheel_runs_version_and_check_config(venv: Path) -> None:
    where = _run(venv, "python", "-c", "import postillon; print(postillon.__file__)")
    assert where.returncode == 0, where.stderr
    assert where.stdout.startswith(str(venv)), where.stdout  # not the source tree

    version = _run(venv, "postillon", "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"postillon {postillon.__version__}"

    config = venv / "postillon.toml"
    config.write_text(
        f'hostname = "mx.example.org"\ndata_dir = "{venv / "data"}"\n'
        '[[domain]]\nname = "example.org"\n'
        '[[listen]]\nkind = "smtp"\naddress = "127.0.0.1:2525"\n'
    )
    checked = _run(venv, "postillon", "check-config", str(config))
    assert checked.returncode == 0, checked.stderr
    assert "OK" in checked.stdout

    # The static page is found through the installed package, not the source tree.
    page = _run(
        venv,
        "python",
        "-c",
        "from importlib.resources import files;"
        "print((files('postillon.admin') / 'static' / 'index.html').read_text()[:200])",
    )
    assert page.returncode == 0 and "<html" in page.stdout.lower(), page.stderr


def test_installed_wheel_provides_the_sendmail_commands(venv: Path) -> None:
    for script in ("sendmail", "mailq", "newaliases"):
        assert (venv / "bin" / script).is_file()
    help_text = _run(venv, "postillon", "--help")
    assert "setup" in help_text.stdout and "import-postfix" in help_text.stdout
    # The unit template is found inside the installed package.
    unit = _run(
        venv,
        "python",
        "-c",
        "from pathlib import Path; from postillon.provision.templates import render_unit;"
        "print(render_unit(postillon=Path('/usr/bin/postillon'), config=Path('/etc/p.toml'),"
        " data_dir=Path('/var/lib/postillon'), user='postillon'))",
    )
    assert unit.returncode == 0, unit.stderr
    assert "Type=notify" in unit.stdout
